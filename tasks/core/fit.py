"""The training run every training stage shares: launch the loop, then write the model and its
history into the stage's output and log both to MLflow.

A stage prepares its token arrays (`save_array`, into its work directory, which survives a crash
together with the checkpoints), then calls `run_training`; the loop runs in-process or under
torchrun (`nproc`), resuming from the last checkpoint if there is one. On a remote root the checkpoints
(not the arrays: they are recomputed) are mirrored to the store (`ctx.work_mirror`,
`tasks.core.checkpoint_mirror`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl

from tasks.core.configs import ModelConfig, TrainConfig
from tasks.core.stage import StageContext, StageError, new_figure
from tasks.core.outputs import local_model_dir, model_out
from tasks.core.store import Artifact, copy_file, fsync_file, write_parquet
from tasks.core.tokens import TOKENIZER_FILE


def save_array(path: Path, array: np.ndarray) -> None:
    """Write an array atomically (and durably): a resumed run trusts what it finds."""
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    fsync_file(tmp)
    os.replace(tmp, path)


def loss_curve_figure(history: list[dict], title: str):
    fig, ax = new_figure()
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=title)
    ax.legend()
    return fig


def run_training(cfg: TrainConfig, ctx: StageContext, model_cfg: ModelConfig, arrays: dict[str, Path],
                 pad_id: int, tokenizer_json: str, tokens_per_byte: float | None = None,
                 init_from: Artifact | None = None, segment_bos_id: int | None = None) -> dict:
    """Shared by the training stages: launch the loop, then write model + history and log to MLflow.

    arrays: `train`, `val` (token rows, .npy) and optionally `train_mask`, `val_mask`.
    init_from: the upstream model stage to start from (logged as the run's input model).
    segment_bos_id: keep the packed examples of a row apart, each starting at this token (SFT)."""
    from tasks.core.train import DivergedError, TrainSpec, launch  # torch: only once a stage trains

    spec = TrainSpec(
        cfg=TrainConfig.model_validate(cfg.model_dump(include=set(TrainConfig.model_fields))),
        model=model_cfg, init_from=str(local_model_dir(init_from)) if init_from else None,
        train_path=str(arrays["train"]), val_path=str(arrays["val"]),
        train_mask_path=str(arrays["train_mask"]) if "train_mask" in arrays else None,
        val_mask_path=str(arrays["val_mask"]) if "val_mask" in arrays else None,
        pad_id=pad_id, segment_bos_id=segment_bos_id, tokens_per_byte=tokens_per_byte, out=str(model_out(ctx.out)),
        work=str(ctx.work_dir()), mirror=ctx.work_mirror,
        mlflow_uri=ctx.tracker.uri if ctx.tracker else None,
        mlflow_experiment=ctx.tracker.experiment if ctx.tracker else None, mlflow_run_id=ctx.run_id,
    )
    try:
        result = launch(spec)
    except (DivergedError, RuntimeError, ValueError) as e:
        raise StageError(f"{ctx.stage}: {e}") from None
    copy_file(tokenizer_json, model_out(ctx.out) / TOKENIZER_FILE)
    history = result.pop("history")
    # Timings stay out of the stored table (they go to MLflow and the manifest's metrics), so the
    # same config gives the same bytes on CPU.
    table = pl.DataFrame(history).drop("tokens_per_s", "mfu", strict=False)
    write_parquet(table.to_arrow(), ctx.out / "history" / "part-00000.parquet")
    ctx.log_figure(loss_curve_figure(history, ctx.instance), "loss_curve")
    info = {}
    if ctx.tracker and ctx.run_id:
        if init_from and init_from.manifest.get("info", {}).get("mlflow_model_id"):
            ctx.tracker.log_model_input(ctx.run_id, init_from.manifest["info"]["mlflow_model_id"])
        info["mlflow_model_id"] = ctx.tracker.log_model(
            ctx.run_id, model_out(ctx.out), ctx.instance, step=result["steps"],
            params={"params": result["params"], **model_cfg.model_dump()})
    metrics = {k: v for k, v in result.items() if v is not None}
    return {"rows": {"history": len(history)}, "metrics": metrics, "info": info}
