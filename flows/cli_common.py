"""What the `slmflow` commands share: consoles, option types, one-line failure, and the plan a
command reads (a config's, or the last run's as the store recorded it). Imports nothing heavy."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from flows.record import RECORD, RunRecord, configured_roots, runs_dir
from tasks.core.store import check_name

# Piped output (logs, CI) gets a wide fixed width so report cards don't wrap into columns.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

# str, not Path: a config may be a URL (s3://bucket/x.yaml), which Path would fold to s3:/bucket/x.yaml
ConfigOpt = Annotated[str, typer.Option("--config", "-c", help="pipeline YAML (a path or a URL)")]
ReadConfigOpt = Annotated[Optional[str], typer.Option(
    "--config", "-c", help="pipeline YAML (default: the last run's plan, recorded in <data root>/runs/last-run.json "
                           "(data root: $SLMFLOW_DATA_ROOT, else data), else configs/default.yaml)")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override: stage.field=value (repeatable)")]
KeyOpt = Annotated[Optional[str], typer.Option(help="a stored key other than the configured one")]
DEFAULT_CONFIG = Path("configs/default.yaml")


def fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def load_plan(config: str | Path, sets: list[str] | None):
    from flows.config import ConfigError, load_config
    from flows.pipeline import make_plan

    try:
        cfg = load_config(config, sets or [])
        return cfg, make_plan(cfg)
    except ConfigError as e:
        fail(str(e))


def read_plan(config: str | Path | None, sets: list[str] | None) -> RunRecord:
    """The plan a read command reads, said on stderr with its stores: --config's; else the last run's,
    as recorded in the configured data root ($SLMFLOW_DATA_ROOT, else data) (with --set: its config file
    and overrides plus these); else configs/default.yaml."""
    last = runs_dir(configured_roots()[0]) / RECORD
    hint = "; --config to read another"
    if config is None and last.exists():
        try:
            record = RunRecord.load(last)
        except ValueError as e:
            fail(str(e))
        if not sets:
            _say_reading(f"the plan of the last run ({record.describe()}, {record.created}) from {last}", record, hint)
            return record
        config, sets = record.config_file or DEFAULT_CONFIG, [*record.overrides, *sets]
        what, hint = f"the plan of the last run's {config} --set {' --set '.join(sets)}", ""
    elif config is None:
        config, what = DEFAULT_CONFIG, f"the plan of {DEFAULT_CONFIG} (no run recorded in {last.parent})"
    else:
        what, hint = f"the plan of {config}" + "".join(f" --set {s}" for s in sets or []), ""
    cfg, plan = load_plan(config, sets)
    record = RunRecord.from_plan(cfg, plan, str(config), sets)
    _say_reading(what, record, hint)
    return record


def _say_reading(what: str, record: RunRecord, hint: str) -> None:
    err.print(f"reading {what} in the stores {', '.join(s.root for s in record.roots())}{hint}", style="dim",
              highlight=False, soft_wrap=True)


def instance_of(record: RunRecord, stage: str):
    if stage not in record.stages:
        fail(f"no such stage: {stage} (stages: {', '.join(record.stages)})")
    return record.stages[stage]


def stored_output(record: RunRecord, stage: str, key: str | None):
    inst = instance_of(record, stage)
    key = key or inst.key
    try:
        hit = record.store(inst.store).get(inst.stage, check_name(key, "--key"))
    except ValueError as e:
        fail(str(e))
    if hit is None:
        fail(f"{stage} {key} is not in the store {record.store(inst.store).root} "
             f"(run `slmflow run -c {record.config_file or DEFAULT_CONFIG} --only {stage}` first)")
    return hit


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return f"{v:,}" if isinstance(v, int) else str(v)
