"""Pretrain: packed token rows -> a base model (safetensors), trained by tasks.core.train.

The stage prepares the token arrays in its work directory (which survives a crash, so does
every checkpoint), runs the loop in-process or under torchrun (`nproc`), then writes the final
weights, the tokenizer and the metric history, and logs the model to MLflow.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import polars as pl
from pydantic import Field

from tasks.core.model import ModelConfig
from tasks.core.orchestration import stage_task
from tasks.core.stage import Stage, StageConfig, StageContext, StageError
from tasks.core.store import Artifact, fsync_file, write_parquet
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
    fsync_file(tmp)  # a resumed run trusts what it finds here
    os.replace(tmp, path)


def loss_curve_figure(history: list[dict], title: str):
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
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=title)
    ax.legend()
    fig.tight_layout()
    return fig


def run_training(cfg: TrainConfig, ctx: StageContext, model_cfg: ModelConfig, arrays: dict[str, Path],
                 pad_id: int, tokenizer_json: str, tokens_per_byte: float | None = None,
                 init_from: Artifact | None = None) -> dict:
    """Shared by the training stages: launch the loop, then write model + history and log to MLflow.

    arrays: `train`, `val` (token rows, .npy) and optionally `train_mask`, `val_mask`.
    init_from: the upstream model stage to start from (logged as the run's input model)."""
    spec = TrainSpec(
        cfg=TrainConfig.model_validate(cfg.model_dump(include=set(TrainConfig.model_fields))),
        model=model_cfg, init_from=f"{init_from.path}/model" if init_from else None,
        train_path=str(arrays["train"]), val_path=str(arrays["val"]),
        train_mask_path=str(arrays["train_mask"]) if "train_mask" in arrays else None,
        val_mask_path=str(arrays["val_mask"]) if "val_mask" in arrays else None,
        pad_id=pad_id, tokens_per_byte=tokens_per_byte, out=str(ctx.out / "model"), work=str(ctx.work_dir()),
        mlflow_uri=ctx.tracker.uri if ctx.tracker else None,
        mlflow_experiment=ctx.tracker.experiment if ctx.tracker else None, mlflow_run_id=ctx.run_id,
    )
    try:
        result = launch(spec)
    except (DivergedError, RuntimeError, ValueError) as e:
        raise StageError(f"{ctx.stage}: {e}") from None
    shutil.copy(tokenizer_json, ctx.out / "model" / "tokenizer.json")
    history = result.pop("history")
    # Timings stay out of the stored table (they go to MLflow and the manifest's metrics), so the
    # same config gives the same bytes on CPU.
    table = pl.DataFrame(history).drop("tokens_per_s", "mfu", strict=False)
    write_parquet(table.to_arrow(), ctx.out / "history" / "part-00000.parquet")
    ctx.log_figure(loss_curve_figure(history, ctx.stage), "loss_curve")
    info = {}
    if ctx.tracker and ctx.run_id:
        if init_from and init_from.manifest.get("info", {}).get("mlflow_model_id"):
            ctx.tracker.log_model_input(ctx.run_id, init_from.manifest["info"]["mlflow_model_id"])
        info["mlflow_model_id"] = ctx.tracker.log_model(
            ctx.run_id, ctx.out / "model", ctx.stage, step=result["steps"],
            params={"params": result["params"], **model_cfg.model_dump()})
    metrics = {k: v for k, v in result.items() if v is not None}
    return {"rows": {"history": len(history)}, "metrics": metrics, "info": info}


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
              report_metrics=("val_loss", "val_bpb", "unigram_entropy", "tokens_per_s", "params"))
pretrain_task = stage_task(STAGE)
