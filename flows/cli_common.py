"""What the `slmflow` commands share: consoles, option types, one-line failure, and the plan a
command reads (a config's, or the last run's as the store recorded it). Imports nothing heavy."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from flows.record import RECORD, RunRecord, runs_dir
from tasks.core.store import check_name

# Piped output (logs, CI) gets a wide fixed width so report cards don't wrap into columns.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="pipeline YAML")]
ReadConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="pipeline YAML (default: the last run's plan, recorded in data/runs/last-run.json, "
                           "else configs/default.yaml)")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override: stage.field=value (repeatable)")]
KeyOpt = Annotated[Optional[str], typer.Option(help="a stored key other than the configured one")]
DEFAULT_CONFIG = Path("configs/default.yaml")


def fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def load_plan(config: Path, sets: list[str] | None):
    from flows.config import ConfigError, load_config
    from flows.pipeline import make_plan

    try:
        cfg = load_config(config, sets or [])
        return cfg, make_plan(cfg)
    except ConfigError as e:
        fail(str(e))


def read_plan(config: Path | None, sets: list[str] | None) -> RunRecord:
    """The plan a read command reads, said on stderr: --config's; else the last run's, as recorded in
    the store (with --set: its config file and overrides plus these); else configs/default.yaml."""
    last = runs_dir("data") / RECORD
    if config is None and last.exists():
        record = RunRecord.load(last)
        if not sets:
            err.print(f"reading the plan of the last run ({record.describe()}, {record.created}) from {last}; "
                      f"--config to read another", style="dim", highlight=False, soft_wrap=True)
            return record
        config, sets = Path(record.config_file or DEFAULT_CONFIG), [*record.overrides, *sets]
        err.print(f"reading the plan of the last run's {config} --set {' --set '.join(sets)}", style="dim",
                  highlight=False, soft_wrap=True)
    elif config is None:
        err.print(f"reading the plan of {DEFAULT_CONFIG} (no run recorded in {last.parent}); --config to read another",
                  style="dim", highlight=False, soft_wrap=True)
    config = config or DEFAULT_CONFIG
    cfg, plan = load_plan(config, sets)
    return RunRecord.from_plan(cfg, plan, str(config), sets)


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
