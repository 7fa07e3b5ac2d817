"""`slmflow gc`: what no longer counts in the stores, each entry with why, removed only with --yes.

It keeps every output that a kept plan names: with no --config, the plan of every run recorded in
the store; with --config, those configs' plans and the runs recorded in the last --keep-days days.
Whatever the plans, it keeps an output a model registry version points at, one made in the last
--keep-days days, and every key a run holds. Imports nothing heavy unless given --config."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from flows.cli_common import err, fail, load_plan, out
from flows.record import RUN_RECORD, RunRecord, configured_roots, recorded_runs, runs_dir
from flows.housekeeping import find_garbage
from tasks.core.store import Store

GcConfigOpt = Annotated[Optional[list[Path]], typer.Option(
    "--config", "-c", help="configs whose outputs to keep, besides the runs recorded in the last --keep-days days "
                           "(repeatable; default: keep the outputs of every recorded run)")]
KeepDaysOpt = Annotated[int, typer.Option(
    "--keep-days", min=0, help="keep what a run recorded in the last N days names, and what was made in them")]
YesOpt = Annotated[bool, typer.Option("--yes", help="remove what is listed (default: only list it)")]


def gc(config: GcConfigOpt = None, keep_days: KeepDaysOpt = 7, yes: YesOpt = False):
    """List (with --yes remove) what no longer counts in the stores, and why: unfinished or replaced outputs of
    stopped runs, damaged outputs set aside, stale checkpoints and lock files, and outputs that no recorded run
    (with --config: no given config, nor a run of the last --keep-days days) names. Never touched: outputs made in
    the last --keep-days days, outputs a registered model version points at, keys a run holds."""
    now = datetime.now(timezone.utc)
    since = now - timedelta(days=keep_days)
    # No configs/default.yaml plan with no --config: every run of every config, the default's included,
    # recorded its plan, and a config never run has nothing stored to keep. Judging by default.yaml
    # alone is what removed a tiny run's outputs; loading it would also import every stage module.
    loaded = [load_plan(c, []) for c in config or []]
    if loaded:
        roots = dict.fromkeys(root for cfg, _ in loaded for root in (cfg.run.data_root, cfg.run.models_root))
        data_roots = dict.fromkeys(cfg.run.data_root for cfg, _ in loaded)
    else:
        roots = dict.fromkeys(configured_roots())
        data_roots = dict.fromkeys(configured_roots()[:1])
    try:
        records = sorted((r for root in data_roots for r in recorded_runs(root)), key=lambda r: r.created_at() or now)
    except ValueError as e:
        fail(str(e))
    kept_runs = [r for r in records if (r.created_at() or now) >= since] if loaded else records
    reachable = {(p.stage.name, p.key) for _, plan in loaded for p in plan.stages.values()}
    reachable |= {(i.stage, i.key) for r in kept_runs for i in r.stages.values()}
    last_named = {(i.stage, i.key): r for r in records for i in r.stages.values()}  # newest wins

    def why_unreached(stage: str, key: str) -> str:
        if not loaded:
            return f"output no recorded run names, made over {keep_days} days ago"
        last = last_named.get((stage, key))
        older = f" (the last that did: {last.describe()} of {last.created[:10]})" if last else ""
        return f"output no given config reaches and no run of the last {keep_days} days names{older}"

    runs = ", ".join(str(runs_dir(root)) for root in data_roots)
    judged = (f"{', '.join(map(str, config))} and the {len(kept_runs)} of {len(records)} runs recorded in {runs} "
              f"in the last {keep_days} days") if loaded else f"all {len(records)} runs recorded in {runs}"
    err.print(f"gc of the stores {', '.join(roots)}: keeping what {judged} name, what a registered model version "
              f"points at, and what was made in the last {keep_days} days", style="dim", highlight=False,
              soft_wrap=True)
    for root in data_roots:
        _warn_of_unrecorded_runs(root, records)
    garbage = [g for root in roots for g in find_garbage(Store(root), reachable, why_unreached, since)]
    if not garbage:
        out.print(f"nothing to remove under {', '.join(roots)}")
        return
    table = Table(title=f"not needed by {judged}")
    for col in ("path", "MB", "why"):
        table.add_column(col)
    for g in garbage:
        table.add_row(str(g.path), f"{g.bytes / 1e6:,.1f}", g.why)
    out.print(table)
    nbytes = sum(g.bytes for g in garbage)
    size = f"{len(garbage)} entries, {nbytes / 1e6:,.1f} MB ({nbytes:,} bytes)"
    if not yes:
        out.print(f"{size}: run again with --yes to remove them")
        return
    out.print(f"removing {size}")
    for g in garbage:
        g.remove()
    out.print(f"removed {size}")


def _warn_of_unrecorded_runs(data_root: str, records: list[RunRecord]) -> None:
    """Runs from before each run kept its record left only a report: gc cannot know their plans."""
    recorded = {(r.mlflow_run_id or "")[:8] for r in records}
    runs = runs_dir(data_root)
    unrecorded = [p.parent for p in runs.glob("*/report.md") if not p.parent.name.startswith(".")
                  and not (p.parent / RUN_RECORD).exists() and p.parent.name.rsplit("-", 1)[-1] not in recorded]
    if unrecorded:
        err.print(f"[yellow]warning:[/] {len(unrecorded)} runs in {runs} left a report but no record of their plan "
                  f"(they ran before runs kept one): outputs only they named are listed; to keep them, pass their "
                  f"configs with --config", highlight=False, soft_wrap=True)
