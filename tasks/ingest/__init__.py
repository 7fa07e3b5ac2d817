"""Ingest: sources named in config -> a sharded documents table (`id`, `text`, `source`).

Text is NFC-normalized; invalid UTF-8 is replaced (U+FFFD) and counted (the first such
document of each source is named in a log line); documents that are empty after stripping, or
longer than `max_doc_chars`, are dropped and counted. Ids are stable: a hash of the source name
and the item's reference within it (file path, topic, task/seed/index, file/row).

Memory holds one shard of documents (and one batch of a source): the sources stream, and the check
that no id repeats is a duckdb query over each document's id and ref, written beside the shards
(it spills to disk), not a set of every id. File sources log their progress by bytes (MB/s, ETA).
"""

from __future__ import annotations

import hashlib
import shutil
import unicodedata
from collections import Counter
from pathlib import Path

import duckdb
import pyarrow as pa
from pydantic import Field

from tasks.core.settings import runtime
from tasks.ingest.sources import (
    PackageTextsSource,
    PydocSource,
    ReasoningGymSource,
    SourceConfig,
    SourceError,
    StdlibSource,
)
from tasks.core.stage import MEMORY_SIZE, Stage, StageConfig, StageContext, StageError, log
from tasks.core.store import write_parquet

VERSION = 1
SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string())])
REFS = pa.schema([("id", pa.string()), ("source", pa.string()), ("ref", pa.string()), ("own_id", pa.bool_())])


def embedded_corpus() -> list:
    """The default run's corpus: text that is on every machine, no download."""
    return [
        StdlibSource(max_bytes=200_000),  # the CPython standard library's .py files (real near-duplicates)
        PydocSource(),  # the reference topics of the Python docs
        # prose shipped inside installed packages: a Verne novel in reasoning-gym's data (its other .txt
        # files are word lists), IDLE's NEWS/README files and the email package's notes
        PackageTextsSource(packages=["reasoning_gym"], patterns=["data/in_the_year_2889.txt"]),
        PackageTextsSource(name="stdlib_prose", packages=["idlelib", "email"], patterns=["*.txt", "*.rst"]),
        ReasoningGymSource(size=200, seed=1234),  # worked problems from reasoning-gym's generators
    ]


class IngestConfig(StageConfig):
    sources: list[SourceConfig] = Field(default_factory=embedded_corpus, min_length=1,
                                        description="where documents come from (default: the embedded corpus)")
    shard_rows: int = Field(2000, gt=0, description="documents per Parquet shard")
    max_doc_chars: int = Field(10_000_000, gt=0, description="longer documents are dropped and counted "
                               "(dropped_too_long): one pathological line must not stall every stage after it")
    memory_limit: str = runtime("1GB", "duckdb's memory for the check that no id repeats; it spills to disk past it",
                                pattern=MEMORY_SIZE)


def doc_id(source: str, ref: str) -> str:
    return hashlib.sha256(f"{source}\0{ref}".encode()).hexdigest()[:20]


def decode(data: bytes | str) -> tuple[str, bool]:
    """Text and whether invalid UTF-8 had to be replaced."""
    if isinstance(data, str):
        return data, False
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def check(cfg: IngestConfig) -> None:
    try:
        for src in cfg.sources:
            src.check()
    except SourceError as e:
        raise StageError(str(e)) from None


class ShardWriter:
    """Rows into Parquet shards of `rows` rows each: part-00000.parquet, ..."""

    def __init__(self, directory: Path, rows: int, schema: pa.Schema = SCHEMA):
        self.directory, self.rows, self.shards, self.schema = directory, rows, 0, schema
        self.columns: dict[str, list] = {name: [] for name in schema.names}

    def add(self, **doc: str) -> None:
        for name, value in doc.items():
            self.columns[name].append(value)
        if len(self.columns["id"]) >= self.rows:
            self.flush()

    def flush(self) -> None:
        if self.columns["id"]:
            write_parquet(pa.table(self.columns, schema=self.schema), self.directory / f"part-{self.shards:05d}.parquet")
            self.shards += 1
            self.columns = {name: [] for name in self.schema.names}


def first_repeat(refs: Path, memory_limit: str) -> tuple[str, str, str, bool] | None:
    """The first document, in ingest order, whose id an earlier document has: (id, source, ref, own_id)."""
    con = duckdb.connect()
    try:
        con.execute(f"SET memory_limit = '{memory_limit}'")
        con.execute(f"SET temp_directory = '{refs / 'duckdb'}'")
        return con.execute(f"""
            WITH r AS (SELECT * FROM read_parquet('{refs}/*.parquet', filename = true, file_row_number = true)),
                 repeated AS (SELECT id FROM r GROUP BY id HAVING count(*) > 1),
                 nth AS (SELECT *, row_number() OVER (PARTITION BY id ORDER BY filename, file_row_number) AS n
                         FROM r SEMI JOIN repeated USING (id))
            SELECT id, source, ref, own_id FROM nth WHERE n = 2 ORDER BY filename, file_row_number LIMIT 1""").fetchone()
    finally:
        con.close()


def read(src, stats: dict, ctx: StageContext):
    """A source's documents with a progress line: by bytes (rate, ETA) where the source knows its size."""
    docs = src.read(stats)
    total = src.total_bytes()
    if total is None:
        return ctx.progress(docs, src.estimate(), f"{src.kind} documents")
    return ctx.progress(docs, total, f"{src.kind} documents", size=lambda raw: raw.nbytes)


def ingest(cfg: IngestConfig, inputs: dict, ctx: StageContext) -> dict:
    counts: Counter = Counter()
    writer = ShardWriter(ctx.out / "documents", cfg.shard_rows)
    refs = ctx.work_dir() / "refs"
    shutil.rmtree(refs, ignore_errors=True)  # a killed run's
    repeat = None
    try:
        documents = write_documents(cfg, ctx, writer, ShardWriter(refs, cfg.shard_rows, REFS), counts)
        if documents:
            repeat = first_repeat(refs, cfg.memory_limit)
    finally:
        shutil.rmtree(refs, ignore_errors=True)
    if not documents:
        raise StageError("ingest: the configured sources produced no documents")
    if repeat:
        did, source, ref, own_id = repeat
        if own_id:
            raise StageError(f"ingest: id {did!r} ({source}:{ref}) appears twice: a source's id_column must hold unique ids")
        raise StageError(f"ingest: document {source}:{ref} appears twice (a source listed twice?)")
    metrics = dict(sorted(counts.items()))
    metrics.update(
        documents=documents,
        chars=sum(v for k, v in counts.items() if k.startswith("chars.")),
        **{why: sum(v for k, v in counts.items() if k.startswith(f"{why}.")) for why in DROPPED},
        invalid_utf8=sum(v for k, v in counts.items() if k.startswith("invalid_utf8.")),
        shards=writer.shards,
    )
    return {"rows": {"documents": documents}, "metrics": metrics}


# why a row or file of a source did not become a document: null text, blank text, over max_doc_chars, a
# file over the source's max_bytes
DROPPED = ("dropped_null", "dropped_empty", "dropped_too_long", "dropped_too_large")


def source_summary(source: str, counts: Counter) -> str:
    """`source S: N documents; dropped: 40 null, 3 empty` (every row that did not become a document, and why)."""
    dropped = [f"{counts[f'{why}.{source}']:,} {why.removeprefix('dropped_').replace('_', ' ')}"
               for why in DROPPED if counts[f"{why}.{source}"]]
    return f"source {source}: {counts[f'docs.{source}']:,} documents; dropped: {', '.join(dropped) or 'none'}"


def write_documents(cfg: IngestConfig, ctx: StageContext, writer: ShardWriter, refs: ShardWriter, counts: Counter) -> int:
    """Every source's documents into `writer`'s shards (and each one's id and ref into `refs`); returns
    how many. Holds one shard of documents at a time."""
    documents = 0
    for src in cfg.sources:
        stats: dict[str, int] = {}
        try:
            for raw in read(src, stats, ctx):
                text, replaced = decode(raw.data)
                if replaced and not counts[f"invalid_utf8.{raw.source}"]:
                    log.warning("ingest: %s:%s is not valid UTF-8: bad bytes replaced with U+FFFD (counted as "
                                "invalid_utf8.%s)", raw.source, raw.ref, raw.source)
                counts[f"invalid_utf8.{raw.source}"] += replaced
                if len(text) > cfg.max_doc_chars:
                    log.warning("ingest: %s:%s has %s characters, over ingest.max_doc_chars (%s): dropped",
                                raw.source, raw.ref, f"{len(text):,}", f"{cfg.max_doc_chars:,}")
                    counts[f"dropped_too_long.{raw.source}"] += 1
                    continue
                text = unicodedata.normalize("NFC", text)
                if not text.strip():
                    counts[f"dropped_empty.{raw.source}"] += 1
                    continue
                did = raw.id if raw.id is not None else doc_id(raw.source, raw.ref)
                writer.add(id=did, text=text, source=raw.source)
                refs.add(id=did, source=raw.source, ref=raw.ref, own_id=raw.id is not None)
                documents += 1
                counts[f"docs.{raw.source}"] += 1
                counts[f"chars.{raw.source}"] += len(text)
        except SourceError as e:
            raise StageError(str(e)) from None
        counts.update({f"{k}.{src.source}": v for k, v in stats.items()})
        log.info("ingest: %s", source_summary(src.source, counts))
    writer.flush()
    refs.flush()
    return documents


STAGE = Stage("ingest", VERSION, IngestConfig, ingest, check=check,
              report_metrics=("chars", *DROPPED, "invalid_utf8", "shards"))
