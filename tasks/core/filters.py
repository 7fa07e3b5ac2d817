"""A documents filter states only its decision; `filter_documents` owns the rest (datatrove's model).

A filter stage (dedup, decontaminate, quality, select) decides, per input shard of `documents`,
which rows to keep, why each other row goes (one short reason, e.g. `near_duplicate` or a rule
name), and which columns to add to the kept rows: a `Decision`. `filter_documents` owns the loop,
the progress lines, the writing and the counting. A decision made shard by shard is a function
of one shard, mapped over workers a window of shards at a time (`StageContext.map_bounded`), each
worker writing its shard and sending back only counts; a stage that decides globally (dedup,
select) hands a lazy sequence of decisions instead, read one shard at a time. Either way each
shard's kept rows go to `documents/` under the shard's own name (possibly empty) and every
dropped document goes to `dropped/` with its reason (`doc_id`, `source`, `reason`), so what a
filter removed, and why, is one query away; memory is bounded by the shards in flight.

Every filter stage reports the same metrics, to which it adds only its own numbers: docs_in,
docs_kept, docs_dropped, chars_in, chars_kept, chars_dropped, kept_doc_fraction,
kept_char_fraction, `dropped.<reason>` for each reason the stage gives (0 when none went), and
per source `docs_in.<source>` and `docs_kept.<source>`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.core.shared_scratch import scratch_files, step_reads
from tasks.core.store import read_table, write_parquet

if TYPE_CHECKING:
    from tasks.core.stage import StageContext

DROPPED_SCHEMA = pa.schema([("doc_id", pa.string()), ("source", pa.string()), ("reason", pa.string())])
TOTALS = ("docs_in", "docs_kept", "chars_in", "chars_kept")


@dataclass
class Decision:
    """One shard's decision: `keep` per document in order; `reason` per document (None where kept), or
    one reason for every dropped document; `columns` added to the shard's documents (kept rows
    written with them; a column of that name already there is replaced); `extra`: anything small the
    shard gives back to the stage besides its counts (decontaminate: its matches)."""

    keep: np.ndarray
    reason: Sequence[str | None] | str
    columns: dict[str, pa.Array] = field(default_factory=dict)
    extra: Any = None

    def reasons(self) -> list[str | None]:
        if isinstance(self.reason, str):
            return [None if k else self.reason for k in self.keep]
        return list(self.reason)


@dataclass
class Filtered:
    """What `filter_documents` returns: the metrics every filter reports, and each shard's `Decision.extra`."""

    metrics: dict[str, int | float]
    extras: list


def filter_documents(ctx: StageContext, files: list[str], decide: Callable[..., Decision] | Iterable[Decision],
                     reasons: Iterable[str], **common: Any) -> Filtered:
    """Filter every shard of `files` into `ctx.out` and count.

    decide: `decide(path, table, **common) -> Decision`, one shard's decision, mapped over workers (a
    window of shards at a time; it runs where the shard is read and written), or the decisions
    themselves in the order of `files` (lazy: each is asked for when its shard is written).
    reasons: every reason the filter gives; another one is an error."""
    if callable(decide):
        done = ctx.map_bounded(decide_shard, files, decide=decide, out=ctx.out, common=common)
    else:
        done = ((filter_shard(path, d, ctx.out), d.extra) for path, d in zip(files, decide, strict=True))
    counts: Counter = Counter()
    extras = []
    for shard_counts, extra in ctx.progress(done, len(files), "shards filtered"):
        counts.update(shard_counts)
        extras.append(extra)
    return Filtered(filter_metrics(counts, list(reasons)), extras)


# it reads what `decide` reads, not the shards already written to `out`
@scratch_files(reads=lambda path, decide, common, **_: step_reads(decide, {"path": path, **common}))
def decide_shard(path: str, decide: Callable[..., Decision], out: Path, common: dict) -> tuple[Counter, Any]:
    """One shard on a worker: read it, decide, write it; only its counts and the decision's extra go back."""
    table = read_table(path)
    decision = decide(path, table, **common)
    return filter_shard(path, decision, out, table), decision.extra


def filter_shard(path: str, decision: Decision, out: Path, table: pa.Table | None = None) -> Counter:
    """One shard: its kept rows (with the decision's columns) to `out/documents/<name>`, its dropped rows'
    reasons to `out/dropped/<name>`. Returns its counts: TOTALS, `dropped.<reason>` and per source."""
    table = read_table(path) if table is None else table
    keep = np.asarray(decision.keep, dtype=bool)
    if len(keep) != len(table):
        raise ValueError(f"a decision for {path} covers {len(keep)} of its {len(table)} documents")
    for name, column in decision.columns.items():
        if name in table.column_names:  # a rerun over already-scored documents: the new values win
            table = table.drop_columns(name)
        table = table.append_column(name, column)
    name = path.rsplit("/", 1)[-1]
    kept = table.filter(pa.array(keep))
    write_parquet(kept, out / "documents" / name)
    dropped = table.filter(pa.array(~keep))
    reasons = [r for r, k in zip(decision.reasons(), keep) if not k]
    sources = dropped["source"] if "source" in dropped.column_names else pa.nulls(len(dropped), pa.string())
    write_parquet(pa.table([dropped["id"], sources, pa.array(reasons, pa.string())], schema=DROPPED_SCHEMA),
                  out / "dropped" / name)
    chars = pc.utf8_length(table["text"]).to_numpy(zero_copy_only=False) if len(table) else np.zeros(0, int)
    counts = Counter(dict(zip(TOTALS, (len(table), len(kept), int(chars.sum()), int(chars[keep].sum())))))
    counts.update(f"dropped.{r}" for r in reasons)
    if "source" in table.column_names:
        for prefix, rows in (("docs_in", table), ("docs_kept", kept)):
            counts.update({f"{prefix}.{s}": n for s, n in zip(*_value_counts(rows["source"])) if s is not None})
    return counts


def _value_counts(column: pa.ChunkedArray) -> tuple[list, list]:
    counted = pc.value_counts(column)
    return counted.field("values").to_pylist(), counted.field("counts").to_pylist()


def filter_metrics(counts: Counter, reasons: list[str]) -> dict[str, int | float]:
    """Shards' counts added up into the metrics every filter reports (module docstring), each present."""
    unknown = sorted(k for k in counts if k.startswith("dropped.") and k[len("dropped."):] not in reasons)
    if unknown:
        raise ValueError(f"a decision gave reason {unknown[0][len('dropped.'):]!r}, not one of {reasons}")
    docs_in, docs_kept, chars_in, chars_kept = (counts[k] for k in TOTALS)
    sources = sorted(k[len("docs_in."):] for k in counts if k.startswith("docs_in."))
    return {
        "docs_in": docs_in, "docs_kept": docs_kept, "docs_dropped": docs_in - docs_kept,
        "chars_in": chars_in, "chars_kept": chars_kept, "chars_dropped": chars_in - chars_kept,
        "kept_doc_fraction": docs_kept / max(1, docs_in), "kept_char_fraction": chars_kept / max(1, chars_in),
        **{f"dropped.{r}": counts[f"dropped.{r}"] for r in reasons},
        **{f"docs_in.{s}": counts[f"docs_in.{s}"] for s in sources},
        **{f"docs_kept.{s}": counts[f"docs_kept.{s}"] for s in sources},  # 0 where a source lost every document
    }
