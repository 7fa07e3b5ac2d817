"""Difficulty: offline difficulty filtering of a prompt set with the current model: a pass-rate
band keeps the prompts the model solves sometimes, not always or never.

For each prompt (the first `max_prompts_per_task` of each task of `split`, in table order):
k samples at `temperature`, each scored by the task's verifier; a sample is correct on full
credit (reward 1.0). pass_rate = correct / k, and a prompt is kept when it lies strictly inside
the band: low < pass_rate < high (both ends excluded; with the default (0.1, 0.9) a prompt the
model always or never solves is dropped, and so is one at exactly 0.1 or 0.9).

Outputs: `pass_rates` (`prompt_id`, `task`, `k`, `correct`, `pass_rate`, `kept`), one row per
scored prompt, and `samples` (`prompt_id`, `sample`, `completion`, `reward`), one row per sample,
so later stages and reruns reuse the rates without sampling again (`tasks.core.outputs.load_pass_rates`,
`kept_ids`).
"""

from __future__ import annotations

import numpy as np
import polars as pl
from pydantic import Field

from tasks.core.rollout import Sampling, count_overlong, generation_metrics, in_band, prompts_and_policy, score_prompts
from tasks.core.settings import Band, Device, device_setting
from tasks.core.stage import Stage, StageConfig, StageContext, new_figure
from tasks.core.store import Artifact, write_parquet

VERSION = 1


class DifficultyConfig(StageConfig, Sampling):
    split: str = Field("train", description="which prompts table to score")
    k: int = Field(4, ge=1, description="samples per prompt")
    band: Band = Field((0.1, 0.9), description="keep prompts with low < pass_rate < high (strict)")
    max_prompts_per_task: int | None = Field(100, ge=1, description="first N prompts of each task (None: all)")
    device: Device = device_setting()


def pass_rate_figure(table: pl.DataFrame, k: int, band: tuple[float, float]):
    fig, ax = new_figure()
    bottom = np.zeros(k + 1)
    for task in sorted(table["task"].unique().to_list()):
        counts = np.bincount(table.filter(pl.col("task") == task)["correct"].to_numpy(), minlength=k + 1)
        ax.bar(np.arange(k + 1) / k, counts, width=0.8 / k, bottom=bottom, label=task)
        bottom += counts
    ax.axvspan(*band, color="tab:green", alpha=0.1, label=f"kept: {band[0]} < p < {band[1]}")
    kept = int(table["kept"].sum())
    ax.set(xlabel=f"pass rate (correct / {k})", ylabel="prompts",
           title=f"difficulty: {kept} of {len(table)} prompts kept")
    ax.legend(fontsize="small")
    return fig


def difficulty(cfg: DifficultyConfig, inputs: dict[str, Artifact], ctx: StageContext) -> dict:
    rows, model, tok = prompts_and_policy("difficulty", inputs, cfg.split, cfg.max_prompts_per_task, cfg.device)
    overlong = count_overlong(model, tok, rows, cfg.max_completion_length, ctx.instance)
    scored = score_prompts(model, tok, rows, cfg.k, cfg.sampling(), progress=ctx.progress)
    table = scored.table().with_columns(kept=in_band(pl.col("pass_rate"), cfg.band))
    write_parquet(table.to_arrow(), ctx.out / "pass_rates" / "part-00000.parquet")
    samples = scored.samples()
    write_parquet(samples.to_arrow(), ctx.out / "samples" / "part-00000.parquet")

    per_task = table.group_by("task").agg(
        kept_fraction=pl.col("kept").cast(pl.Float64).mean(),
        pass_rate=pl.col("pass_rate").mean(),
        frac_zero=(pl.col("correct") == 0).cast(pl.Float64).mean(),
        frac_one=(pl.col("correct") == pl.col("k")).cast(pl.Float64).mean(),
        prompts=pl.len(),
    ).sort("task")
    metrics: dict[str, float] = {
        "prompts": len(table),
        "kept": int(table["kept"].sum()),
        "kept_fraction": float(table["kept"].mean()),
        "pass_rate": float(table["pass_rate"].mean()),
        "frac_zero": float((table["correct"] == 0).mean()),
        "frac_one": float((table["correct"] == cfg.k).mean()),
    }
    for row in per_task.iter_rows(named=True):
        for m in ("kept_fraction", "pass_rate", "frac_zero", "frac_one", "prompts"):
            metrics[f"{m}.{row['task']}"] = row[m]
    metrics.update(generation_metrics(scored), **overlong)
    ctx.log_figure(pass_rate_figure(table, cfg.k, cfg.band), "pass_rates")
    return {"rows": {"pass_rates": len(table), "samples": len(samples)}, "metrics": metrics}


STAGE = Stage("difficulty", VERSION, DifficultyConfig, difficulty, family="eval",
              report_metrics=("kept_fraction", "pass_rate", "frac_zero", "frac_one"))
