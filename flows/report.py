"""The report card: one row per stage (key, cached?, rows, headline metrics, time)."""

from __future__ import annotations

import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from flows.record import runs_dir
from tasks.core.stage import Outcome
from tasks.core.store import make_readable


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def headline_metrics(card: list[dict]) -> dict[str, float]:
    """The report card's numbers for the MLflow parent run: held-out scores per evaluated model
    (`eval_rl.pass_at_1`, `eval_rl.pass_at_1.gcd`, ...) and each stage's seconds."""
    out = {f"{r['stage']}.seconds": float(r["seconds"]) for r in card}
    for r in card:
        if r["accuracy"]:
            out.update({f"{r['stage']}.{m}": float(r["metrics"][m]) for m in
                        ("pass_at_1", "sampled_pass_at_1", "pass_at_k") if m in r["metrics"]})
            out.update({f"{r['stage']}.pass_at_1.{t}": float(v) for t, v in r["accuracy"].items()})
    return out


def report_card(outcomes: list[tuple[str, Outcome]], plan) -> list[dict]:
    rows = []
    for name, o in outcomes:
        stage = plan.stages[name].stage
        metrics = o.artifact.manifest.get("metrics", {})
        rows.append({
            "stage": name,
            "key": o.artifact.key,
            "cached": o.cached,
            "rows": dict(o.artifact.rows),
            "metrics": {m: metrics[m] for m in stage.report_metrics if m in metrics},
            "seconds": round(o.seconds, 1),
            "path": o.artifact.path,
            # evaluation stages: greedy pass@1 per task on the held-out split
            "accuracy": {k.split(".", 1)[1]: v for k, v in metrics.items() if k.startswith("pass_at_1.")},
        })
    return rows


def accuracy_table(card: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of held-out pass@1: one row per evaluated model, one column per task."""
    evals = [r for r in card if r["accuracy"]]
    tasks = sorted({t for r in evals for t in r["accuracy"]})
    rows = [[r["stage"], *(f"{r['accuracy'].get(t, float('nan')):.3f}" for t in tasks),
             *(f"{r['metrics'].get(m, float('nan')):.3f}" for m in ("pass_at_1", "sampled_pass_at_1", "pass_at_k"))]
            for r in evals]
    # sampled pass@1 and pass@k: RL typically sharpens the policy (pass@1 up, pass@k down)
    return ["model", *tasks, "mean", "sampled pass@1", "pass@k"], rows


def to_markdown(card: list[dict]) -> str:
    lines = ["| stage | key | cached | rows | metrics | time (s) |", "|---|---|---|---|---|---|"]
    for r in card:
        rows = ", ".join(f"{k} {fmt(v)}" for k, v in r["rows"].items())
        metrics = ", ".join(f"{k} {fmt(v)}" for k, v in r["metrics"].items())
        lines.append(f"| {r['stage']} | `{r['key']}` | {'yes' if r['cached'] else 'no'} | {rows} | {metrics} | {r['seconds']} |")
    header, acc = accuracy_table(card)
    if acc:
        lines += ["", "Held-out accuracy (greedy pass@1 per task and mean; sampled pass@1 and pass@k at eval.temperature):", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in acc]
    return "\n".join(lines) + "\n"


def write_report(card: list[dict], data_root: str, run_id: str) -> Path:
    """`<data_root>/runs/<UTC time>-<run>/report.md` (a local directory even for remote stores),
    written beside it and renamed into place: a killed run leaves no half-written report."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    runs = runs_dir(data_root)
    runs.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=runs))
    (tmp / "report.md").write_text(f"# slmflow report card\n\nMLflow run `{run_id}`\n\n" + to_markdown(card))
    make_readable(tmp)
    out = runs / f"{stamp}-{run_id[:8]}"
    os.replace(tmp, out)
    return out / "report.md"
