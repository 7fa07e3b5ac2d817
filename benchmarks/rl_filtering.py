"""Online difficulty filtering: plain GRPO (`filter: none`) against `balanced`, at the same generation cost.

The RL stage runs once per (filter, seed) from the same SFT model with the same settings except
`filter`; each run stops after the same number of generated completions (`--budget`, default:
what plain GRPO samples in `rl.max_steps` steps, i.e. steps x batch_prompts x G). Balanced spends
part of that budget on groups it throws away, so it takes fewer optimizer steps.

The reward of a step is the mean verifier reward over every group drawn that step (kept or not),
so both filters measure the same thing: the policy's reward on the training prompts. Curves are
smoothed with a moving average of `--window` steps before comparing them.

Prints ONE JSON object:
  {"settings": {...},
   "runs": {"none": [{"seed", "steps", "reward", "generated_samples", "eval_pass_at_1": {step: p}}, ...],
            "balanced": [...]},
   "summary": {"plain_best_reward", "plain_steps_to_best", "balanced_steps_to_plain_best",
               "step_fraction", "sample_fraction", "final_eval_pass_at_1": {"none", "balanced"}}}
and writes the reward curves to `--out`/rl_filtering.png.

  python benchmarks/rl_filtering.py                       # default config, seeds 0 1
  python benchmarks/rl_filtering.py --config configs/tiny.yaml --seeds 0
Upstream stages (prompts, pretrain, SFT) come from the config's store; missing ones are computed
first with the pipeline (`slmflow run --only sft`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flows.config import load_config  # noqa: E402
from flows.pipeline import make_plan  # noqa: E402
from tasks import rl  # noqa: E402
from tasks.core.stage import run_stage  # noqa: E402
from tasks.core.store import Store  # noqa: E402


def upstream(args):
    """(config, {"model": SFT artifact, "prompts": prompts artifact}), computing them if missing."""
    cfg = load_config(args.config, args.set)
    plan = make_plan(cfg)
    data, models = Store(cfg.run.data_root), Store(cfg.run.models_root)
    sft, prompts = plan.stages["sft"], plan.stages["prompts"]
    if models.get("sft", sft.key) is None:
        from flows.pipeline import pipeline

        pipeline(cfg.model_dump(mode="json"), ["sft"])
    return cfg, {"model": models.get("sft", sft.key), "prompts": data.get("prompts", prompts.key)}


def smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    c = np.cumsum(np.insert(x, 0, 0.0))
    n = np.minimum(np.arange(1, len(x) + 1), window)
    return (c[1:] - c[np.arange(len(x)) + 1 - n]) / n


def run_one(cfg, inputs, filter_: str, seed: int, budget: int, store: Store) -> dict:
    rl_cfg = cfg.rl.model_copy(update={"filter": filter_, "seed": seed, "max_steps": 10 * cfg.rl.max_steps,
                                       "max_generated_samples": budget})
    out = run_stage(rl.STAGE, rl.RLConfig.model_validate(rl_cfg.model_dump()), inputs, store, force=True)
    steps = pl.read_parquet(f"{out.artifact.path}/steps/part-00000.parquet").sort("step")
    trained = steps.filter(pl.col("step") > 0)
    evals = steps.filter(pl.col("eval_pass_at_1").is_not_null())
    return {"seed": seed, "steps": int(trained["step"].max()), "reward": trained["reward_mean"].to_list(),
            "generated_samples": trained["generated_samples"].to_list(),
            "eval_pass_at_1": dict(zip(map(str, evals["step"].to_list()), evals["eval_pass_at_1"].to_list()))}


def first_reaching(curve: np.ndarray, level: float) -> int | None:
    hits = np.nonzero(curve >= level - 1e-12)[0]
    return int(hits[0]) + 1 if len(hits) else None


def summarize(runs: dict[str, list[dict]], window: int) -> dict:
    """Seed-averaged smoothed curves (truncated to the shortest run of each filter)."""
    def mean_curve(rs, field):
        n = min(len(r[field]) for r in rs)
        return np.mean([smooth(np.array(r[field][:n], dtype=float), window) if field == "reward"
                        else np.array(r[field][:n], dtype=float) for r in rs], axis=0)

    plain, bal = mean_curve(runs["none"], "reward"), mean_curve(runs["balanced"], "reward")
    plain_samples, bal_samples = mean_curve(runs["none"], "generated_samples"), mean_curve(runs["balanced"], "generated_samples")
    best = float(plain.max())
    plain_at = int(plain.argmax()) + 1
    bal_at = first_reaching(bal, best)
    final = {f: float(np.mean([list(r["eval_pass_at_1"].values())[-1] for r in rs])) for f, rs in runs.items()}
    start = float(np.mean([r["eval_pass_at_1"]["0"] for r in runs["none"]]))
    return {
        "plain_best_reward": best, "plain_steps_to_best": plain_at, "balanced_best_reward": float(bal.max()),
        "balanced_steps_to_plain_best": bal_at,
        "step_fraction": bal_at / plain_at if bal_at else None,
        "sample_fraction": float(bal_samples[bal_at - 1] / plain_samples[plain_at - 1]) if bal_at else None,
        "eval_pass_at_1_start": start, "final_eval_pass_at_1": final,
        "curves": {"none": plain.round(4).tolist(), "balanced": bal.round(4).tolist()},
    }


def plot(runs: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for f, color in (("none", "tab:gray"), ("balanced", "tab:blue")):
        curve = np.array(summary["curves"][f])
        samples = np.mean([r["generated_samples"][: len(curve)] for r in runs[f]], axis=0)
        axes[0].plot(np.arange(1, len(curve) + 1), curve, color=color, label=f)
        axes[1].plot(samples, curve, color=color, label=f)
    for ax, xlabel in zip(axes, ("optimizer step", "completions generated")):
        ax.axhline(summary["plain_best_reward"], ls=":", color="k", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean reward (smoothed)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--set", action="append", default=[], help="stage.field=value override (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--budget", type=int, help="completions per run (default: plain GRPO's rl.max_steps steps)")
    p.add_argument("--window", type=int, default=5, help="moving-average window over steps")
    p.add_argument("--out", default="benchmarks/out")
    args = p.parse_args()
    cfg, inputs = upstream(args)
    budget = args.budget or cfg.rl.max_steps * cfg.rl.batch_prompts * cfg.rl.num_generations
    runs: dict[str, list[dict]] = {"none": [], "balanced": []}
    with tempfile.TemporaryDirectory(prefix="slmflow-rl-bench-") as tmp:
        for seed in args.seeds:
            for f in runs:
                runs[f].append(run_one(cfg, inputs, f, seed, budget, Store(tmp)))
                print(f"{f} seed {seed}: {runs[f][-1]['steps']} steps, final eval pass@1 "
                      f"{list(runs[f][-1]['eval_pass_at_1'].values())[-1]:.3f}", file=sys.stderr)
    summary = summarize(runs, args.window)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(runs, summary, out / "rl_filtering.png")
    settings = {"config": args.config, "overrides": args.set, "seeds": args.seeds, "budget": budget,
                "window": args.window, "rl": cfg.rl.model_dump(mode="json")}
    print(json.dumps({"settings": settings, "runs": runs, "summary": summary}))


if __name__ == "__main__":
    main()
