"""Decontaminate: drop training documents that contain an eval prompt's question.

Inputs `documents` (dedup output: `documents/part-*.parquet`, any columns beyond `id`,
`text`, `source` are carried through) and `prompts` (its `eval` table). Only documents whose
`source` is in `sources` are checked (by default the reasoning-gym worked problems, the only
corpus text that can hold an eval question verbatim); the rest pass untouched.

A document is removed when its normalized text (`tasks.core.tokens.normalize`: NFC, whitespace
folded, lowercased, stripped) contains the normalized question of any eval prompt as a
substring. Matching is O(characters of the checked documents + eval questions): every
question is indexed under its first k characters (k = the shortest question's length, at
most 32); each window of k characters of a document is one dict lookup, and only a hit is
confirmed with `startswith` against that key's questions. A reasoning-gym document starts
with its question, so it is usually caught at offset 0, but a question anywhere in a
document is found too (no dependence on how the document was rendered).

Outputs: `documents` (the kept rows, same schema, one shard per input shard with the same
names, possibly empty), `dropped` (`doc_id`, `source`, reason `eval_question`) and `removed` (`doc_id`, `prompt_id`, `task`: one row per matching
(document, eval prompt) pair, sorted). Metrics: `docs_in`, `docs_out`, `removed`
(documents), `removed.<source>` for each checked source, `matches` (pairs).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
from pydantic import Field

from tasks.core.filters import Decision, filter_shard
from tasks.core.outputs import document_shards, load_prompts
from tasks.core.stage import Stage, StageConfig, StageContext
from tasks.core.store import read_table, write_parquet
from tasks.core.tokens import normalize

VERSION = 2  # 2: a dropped table (tasks.core.filters)
MAX_KEY = 32
REMOVED_SCHEMA = pa.schema([("doc_id", pa.string()), ("prompt_id", pa.string()), ("task", pa.string())])


class DecontaminateConfig(StageConfig):
    sources: list[str] = Field(["reasoning_gym"], description="document sources to check against the eval questions")


class QuestionIndex:
    """Normalized eval questions, findable in a text in one pass over it."""

    def __init__(self, prompts: list[dict]):
        self.questions: dict[str, list[tuple[str, str]]] = {}  # normalized question -> [(prompt_id, task)]
        for p in prompts:
            q = normalize(p["question"])
            if q:
                self.questions.setdefault(q, []).append((p["id"], p["task"]))
        self.k = min([MAX_KEY, *map(len, self.questions)]) if self.questions else 0
        self.by_key: dict[str, list[tuple[str, list[tuple[str, str]]]]] = {}
        for q, owners in sorted(self.questions.items()):
            self.by_key.setdefault(q[: self.k], []).append((q, owners))

    def find(self, text: str) -> set[tuple[str, str]]:
        """(prompt_id, task) of every question that occurs in the normalized `text`."""
        found: set[tuple[str, str]] = set()
        k, by_key = self.k, self.by_key
        if not k:
            return found
        for pos in range(len(text) - k + 1):
            cands = by_key.get(text[pos:pos + k])
            if cands:
                for q, owners in cands:
                    if text.startswith(q, pos):
                        found.update(owners)
        return found


def shard_matches(path: str, prompts: list[dict], sources: list[str], out: Path) -> dict:
    """One shard (mapped over workers): its kept and dropped documents written into `out`; returns
    the counts and the (doc_id, prompt_id, task) matches, so the stage never holds the corpus.

    `prompts` are plain {"id", "task", "question"} dicts (cheap to ship to a worker); the
    index is rebuilt per shard, which costs O(questions)."""
    index = QuestionIndex(prompts)
    table = read_table(path)
    checked = set(sources)
    keep, matches, removed = [], [], Counter()
    for doc, text, source in zip(table["id"].to_pylist(), table["text"].to_pylist(), table["source"].to_pylist()):
        found = index.find(normalize(text)) if source in checked else set()
        keep.append(not found)
        if found:
            removed[source] += 1
            matches.extend((doc, pid, task) for pid, task in sorted(found))
    counts = filter_shard(path, Decision(np.array(keep, bool), "eval_question"), out, table)
    return {"counts": dict(counts), "matches": matches, "removed": dict(removed)}


def decontaminate(cfg: DecontaminateConfig, inputs: dict, ctx: StageContext) -> dict:
    files = document_shards(inputs["documents"], "decontaminate")
    evals = [{"id": p["id"], "task": p["task"], "question": p["question"]} for p in load_prompts(inputs["prompts"], "eval")]
    counts, removed, matches = Counter(), Counter({s: 0 for s in cfg.sources}), []
    for part in ctx.map_bounded(shard_matches, files, prompts=evals, sources=list(cfg.sources), out=ctx.out):
        counts.update(part["counts"])
        removed.update(part["removed"])
        matches += part["matches"]  # only contaminated documents: a few, not the corpus
    matches.sort()
    write_parquet(pa.table({c: [m[i] for m in matches] for i, c in enumerate(REMOVED_SCHEMA.names)}, schema=REMOVED_SCHEMA),
                  ctx.out / "removed" / "part-00000.parquet")
    docs_in, docs_out = counts["docs_in"], counts["docs_out"]
    metrics = {
        "docs_in": docs_in,
        "docs_out": docs_out,
        "removed": docs_in - docs_out,
        "matches": len(matches),
        "eval_questions": len(QuestionIndex(evals).questions),
        **{f"removed.{s}": n for s, n in sorted(removed.items())},
    }
    return {"rows": {"documents": docs_out, "removed": len(matches)}, "metrics": metrics}


STAGE = Stage("decontaminate", VERSION, DecontaminateConfig, decontaminate, report_metrics=("removed", "docs_out"))
