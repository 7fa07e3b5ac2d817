"""A documents filter states only its decision; `write_filtered` owns the loop (datatrove's model).

A filter stage (dedup, decontaminate, quality, select) decides, per input shard of `documents`,
which rows to keep, why each other row goes (one short reason, e.g. `near_duplicate` or a rule
name), and which columns to add to the kept rows. `write_filtered` then streams the shards one at
a time: each shard's kept rows go to `documents/` under the shard's own name (possibly empty), and
every dropped document goes to `dropped/` with its reason (`doc_id`, `source`, `reason`), so what a
filter removed, and why, is one query away. It returns the counts every filter reports.
A stage whose decision is made shard by shard calls `filter_shard` inside its mapped shard function
instead, so the stage holds only the counts and memory stays bounded by the shards in flight.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.core.store import read_table, write_parquet

DROPPED_SCHEMA = pa.schema([("doc_id", pa.string()), ("source", pa.string()), ("reason", pa.string())])


@dataclass
class Decision:
    """One shard's decision: `keep` per document in order; `reason` per document (None where kept), or
    one reason for every dropped document; `columns` added to the shard's documents (kept rows
    written with them; a column of that name already there is replaced)."""

    keep: np.ndarray
    reason: Sequence[str | None] | str
    columns: dict[str, pa.Array] = field(default_factory=dict)

    def reasons(self) -> list[str | None]:
        if isinstance(self.reason, str):
            return [None if k else self.reason for k in self.keep]
        return list(self.reason)


def filter_shard(path: str, decision: Decision, out: Path, table: pa.Table | None = None) -> Counter:
    """One shard: its kept rows (with the decision's columns) to `out/documents/<name>`, its dropped rows'
    reasons to `out/dropped/<name>`. Counts as `write_filtered`'s. A mapped shard function calls it
    with the shard it already read (`table`), so that only counts, not rows, go back to the stage."""
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
    counts = Counter({"docs_in": len(table), "docs_out": len(kept), "chars_in": int(chars.sum()),
                      "chars_out": int(chars[keep].sum())})
    counts.update(f"dropped.{r}" for r in reasons)
    return counts


def write_filtered(files: list[str], decisions: Iterable[Decision], out: Path) -> dict[str, int]:
    """Write each shard's kept rows (with the decision's columns) and its dropped rows' reasons, one shard
    at a time: `decisions` may be lazy (read from disk shard by shard), in the order of `files`.
    Returns docs_in, docs_out, chars_in, chars_out and `dropped.<reason>` counts."""
    counts: Counter = Counter()
    for path, decision in zip(files, decisions, strict=True):
        counts.update(filter_shard(path, decision, out))
    return total_counts(counts)


def total_counts(counts: Counter) -> dict[str, int]:
    """Per-shard counts added up, with every count a filter reports present (0 when no shard had any)."""
    return {"docs_in": 0, "docs_out": 0, "chars_in": 0, "chars_out": 0, **counts}
