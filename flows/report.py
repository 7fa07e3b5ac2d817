"""The report card: one row per stage (key, cached?, rows, headline metrics, time); a cache hit made by
other code than the current reads `yes (stale)`, with a line below the table naming what changed."""

from __future__ import annotations

import math
from pathlib import Path

from flows.record import write_atomic
from tasks.core.fingerprint import stale_note
from tasks.core.stage import Outcome


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def headline_metrics(card: list[dict], baseline: dict[str, dict] | None = None) -> dict[str, float]:
    """The report card's numbers for the MLflow parent run: held-out scores per evaluated model
    (`eval_rl.pass_at_1`, `eval_rl.pass_at_1.gcd`, ...) and each stage's seconds."""
    out = {f"{r['stage']}.seconds": float(r["seconds"]) for r in card}
    for r in card:
        if r["accuracy"]:
            out.update({f"{r['stage']}.{m}": float(r["metrics"][m]) for m in
                        ("pass_at_1", "sampled_pass_at_1", "pass_at_k") if m in r["metrics"]})
            out.update({f"{r['stage']}.pass_at_1.{t}": float(v) for t, v in r["accuracy"].items()})
            tasks = sorted(r["accuracy"])
            out[f"{r['stage']}.pass_at_1_se"] = mean_standard_error([r["accuracy"][t] for t in tasks],
                                                                   [int(r["prompts"].get(t, 0)) for t in tasks])
    for task, b in (baseline or {}).items():
        out[f"constant_answer.pass_at_1.{task}"] = b["pass_at_1"]
    return out


def headline(card: list[dict], baseline: dict[str, dict] | None = None) -> str:
    """The report card in one line, the parent run's description: held-out mean greedy pass@1 per evaluated
    model (and the constant answer), then stages computed and cached, and the time."""
    scores = [f"{r['stage'].removeprefix('eval_')} {sum(r['accuracy'].values()) / len(r['accuracy']):.3f}"
              for r in card if r["accuracy"]]
    if baseline:
        scores.append(f"constant answer {sum(b['pass_at_1'] for b in baseline.values()) / len(baseline):.3f}")
    computed, stale = sum(not r["cached"] for r in card), sum(bool(r.get("stale")) for r in card)
    cached = f"{len(card) - computed} cached" + (f", {stale} stale" if stale else "")
    ran = f"{computed} of {len(card)} stages computed ({cached}), {sum(r['seconds'] for r in card) / 60:.1f} min"
    return f"Held-out mean greedy pass@1: {', '.join(scores)}. {ran}." if scores else f"{ran[0].upper()}{ran[1:]}."


def report_card(outcomes: list[tuple[str, Outcome]], plan) -> list[dict]:
    rows = []
    for name, o in outcomes:
        stage = plan.stages[name].stage
        metrics = o.artifact.manifest.get("metrics", {})
        rows.append({
            "stage": name,
            "key": o.artifact.key,
            "cached": o.cached,
            "stale": list(o.stale),  # a hit made by other code: the modules changed since (tasks.core.fingerprint)
            "rows": dict(o.artifact.rows),
            # a stage's report metrics, and any per-task count of examples that did not fit (nothing dropped silently)
            "metrics": {**{m: metrics[m] for m in stage.report_metrics if m in metrics},
                        **{k: v for k, v in sorted(metrics.items()) if "too_long." in k and v}},
            "seconds": round(o.seconds, 1),
            "path": o.artifact.path,
            # evaluation stages: greedy pass@1 per task on the held-out split, and prompts per task
            "accuracy": {k.split(".", 1)[1]: v for k, v in metrics.items() if k.startswith("pass_at_1.")},
            "prompts": {k.split(".", 1)[1]: v for k, v in metrics.items() if k.startswith("prompts.")},
        })
    return rows


def cached_cell(r: dict) -> str:
    """The cached column: yes, yes (stale) or no."""
    return ("yes (stale)" if r.get("stale") else "yes") if r["cached"] else "no"


def stale_notes(card: list[dict]) -> list[str]:
    """One line per stale hit, for below the table: what changed and how to recompute it."""
    return [stale_note(f"{r['stage']} ({r['key']})", ", ".join(r["stale"])) for r in card if r.get("stale")]


def baseline_of(outcomes: list[tuple[str, Outcome]], plan) -> dict[str, dict] | None:
    """The constant-answer baseline per task on the rows the eval stages score (None when this run
    has no prompts output or no eval stage)."""
    prompts = dict(outcomes).get("prompts")
    evals = [p for p in plan.stages.values() if p.stage.name == "eval"]
    if prompts is None or not evals:
        return None
    from tasks.core.rollout import (
        constant_answer_baseline,  # torch: only in the pipeline's process
    )

    return constant_answer_baseline(prompts.artifact, evals[0].cfg.split, evals[0].cfg.max_prompts_per_task)


def standard_error(p: float, n: int) -> float:
    """Of a pass rate p over n independent prompts (binomial)."""
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def mean_standard_error(ps: list[float], ns: list[int]) -> float:
    """Of the unweighted mean of per-task pass rates (tasks independent)."""
    return math.sqrt(sum(standard_error(p, n) ** 2 for p, n in zip(ps, ns))) / len(ps) if ps else float("nan")


def accuracy_table(card: list[dict], baseline: dict[str, dict] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of held-out pass@1 (± one standard error): one row per evaluated model, one
    column per task, and the constant-answer baseline's row when given."""
    evals = [r for r in card if r["accuracy"]]
    tasks = sorted({t for r in evals for t in r["accuracy"]})

    def cell(p: float, n: int) -> str:
        return f"{p:.3f} ± {standard_error(p, n):.3f}"

    def row(name: str, ps: list[float], ns: list[int], extra: list[str]) -> list[str]:
        mean = f"{sum(ps) / len(ps):.3f} ± {mean_standard_error(ps, ns):.3f}"
        return [name, *(cell(p, n) for p, n in zip(ps, ns)), mean, *extra, f"{sum(ns):,}"]

    rows = []
    for r in evals:
        ps = [r["accuracy"].get(t, float("nan")) for t in tasks]
        ns = [int(r["prompts"].get(t, 0)) for t in tasks]
        rows.append(row(r["stage"], ps, ns, [f"{r['metrics'].get(m, float('nan')):.3f}"
                                             for m in ("sampled_pass_at_1", "pass_at_k")]))
    if baseline and evals:
        rows.append(row("constant answer", [baseline[t]["pass_at_1"] if t in baseline else float("nan") for t in tasks],
                        [baseline.get(t, {}).get("prompts", 0) for t in tasks], ["", ""]))
    # sampled pass@1 and pass@k: RL typically sharpens the policy (pass@1 up, pass@k down)
    return ["model", *tasks, "mean", "sampled pass@1", "pass@k", "prompts"], rows


ACCURACY_TITLE = ("held-out accuracy: greedy pass@1 per task and mean, ± one standard error; sampled pass@1 and "
                  "pass@k at eval.temperature; constant answer = the train split's most frequent answer per task")


def to_markdown(card: list[dict], baseline: dict[str, dict] | None = None) -> str:
    lines = ["| stage | key | cached | rows | metrics | time (s) |", "|---|---|---|---|---|---|"]
    for r in card:
        rows = ", ".join(f"{k} {fmt(v)}" for k, v in r["rows"].items())
        metrics = ", ".join(f"{k} {fmt(v)}" for k, v in r["metrics"].items())
        lines.append(f"| {r['stage']} | `{r['key']}` | {cached_cell(r)} | {rows} | {metrics} | {r['seconds']} |")
    if notes := stale_notes(card):
        lines += ["", *(f"- {n}" for n in notes)]
    header, acc = accuracy_table(card, baseline)
    if acc:
        lines += ["", ACCURACY_TITLE[0].upper() + ACCURACY_TITLE[1:] + ":", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in acc]
    return "\n".join(lines) + "\n"


def write_report(card: list[dict], run_dir: Path, run_id: str, baseline: dict[str, dict] | None = None) -> Path:
    """`<run_dir>/report.md` (the run's directory, `<data_root>/runs/<UTC time>-<run>/`, local even for remote
    stores), written beside it and renamed into place: a killed run leaves no half-written report."""
    write_atomic(run_dir / "report.md", f"# slmflow report card\n\nMLflow run `{run_id}`\n\n" + to_markdown(card, baseline))
    return run_dir / "report.md"
