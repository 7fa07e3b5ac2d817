"""Pretrain: packed token rows -> a base model (safetensors), trained by tasks.core.train.

The stage prepares the token arrays in its work directory (which survives a crash, so does
every checkpoint), runs the loop in-process or under torchrun (`nproc`), then writes the final
weights, the tokenizer and the metric history, and logs the model to MLflow.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import polars as pl
from pydantic import Field

from tasks.core.model import ModelConfig
from tasks.core.orchestration import stage_task
from tasks.core.stage import Stage, StageConfig, StageContext, StageError
from tasks.core.store import Artifact, write_parquet
from tasks.core.train import DivergedError, TrainConfig, TrainSpec, launch
from tasks.pack import load_tokens
from tasks.tokenizer import tokenizer_path

VERSION = 1


class PretrainConfig(StageConfig, TrainConfig):
    model: ModelConfig = Field(default_factory=ModelConfig, description="size: depth (width follows) + overrides")


def unigram_entropy(rows: np.ndarray, pad_id: int) -> float:
    """Entropy (nats/token) of the token distribution: the loss of the best context-free model."""
    counts = np.bincount(rows[:, 1:].ravel())
    counts[pad_id] = 0
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def save_array(path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def loss_curve_figure(history: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="pretraining")
    ax.legend()
    fig.tight_layout()
    return fig


def train_stage(cfg, inputs: dict[str, Artifact], ctx: StageContext, init_from: str | None = None) -> dict:
    """Shared by the training stages: prepare arrays, launch, write model + history, log to MLflow."""
    packed, tok = inputs["packed"], inputs["tokenizer"]
    meta = packed.manifest["metrics"]
    work = ctx.work_dir()
    arrays = {}
    for split in ("train", "val"):
        arrays[split] = work / f"{split}.npy"
        if not arrays[split].exists():
            save_array(arrays[split], load_tokens(packed, split))
    train_rows = np.load(arrays["train"], mmap_mode="r")
    if len(train_rows) < cfg.batch_size:
        raise StageError(f"{ctx.stage}: batch_size {cfg.batch_size} exceeds the {len(train_rows)} packed training rows")
    model_cfg = cfg.model.model_copy(update={"vocab_size": meta["vocab_size"], "max_seq_len": meta["seq_len"]})
    spec = TrainSpec(
        cfg=TrainConfig.model_validate(cfg.model_dump(include=set(TrainConfig.model_fields))),
        model=model_cfg, init_from=init_from, train_path=str(arrays["train"]), val_path=str(arrays["val"]),
        pad_id=meta["pad_id"], tokens_per_byte=meta["val_targets"] / max(1, meta["val_bytes"]),
        out=str(ctx.out / "model"), work=str(work),
        mlflow_uri=ctx.tracker.uri if ctx.tracker else None,
        mlflow_experiment=ctx.tracker.experiment if ctx.tracker else None, mlflow_run_id=ctx.run_id,
    )
    try:
        result = launch(spec)
    except (DivergedError, RuntimeError, ValueError) as e:
        raise StageError(f"{ctx.stage}: {e}") from None
    shutil.copy(tokenizer_path(tok), ctx.out / "model" / "tokenizer.json")
    history = result.pop("history")
    # Timings stay out of the stored table (they go to MLflow and the manifest's metrics), so the
    # same config gives the same bytes on CPU.
    table = pl.DataFrame(history).drop("tokens_per_s", "mfu", strict=False)
    write_parquet(table.to_arrow(), ctx.out / "history" / "part-00000.parquet")
    ctx.log_figure(loss_curve_figure(history), "loss_curve")
    if ctx.tracker and ctx.run_id:
        ctx.tracker.log_model(ctx.run_id, ctx.out / "model", ctx.stage, step=result["steps"],
                              params={"params": result["params"], **model_cfg.model_dump()})
    metrics = {k: v for k, v in result.items() if v is not None}
    metrics["unigram_entropy"] = unigram_entropy(np.asarray(train_rows), meta["pad_id"])
    metrics["tokens_seen"] = result["steps"] * cfg.batch_size * meta["seq_len"]
    return {"rows": {"history": len(history)}, "metrics": metrics}


def pretrain(cfg: PretrainConfig, inputs: dict[str, Artifact], ctx: StageContext) -> dict:
    return train_stage(cfg, inputs, ctx)


def check(cfg: PretrainConfig) -> None:
    per_step = cfg.nproc * cfg.grad_accum
    if cfg.batch_size % per_step:
        raise StageError(f"pretrain.batch_size {cfg.batch_size} must divide by nproc x grad_accum = {per_step}")
    if cfg.warmup_steps >= cfg.max_steps:
        raise StageError(f"pretrain.warmup_steps {cfg.warmup_steps} must be below max_steps {cfg.max_steps}")


STAGE = Stage("pretrain", VERSION, PretrainConfig, pretrain, store="models", check=check,
              report_metrics=("val_loss", "val_bpb", "unigram_entropy", "tokens_per_s", "params"))
pretrain_task = stage_task(STAGE)
