"""Readers of stage outputs that other stages consume: documents shards, prompts, pass rates, packed tokens,
and the layout of a training stage's model (`model/`: weights, config and tokenizer).

A stage reads another stage's output only through these (or `Artifact.files`), so the producing
stage module is never imported by a consumer: the table layout is the contract between them.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from pathlib import Path

from tasks.core.base import StageError
from tasks.core.configs import ModelConfig
from tasks.core.store import Artifact, local_dir, read_table, read_text

PROMPT_SPLITS = ("train", "eval")
TOKEN_SPLITS = ("train", "val")
MODEL_DIR = "model"  # in a training stage's output: model.safetensors, config.json, tokenizer.json


def model_dir(artifact: Artifact) -> str:
    """Where a training-stage output keeps its model (a URI for a remote store)."""
    return f"{artifact.path.rstrip('/')}/{MODEL_DIR}"


def local_model_dir(artifact: Artifact) -> Path:
    """A training-stage output's model as a local directory (a remote store's is copied here once)."""
    return local_dir(model_dir(artifact))


def model_config(artifact: Artifact) -> ModelConfig:
    """The shape of a training-stage output's model, read without loading its weights."""
    return ModelConfig.model_validate_json(read_text(f"{model_dir(artifact)}/config.json"))


def model_out(out: Path) -> Path:
    """Where a training stage writes its model inside its output directory `out`."""
    return out / MODEL_DIR


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
