"""Readers of stage outputs that other stages consume: documents shards, prompts, pass rates, packed tokens.

A stage reads another stage's output only through these (or `Artifact.files`), so the producing
stage module is never imported by a consumer: the table layout is the contract between them.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from tasks.core.base import StageError
from tasks.core.store import Artifact, read_table

PROMPT_SPLITS = ("train", "eval")
TOKEN_SPLITS = ("train", "val")


def document_shards(artifact: Artifact, stage: str) -> list[str]:
    """The `documents` shards of an input, or a one-line error naming the stage."""
    files = artifact.files("documents")
    if not files:
        raise StageError(f"{stage}: input 'documents' ({artifact.stage} {artifact.key}) has no documents/*.parquet shards")
    return files


def load_prompts(artifact: Artifact, split: str) -> list[dict]:
    """One split (`train` or `eval`) of a prompts output, as row dicts in stored order: `id`, `task`,
    `difficulty`, `question`, `answer`, `solution`, `metadata` (JSON)."""
    if split not in PROMPT_SPLITS:
        raise ValueError(f"load_prompts: split must be one of {PROMPT_SPLITS}, got {split!r}")
    files = artifact.files(split)
    if not files:
        raise StageError(f"prompts: output {artifact.key} has no {split}/*.parquet shards")
    return [row for f in files for row in read_table(f).to_pylist()]


def load_pass_rates(artifact: Artifact) -> pl.DataFrame:
    """The `pass_rates` table of a difficulty output: `prompt_id`, `task`, `k`, `correct`, `pass_rate`, `kept`."""
    return pl.concat([pl.from_arrow(read_table(p)) for p in artifact.files("pass_rates")])


def kept_ids(artifact: Artifact) -> set[str]:
    """Ids of the prompts a difficulty output kept (inside its band)."""
    return set(load_pass_rates(artifact).filter(pl.col("kept"))["prompt_id"].to_list())


def load_tokens(artifact: Artifact, split: str) -> np.ndarray:
    """All rows of one split (`train` or `val`) of a pack output as one int32 array (n_rows, seq_len + 1)."""
    if split not in TOKEN_SPLITS:
        raise ValueError(f"load_tokens: split must be one of {TOKEN_SPLITS}, got {split!r}")
    width = int(artifact.manifest["metrics"]["seq_len"]) + 1
    arrays = []
    for path in artifact.files(split):
        col = read_table(path, columns=["tokens"])["tokens"]
        arrays += [chunk.flatten().to_numpy().reshape(-1, width) for chunk in col.chunks if len(chunk)]
    return np.concatenate(arrays) if arrays else np.zeros((0, width), np.int32)
