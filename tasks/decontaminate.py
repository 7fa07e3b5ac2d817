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
(document, eval prompt) pair, sorted). Metrics: a filter's (tasks.core.filters: `docs_dropped` are the
removed documents, `docs_in.<source>` minus `docs_kept.<source>` per source), `matches` (pairs) and
`eval_questions` (distinct normalized questions).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field

from tasks.core.filters import Decision, filter_documents
from tasks.core.outputs import document_shards, load_prompts
from tasks.core.stage import Stage, StageConfig, StageContext
from tasks.core.store import write_parquet
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


def find_eval_questions(path: str, table: pa.Table, prompts: list[dict], sources: list[str]) -> Decision:
    """One shard's decision (on a worker): drop each checked document that holds an eval question; its
    (doc_id, prompt_id, task) matches go back to the stage as the decision's extra.

    `prompts` are plain {"id", "task", "question"} dicts (cheap to ship to a worker); the
    index is rebuilt per shard, which costs O(questions)."""
    index, checked = QuestionIndex(prompts), set(sources)
    keep, matches = [], []
    for doc, text, source in zip(table["id"].to_pylist(), table["text"].to_pylist(), table["source"].to_pylist()):
        found = index.find(normalize(text)) if source in checked else set()
        keep.append(not found)
        matches.extend((doc, pid, task) for pid, task in sorted(found))
    return Decision(np.array(keep, bool), "eval_question", extra=matches)


def decontaminate(cfg: DecontaminateConfig, inputs: dict, ctx: StageContext) -> dict:
    files = document_shards(inputs["documents"], "decontaminate")
    evals = [{"id": p["id"], "task": p["task"], "question": p["question"]} for p in load_prompts(inputs["prompts"], "eval")]
    done = filter_documents(ctx, files, find_eval_questions, ["eval_question"], prompts=evals, sources=list(cfg.sources))
    matches = sorted(m for part in done.extras for m in part)  # only contaminated documents: a few, not the corpus
    write_parquet(pa.table({c: [m[i] for m in matches] for i, c in enumerate(REMOVED_SCHEMA.names)}, schema=REMOVED_SCHEMA),
                  ctx.out / "removed" / "part-00000.parquet")
    metrics = {**done.metrics, "matches": len(matches), "eval_questions": len(QuestionIndex(evals).questions)}
    return {"rows": {"documents": metrics["docs_kept"], "removed": len(matches)}, "metrics": metrics}


STAGE = Stage("decontaminate", VERSION, DecontaminateConfig, decontaminate, report_metrics=("docs_dropped", "docs_kept"))
