"""Pretrain: packed token rows -> a base model (safetensors), trained by tasks.core.train.

The stage prepares the token arrays in its work directory (which survives a crash, so does
every checkpoint), runs the loop in-process or under torchrun (`nproc`), then writes the final
weights, the tokenizer and the metric history, and logs the model to MLflow.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from tasks.core.configs import ModelConfig, TrainConfig
from tasks.core.fit import run_training, save_array
from tasks.core.outputs import load_tokens
from tasks.core.stage import Stage, StageConfig, StageContext, StageError
from tasks.core.store import Artifact
from tasks.core.tokens import tokenizer_path

VERSION = 1


class PretrainConfig(StageConfig, TrainConfig):
    model: ModelConfig = Field(default_factory=ModelConfig, description="size: depth (width follows) + overrides")
    eval_rows: int = Field(256, gt=0, description="validation rows per evaluation")


def unigram_entropy(rows: np.ndarray, pad_id: int) -> float:
    """Entropy (nats/token) of the token distribution: the loss of the best context-free model."""
    counts = np.bincount(rows[:, 1:].ravel())
    counts[pad_id] = 0
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def pretrain(cfg: PretrainConfig, inputs: dict[str, Artifact], ctx: StageContext) -> dict:
    packed, tok = inputs["packed"], inputs["tokenizer"]
    meta = packed.manifest["metrics"]
    arrays = {}
    for split in ("train", "val"):
        arrays[split] = ctx.work_dir() / f"{split}.npy"
        if not arrays[split].exists():
            save_array(arrays[split], load_tokens(packed, split))
    train_rows = np.load(arrays["train"], mmap_mode="r")
    if len(train_rows) < cfg.batch_size:
        raise StageError(f"pretrain: batch_size {cfg.batch_size} exceeds the {len(train_rows)} packed training rows")
    model_cfg = cfg.model.model_copy(update={"vocab_size": meta["vocab_size"], "max_seq_len": meta["seq_len"]})
    result = run_training(cfg, ctx, model_cfg, arrays, meta["pad_id"], tokenizer_path(tok),
                          tokens_per_byte=meta["val_targets"] / max(1, meta["val_bytes"]))
    result["metrics"]["unigram_entropy"] = unigram_entropy(np.asarray(train_rows), meta["pad_id"])
    result["metrics"]["tokens_seen"] = result["metrics"]["steps"] * cfg.batch_size * meta["seq_len"]
    return result


def check(cfg: PretrainConfig) -> None:
    per_step = cfg.nproc * cfg.grad_accum
    if cfg.batch_size % per_step:
        raise StageError(f"pretrain.batch_size {cfg.batch_size} must divide by nproc x grad_accum = {per_step}")
    if cfg.warmup_steps >= cfg.max_steps:
        raise StageError(f"pretrain.warmup_steps {cfg.warmup_steps} must be below max_steps {cfg.max_steps}")


STAGE = Stage("pretrain", VERSION, PretrainConfig, pretrain, store="models", family="pretrain", check=check,
              report_metrics=("val_loss", "val_bpb", "residual_growth", "max_attention_logit", "tokens_per_s", "params"))
