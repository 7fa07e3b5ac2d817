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

Memory: each shard gives a few numbers per document (id, sizes, flags, rank key) to a duckdb
table that spills to disk past `memory_limit`; the ranking is a query on it, and each shard's
decision is read back when that shard is written, so no step holds the corpus.

Output `documents` (the kept rows, same schema, one shard per input shard with the same
names, possibly empty) and `dropped` (reason `dropped_source`, `quality_filter` or `over_budget`). Metrics: a
filter's (tasks.core.filters; `dropped.dropped_source` counts what `drop_sources` removed), and
units_in/units_kept/budget in the chosen unit.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Literal

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from tasks.core.filters import Decision, filter_documents
from tasks.core.outputs import document_shards
from tasks.core.settings import runtime
from tasks.core.stage import MEMORY_SIZE, Stage, StageConfig, StageContext, StageError
from tasks.core.store import Artifact, read_schema, read_table
from tasks.core.tokens import doc_hash, load_tokenizer

VERSION = 2  # 2: a dropped table (tasks.core.filters)


class SelectConfig(StageConfig):
    method: Literal["preselect", "quality", "random", "none"] = Field(
        "preselect", description="ranking: preselect score, seeded random, quality filter pass-through, or none")
    fraction: float = Field(0.5, gt=0, le=1, description="budget: this share of the total size (preselect, random)")
    unit: Literal["chars", "tokens"] = Field("chars", description="size of a document: characters, or tokens (needs a tokenizer input)")
    seed: int = Field(0, description="seed of the random ranking")
    drop_sources: list[str] = Field(default_factory=list, description="drop documents of these sources before selecting (a data mixture)")
    memory_limit: str = runtime("1GB", "duckdb's memory for the ranking of every document; it spills to disk past it",
                                pattern=MEMORY_SIZE)


def budget_prefix(sizes: np.ndarray, fraction: float) -> int:
    """How many ranked documents to keep: the shortest prefix whose total >= fraction * total."""
    cum = np.cumsum(np.asarray(sizes, np.float64))
    if not len(cum):
        return 0
    budget = fraction * cum[-1]
    return min(len(cum), int(np.searchsorted(cum, budget, side="left")) + 1)


def shard_view(path: str, tokenizer: str | None, seed: int | None, drop_sources: list[str]) -> dict:
    """One shard (mapped over workers): per document a few numbers for the global ranking (row, id,
    size in the unit, eligible, quality flag, random rank key when a `seed` is given), and
    which optional columns the shard has."""
    schema = read_schema(path)
    optional = [c for c in ("quality_kept", "source") if c in schema.names]
    table = read_table(path, columns=["id", "text", *optional])
    sizes = pc.utf8_length(table["text"]).cast(pa.int64())
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        tok.encode_special_tokens = True  # as pack encodes documents
        encoded = tok.encode_batch_fast(table["text"].to_pylist())
        sizes = pa.array([len(e.ids) + 1 for e in encoded], pa.int64())  # + <|bos|>
    eligible = (pc.invert(pc.is_in(table["source"], pa.array(drop_sources, pa.string())))
                if drop_sources and "source" in optional else pa.repeat(True, len(table)))
    view = pa.table({
        "row": pa.array(np.arange(len(table), dtype=np.int64)), "id": table["id"], "size": sizes,
        "eligible": eligible,
        "quality_kept": table["quality_kept"] if "quality_kept" in optional else pa.nulls(len(table), pa.bool_()),
        # the random method's order: the hash tokenizer and pack split by, independent of sharding
        "rank_key": doc_hash(table["id"].to_pylist(), seed) if seed is not None else pa.nulls(len(table), pa.uint64()),
    })
    return {"view": view, "columns": optional}


class Ranking:
    """Every document's few numbers in one duckdb table (it spills to disk past `memory_limit`), the
    global ranking as a query on it, and each shard's decision read back one shard at a time."""

    def __init__(self, work: Path, memory_limit: str):
        (work / "duckdb").mkdir(parents=True, exist_ok=True)
        self.con = duckdb.connect()
        self.con.execute(f"SET memory_limit = '{memory_limit}'")
        self.con.execute(f"SET temp_directory = '{work / 'duckdb'}'")
        self.con.execute("CREATE TABLE docs (shard INTEGER, row BIGINT, id VARCHAR, size BIGINT, "
                         "eligible BOOLEAN, quality_kept BOOLEAN, rank_key UBIGINT)")

    def add(self, shard: int, view: pa.Table) -> None:
        self.con.execute("INSERT INTO docs SELECT ? AS shard, * FROM view", [shard])

    def one(self, query: str, params: list | None = None) -> tuple:
        return self.con.execute(query, params or []).fetchone()

    def add_scores(self, artifact: Artifact) -> None:
        """The preselect scores, one file at a time; a document scored twice is an error."""
        files = artifact.files("scores")
        if not files:
            raise StageError(f"select: input 'scores' ({artifact.stage}/{artifact.key}) has no scores/*.parquet shards")
        self.con.execute("CREATE TABLE scores (n BIGINT, doc_id VARCHAR, preselect_score DOUBLE)")
        n = 0
        for f in files:
            part = read_table(f, columns=["doc_id", "preselect_score"])
            part = part.add_column(0, "n", pa.array(np.arange(n, n + len(part), dtype=np.int64)))
            self.con.execute("INSERT INTO scores SELECT * FROM part")
            n += len(part)
        dup = self.one("SELECT doc_id FROM scores GROUP BY doc_id HAVING count(*) > 1 ORDER BY min(n) LIMIT 1")
        if dup:
            raise StageError(f"select: input 'scores' holds document {dup[0]} more than once")
        missing = self.one("SELECT count(*) FROM docs ANTI JOIN scores ON id = doc_id")[0]
        if missing:
            first = self.one("SELECT id FROM docs ANTI JOIN scores ON id = doc_id ORDER BY shard, row LIMIT 1")[0]
            raise StageError(f"select: document {first} has no preselect_score in input 'scores' "
                             f"({missing} documents without one)")

    def decide(self, cfg: SelectConfig) -> float | None:
        """Table `decided` (shard, row, size, eligible, keep); returns the budget when the method has one."""
        budget, keep, params = None, "eligible", []
        if cfg.method == "quality":
            keep = "eligible AND coalesce(quality_kept, false)"
        elif cfg.method in ("random", "preselect"):
            budget = cfg.fraction * float(self.one("SELECT coalesce(sum(size), 0) FROM docs WHERE eligible")[0])
            order = "rank_key, id" if cfg.method == "random" else "preselect_score DESC, id"
            # kept: the shortest prefix of the eligible ranking whose size reaches the budget, i.e. each
            # eligible document whose predecessors' sizes add up to less than it (budget_prefix's rule)
            keep = (f"eligible AND coalesce(sum(CASE WHEN eligible THEN size ELSE 0 END) OVER (ORDER BY {order} "
                    "ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) < CAST(? AS DOUBLE)")
            params = [budget]
        scores = "LEFT JOIN scores ON id = doc_id" if cfg.method == "preselect" else ""
        self.con.execute(f"CREATE TABLE decided AS SELECT shard, row, size, eligible, {keep} AS keep "
                         f"FROM docs {scores} ORDER BY shard, row", params)
        return budget

    def decisions(self, shards: int, dropped: str) -> Iterator[Decision]:
        """Each shard's decision in shard order, read when `filter_documents` asks for it."""
        for shard in range(shards):
            got = self.con.execute("SELECT keep, eligible FROM decided WHERE shard = ? ORDER BY row", [shard]).fetchnumpy()
            keep = got["keep"].astype(bool)
            reason = np.where(keep, None, np.where(got["eligible"].astype(bool), dropped, "dropped_source"))
            yield Decision(keep, reason.tolist())


def select(cfg: SelectConfig, inputs: dict[str, Artifact], ctx: StageContext) -> dict:
    files = document_shards(inputs["documents"], "select")
    tokenizer = None
    if cfg.unit == "tokens":
        if "tokenizer" not in inputs:
            raise StageError("select: unit tokens needs a 'tokenizer' input")
        tokenizer = inputs["tokenizer"].path
    work = Path(tempfile.mkdtemp(prefix="select-", dir=ctx.work_dir()))
    ranking = Ranking(work, cfg.memory_limit)
    try:
        columns = []
        views = ctx.map_bounded(shard_view, files, tokenizer=tokenizer, seed=cfg.seed if cfg.method == "random" else None,
                                drop_sources=list(cfg.drop_sources))
        for shard, (path, part) in enumerate(zip(files, views)):
            ranking.add(shard, part["view"])
            columns.append((path, part["columns"]))
        for path, have in columns:
            if cfg.drop_sources and "source" not in have:
                raise StageError(f"select: drop_sources needs a source column; {path} has none")
        if cfg.method == "quality":
            for path, have in columns:
                if "quality_kept" not in have:
                    raise StageError(f"select: method quality needs a quality_kept column (quality stage output); "
                                     f"{path} has none")
        if cfg.method == "preselect":
            if "scores" not in inputs:
                raise StageError("select: method preselect needs a 'scores' input (a preselect output)")
            ranking.add_scores(inputs["scores"])
        budget = ranking.decide(cfg)
        # why each dropped document went: its source, the quality filter, or the budget
        dropped = "quality_filter" if cfg.method == "quality" else "over_budget"
        metrics = filter_documents(ctx, files, ranking.decisions(len(files), dropped), ["dropped_source", dropped]).metrics
        units = ranking.one("SELECT coalesce(sum(size), 0), coalesce(sum(size) FILTER (keep), 0) FROM decided")
    finally:
        ranking.con.close()
        shutil.rmtree(work, ignore_errors=True)
    metrics.update(units_in=int(units[0]), units_kept=int(units[1]))
    if budget is not None:
        metrics["budget"] = budget
    return {"rows": {"documents": metrics["docs_kept"]}, "metrics": metrics}


STAGE = Stage("select", VERSION, SelectConfig, select, report_metrics=("docs_kept", "chars_kept", "kept_char_fraction"))
