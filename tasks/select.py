"""Select: keep a budget of documents by a selector's ranking (PreSelect, "The Data That Predicts
Is the Data That Teaches", and its baselines).

Input `documents` (documents/part-*.parquet, any columns carried through), plus `scores` (a
preselect output) for method preselect and `tokenizer` for unit tokens.

Methods:
- `preselect`: rank by `preselect_score` descending (ties: doc id ascending); every document
  must have a score.
- `random`: rank by doc_hash(seed, id) (the tokenizer/pack hash; independent of sharding):
  the baseline every selector must beat at equal budget.
- `quality`: keep the rows whose `quality_kept` is true, i.e. the quality stage's documents
  as they are (the heuristic filter is the selection; `fraction` does not apply). Documents
  without that column are an error, so a miswired DAG never passes everything silently.
- `none`: keep everything (`fraction` does not apply).

`drop_sources` removes the documents of the named sources first (every method then works on
what is left, budget included): a data mixture, e.g. the reference models' training sets.

Budget (preselect, random): sizes in `unit`, total T, budget B = fraction * T. The kept
documents are the shortest prefix of the ranking whose size is >= B: at least the budget,
and less than one document over it (the last kept one is the only one that straddles B).
`unit` chars counts Unicode characters; tokens counts what pack will train on: the
tokenizer's encoding of the text (special-token strings as plain text) plus one <|bos|>.

Default fraction 0.5, not the paper's 0.1: the paper selects 30B from 300B tokens; the
default corpus here is ~12M characters, and a tenth of it (~1.2M) would be repeated many
times over in one pretraining run. Half still makes a real choice. Not tuned by a
measurement: set 0.1 to follow the paper.

Output `documents` (the kept rows, same schema, one shard per input shard with the same
names, possibly empty) and `dropped` (reason `dropped_source`, `quality_filter` or `over_budget`). Metrics: docs_in, docs_kept, chars_in, chars_kept,
kept_char_fraction, and units_in/units_kept/budget in the chosen unit.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import polars as pl
import pyarrow.compute as pc
from pydantic import Field

from tasks.core.filters import Decision, write_filtered
from tasks.core.orchestration import stage_task
from tasks.core.outputs import document_shards
from tasks.core.stage import Stage, StageConfig, StageContext, StageError
from tasks.core.store import Artifact, read_schema, read_table
from tasks.core.tokens import doc_hash, hash_order, load_tokenizer

VERSION = 2  # 2: a dropped table (tasks.core.filters)


class SelectConfig(StageConfig):
    method: Literal["preselect", "quality", "random", "none"] = Field(
        "preselect", description="ranking: preselect score, seeded random, quality filter pass-through, or none")
    fraction: float = Field(0.5, gt=0, le=1, description="budget: this share of the total size (preselect, random)")
    unit: Literal["chars", "tokens"] = Field("chars", description="size of a document: characters, or tokens (needs a tokenizer input)")
    seed: int = Field(0, description="seed of the random ranking")
    drop_sources: list[str] = Field(default_factory=list, description="drop documents of these sources before selecting (a data mixture)")


def budget_prefix(sizes: np.ndarray, fraction: float) -> int:
    """How many ranked documents to keep: the shortest prefix whose total >= fraction * total."""
    cum = np.cumsum(np.asarray(sizes, np.float64))
    if not len(cum):
        return 0
    budget = fraction * cum[-1]
    return min(len(cum), int(np.searchsorted(cum, budget, side="left")) + 1)


def _shard_sizes(path: str, tokenizer: str | None) -> dict:
    """One shard (mapped over workers): ids, characters, tokens (when a tokenizer is given), quality flag, source."""
    schema = read_schema(path)
    optional = [c for c in ("quality_kept", "source") if c in schema.names]
    table = read_table(path, columns=["id", "text", *optional])
    out = {"id": table["id"].to_pylist(), "chars": pc.utf8_length(table["text"]).to_numpy().astype(np.int64),
           **{c: table[c].to_numpy(zero_copy_only=False) if c in optional else None for c in ("quality_kept", "source")}}
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        tok.encode_special_tokens = True  # as pack encodes documents
        encoded = tok.encode_batch_fast(table["text"].to_pylist())
        out["tokens"] = np.array([len(e.ids) + 1 for e in encoded], np.int64)  # + <|bos|>
    return out


def preselect_scores(artifact: Artifact) -> pl.DataFrame:
    files = artifact.files("scores")
    if not files:
        raise StageError(f"select: input 'scores' ({artifact.stage}/{artifact.key}) has no scores/*.parquet shards")
    table = pl.concat([pl.from_arrow(read_table(f, columns=["doc_id", "preselect_score"])) for f in files])
    dup = table.filter(pl.col("doc_id").is_duplicated())
    if len(dup):
        raise StageError(f"select: input 'scores' holds document {dup['doc_id'][0]} more than once")
    return table


def ranking(cfg: SelectConfig, docs: pl.DataFrame, inputs: dict[str, Artifact]) -> np.ndarray:
    """Row indices of `docs` (columns id, ...) best first."""
    if cfg.method == "random":
        ids = docs["id"].to_list()
        return hash_order(doc_hash(ids, cfg.seed), ids)
    if "scores" not in inputs:
        raise StageError("select: method preselect needs a 'scores' input (a preselect output)")
    scored = docs.with_row_index("row").join(preselect_scores(inputs["scores"]), left_on="id", right_on="doc_id", how="left")
    missing = scored.filter(pl.col("preselect_score").is_null())
    if len(missing):
        raise StageError(f"select: document {missing['id'][0]} has no preselect_score in input 'scores' "
                         f"({len(missing)} documents without one)")
    return scored.sort(["preselect_score", "id"], descending=[True, False])["row"].to_numpy()


def eligible_mask(cfg: SelectConfig, files: list[str], parts: list[dict]) -> np.ndarray:
    """Documents not of a `drop_sources` source (all of them when it is empty)."""
    if not cfg.drop_sources:
        return np.ones(sum(len(p["id"]) for p in parts), bool)
    for path, p in zip(files, parts):
        if p["source"] is None:
            raise StageError(f"select: drop_sources needs a source column; {path} has none")
    return ~np.isin(np.concatenate([p["source"] for p in parts]).astype(str), cfg.drop_sources)


def select(cfg: SelectConfig, inputs: dict[str, Artifact], ctx: StageContext) -> dict:
    files = document_shards(inputs["documents"], "select")
    tokenizer = None
    if cfg.unit == "tokens":
        if "tokenizer" not in inputs:
            raise StageError("select: unit tokens needs a 'tokenizer' input")
        tokenizer = inputs["tokenizer"].path
    parts = ctx.map(_shard_sizes, files, tokenizer=tokenizer)
    docs = pl.DataFrame({
        "id": [i for p in parts for i in p["id"]],
        "chars": np.concatenate([p["chars"] for p in parts]),
    }, schema_overrides={"id": pl.String})
    sizes = np.concatenate([p["tokens"] for p in parts]) if tokenizer else docs["chars"].to_numpy()

    eligible = eligible_mask(cfg, files, parts)
    keep = np.zeros(len(docs), bool)
    budget = None
    if cfg.method == "none":
        keep = eligible.copy()
    elif cfg.method == "quality":
        for path, p in zip(files, parts):
            if p["quality_kept"] is None:
                raise StageError(f"select: method quality needs a quality_kept column (quality stage output); {path} has none")
        keep = np.concatenate([p["quality_kept"] for p in parts]).astype(bool) & eligible
    else:
        order = ranking(cfg, docs, inputs)
        order = order[eligible[order]]
        keep[order[:budget_prefix(sizes[order], cfg.fraction)]] = True
        budget = cfg.fraction * float(sizes[eligible].sum())

    # why each dropped document went: its source, the quality filter, or the budget
    reason = np.where(~eligible, "dropped_source", "quality_filter" if cfg.method == "quality" else "over_budget")
    bounds = np.cumsum([0, *(len(p["id"]) for p in parts)])
    write_filtered(files, [Decision(keep[a:b], np.where(keep[a:b], None, reason[a:b]).tolist())
                           for a, b in zip(bounds[:-1], bounds[1:])], ctx.out)

    chars = docs["chars"].to_numpy()
    metrics = {
        "docs_in": len(docs), "docs_kept": int(keep.sum()), "docs_dropped_by_source": int((~eligible).sum()),
        "chars_in": int(chars.sum()), "chars_kept": int(chars[keep].sum()),
        "kept_char_fraction": float(chars[keep].sum() / max(1, chars.sum())),
        "units_in": int(sizes.sum()), "units_kept": int(sizes[keep].sum()),
    }
    if budget is not None:
        metrics["budget"] = budget
    return {"rows": {"documents": metrics["docs_kept"]}, "metrics": metrics}


STAGE = Stage("select", VERSION, SelectConfig, select, report_metrics=("docs_kept", "chars_kept", "kept_char_fraction"))
select_task = stage_task(STAGE)
