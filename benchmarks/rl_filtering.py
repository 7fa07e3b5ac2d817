"""Online difficulty filtering: plain GRPO (`filter: none`), DAPO's `mixed` and `balanced`, at equal generation cost.

The RL stage runs once per (filter, seed) from the same SFT model with the same settings except
`filter`; each run stops after the same number of generated completions (`--budget`, default:
what plain GRPO samples in `rl.max_steps` steps, i.e. steps x batch_prompts x G). A filter spends
part of that budget on groups it throws away, so it takes fewer optimizer steps.

The reward of a step is the mean verifier reward over every group drawn that step (kept or not),
so every filter measures the same thing: the policy's reward on the training prompts. Curves are
smoothed with a moving average of `--window` steps and averaged over seeds before comparing them.

Prints ONE JSON object:
  {"settings": {...},
   "runs": {"none": [{"seed", "steps", "reward", "generated_samples", "check_pass_at_1": {step: p}}, ...],
            "mixed": [...], "balanced": [...]},
   "summary": {"plain_best_reward", "plain_steps_to_best", "check_pass_at_1_start",
               "arms": {filter: {"steps", "best_reward", "steps_to_plain_best", "samples_to_plain_best",
                                 "final_eval_pass_at_1", "final_eval_se", "eval_prompts"}},
               "curves": {filter: [...]}}}
and writes the reward curves to `--out`/rl_filtering.png, also logged to MLflow (experiment
`slmflow-benchmarks`, run `rl_filtering`, with the summary as metrics). `final_eval_se` is the
standard error of the seed-mean held-out greedy pass@1: the spread over seeds and the binomial error
of the eval prompts, whichever is larger.

  python benchmarks/rl_filtering.py                       # default config, seeds 0 1 2
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
from tasks.core.outputs import load_prompts  # noqa: E402
from tasks.core.rollout import take_per_task  # noqa: E402
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
    evals = steps.filter(pl.col("check_pass_at_1").is_not_null())
    return {"seed": seed, "steps": int(trained["step"].max()), "reward": trained["reward_mean"].fill_null(strategy="forward").to_list(),  # a step of only carried groups draws nothing
            "generated_samples": trained["generated_samples"].to_list(),
            "check_pass_at_1": dict(zip(map(str, evals["step"].to_list()), evals["check_pass_at_1"].to_list()))}


def first_reaching(curve: np.ndarray, level: float) -> int | None:
    hits = np.nonzero(curve >= level - 1e-12)[0]
    return int(hits[0]) + 1 if len(hits) else None


ARMS = ("none", "mixed", "balanced")


def summarize(runs: dict[str, list[dict]], window: int, eval_prompts: int) -> dict:
    """Seed-averaged smoothed curves (each truncated to its filter's shortest run), and per arm the
    steps and completions it needs to reach plain GRPO's best smoothed reward."""
    def mean_curve(rs, field):
        n = min(len(r[field]) for r in rs)
        return np.mean([smooth(np.array(r[field][:n], dtype=float), window) if field == "reward"
                        else np.array(r[field][:n], dtype=float) for r in rs], axis=0)

    curves = {f: mean_curve(rs, "reward") for f, rs in runs.items()}
    samples = {f: mean_curve(rs, "generated_samples") for f, rs in runs.items()}
    plain = curves["none"]
    best = float(plain.max())
    arms = {}
    for f, rs in runs.items():
        at = first_reaching(curves[f], best)
        finals = np.array([list(r["check_pass_at_1"].values())[-1] for r in rs])
        mean = float(finals.mean())
        seed_se = float(finals.std(ddof=1) / np.sqrt(len(finals))) if len(finals) > 1 else 0.0
        binomial = float(np.sqrt(mean * (1 - mean) / (eval_prompts * len(finals))))
        arms[f] = {"steps": int(np.mean([r["steps"] for r in rs])), "best_reward": float(curves[f].max()),
                   "steps_to_plain_best": at, "samples_to_plain_best": float(samples[f][at - 1]) if at else None,
                   "final_eval_pass_at_1": mean, "final_eval_se": max(seed_se, binomial),
                   "eval_prompts": eval_prompts}
    return {
        "plain_best_reward": best, "plain_steps_to_best": int(plain.argmax()) + 1,
        "check_pass_at_1_start": float(np.mean([r["check_pass_at_1"]["0"] for r in runs["none"]])),
        "arms": arms, "curves": {f: c.round(4).tolist() for f, c in curves.items()},
    }


def plot(runs: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for f, color in zip(runs, ("tab:gray", "tab:orange", "tab:blue")):
        curve = np.array(summary["curves"][f])
        samples = np.mean([r["generated_samples"][: len(curve)] for r in runs[f]], axis=0)
        axes[0].plot(np.arange(1, len(curve) + 1), curve, color=color, label=f)
        axes[1].plot(samples, curve, color=color, label=f)
    for ax, xlabel in zip(axes, ("optimizer step", "completions generated")):
        ax.axhline(summary["plain_best_reward"], ls=":", color="k", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean reward (smoothed, seed mean)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def log_to_mlflow(cfg, summary: dict, settings: dict, png: Path) -> str:
    """The comparison as an MLflow run beside the pipeline's (same tracking store): plot + figures."""
    import mlflow

    from tasks.core.lineage import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(cfg.run.mlflow_uri))
    mlflow.set_experiment("slmflow-benchmarks")
    with mlflow.start_run(run_name="rl_filtering") as run:
        mlflow.log_params({"seeds": settings["seeds"], "budget": settings["budget"], "window": settings["window"],
                           "config": settings["config"], "lr": cfg.rl.lr, "band": list(cfg.rl.band)})
        mlflow.log_metric("plain_best_reward", summary["plain_best_reward"])
        for f, arm in summary["arms"].items():
            mlflow.log_metrics({f"{f}.{k}": v for k, v in arm.items() if isinstance(v, (int, float))})
        mlflow.log_artifact(str(png), "plots")
        return run.info.run_id


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--set", action="append", default=[], help="stage.field=value override (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget", type=int, help="completions per run (default: plain GRPO's rl.max_steps steps)")
    p.add_argument("--window", type=int, default=5, help="moving-average window over steps")
    p.add_argument("--out", default="benchmarks/out")
    args = p.parse_args()
    cfg, inputs = upstream(args)
    budget = args.budget or cfg.rl.max_steps * cfg.rl.batch_prompts * cfg.rl.num_generations
    runs: dict[str, list[dict]] = {f: [] for f in ARMS}
    with tempfile.TemporaryDirectory(prefix="slmflow-rl-bench-") as tmp:
        for seed in args.seeds:
            for f in runs:
                runs[f].append(run_one(cfg, inputs, f, seed, budget, Store(tmp)))
                print(f"{f} seed {seed}: {runs[f][-1]['steps']} steps, final eval pass@1 "
                      f"{list(runs[f][-1]['check_pass_at_1'].values())[-1]:.3f}", file=sys.stderr)
    eval_prompts = len(take_per_task(load_prompts(inputs["prompts"], "eval"), cfg.rl.eval_prompts_per_task))
    summary = summarize(runs, args.window, eval_prompts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(runs, summary, out / "rl_filtering.png")
    settings = {"config": args.config, "overrides": args.set, "seeds": args.seeds, "budget": budget,
                "window": args.window, "rl": cfg.rl.model_dump(mode="json")}
    settings["mlflow_run_id"] = log_to_mlflow(cfg, summary, settings, out / "rl_filtering.png")
    print(json.dumps({"settings": settings, "runs": runs, "summary": summary}))


if __name__ == "__main__":
    main()
