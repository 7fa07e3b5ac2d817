"""Ingest: sources named in config -> a sharded documents table (`id`, `text`, `source`).

Text is NFC-normalized; invalid UTF-8 is replaced (U+FFFD) and counted (the first such
document of each source is named in a log line); documents that are empty after stripping, or
longer than `max_doc_chars`, are dropped and counted. Ids are stable: a hash of the source name
and the item's reference within it (file path, topic, task/seed/index, file/row).
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections import Counter
from pathlib import Path

import pyarrow as pa
from pydantic import Field

from tasks.core.orchestration import stage_task
from tasks.core.sources import (
    PackageTextsSource,
    PydocSource,
    ReasoningGymSource,
    SourceConfig,
    SourceError,
    StdlibSource,
)
from tasks.core.stage import Stage, StageConfig, StageContext, StageError, log
from tasks.core.store import write_parquet

VERSION = 1
SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string())])


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
    """Documents into Parquet shards of `rows` documents each: part-00000.parquet, ..."""

    def __init__(self, directory: Path, rows: int):
        self.directory, self.rows, self.shards = directory, rows, 0
        self.columns: dict[str, list] = {name: [] for name in SCHEMA.names}

    def add(self, **doc: str) -> None:
        for name, value in doc.items():
            self.columns[name].append(value)
        if len(self.columns["id"]) >= self.rows:
            self.flush()

    def flush(self) -> None:
        if self.columns["id"]:
            write_parquet(pa.table(self.columns, schema=SCHEMA), self.directory / f"part-{self.shards:05d}.parquet")
            self.shards += 1
            self.columns = {name: [] for name in SCHEMA.names}


def ingest(cfg: IngestConfig, inputs: dict, ctx: StageContext) -> dict:
    check(cfg)
    counts: Counter = Counter()
    writer = ShardWriter(ctx.out / "documents", cfg.shard_rows)
    seen: set[str] = set()
    for src in cfg.sources:
        stats: dict[str, int] = {}
        try:
            for raw in ctx.progress(src.read(stats), src.estimate(), f"{src.kind} documents"):
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
                if did in seen:
                    if raw.id is not None:
                        raise StageError(f"ingest: id {did!r} ({raw.source}:{raw.ref}) appears twice: a source's "
                                         f"id_column must hold unique ids")
                    raise StageError(f"ingest: document {raw.source}:{raw.ref} appears twice (a source listed twice?)")
                seen.add(did)
                writer.add(id=did, text=text, source=raw.source)
                counts[f"docs.{raw.source}"] += 1
                counts[f"chars.{raw.source}"] += len(text)
        except SourceError as e:
            raise StageError(str(e)) from None
        counts.update({f"{k}.{src.source}": v for k, v in stats.items()})
    writer.flush()
    if not seen:
        raise StageError("ingest: the configured sources produced no documents")
    metrics = dict(sorted(counts.items()))
    metrics.update(
        documents=len(seen),
        chars=sum(v for k, v in counts.items() if k.startswith("chars.")),
        dropped_empty=sum(v for k, v in counts.items() if k.startswith("dropped_empty.")),
        dropped_too_long=sum(v for k, v in counts.items() if k.startswith("dropped_too_long.")),
        invalid_utf8=sum(v for k, v in counts.items() if k.startswith("invalid_utf8.")),
        shards=writer.shards,
    )
    return {"rows": {"documents": len(seen)}, "metrics": metrics}


STAGE = Stage("ingest", VERSION, IngestConfig, ingest, check=check,
              report_metrics=("chars", "dropped_empty", "dropped_too_long", "invalid_utf8", "shards"))
ingest_task = stage_task(STAGE)
