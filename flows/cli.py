"""`slmflow` command line: run the pipeline, see what the store holds, trace lineage.

Imports are deferred to the commands that need them: `--help` and the read commands (`status`,
`show`, `lineage`, `ls`, `verify`) import no stage module, torch, mlflow or prefect, and read the
plan of the last run recorded in the store (flows/record.py) unless given a --config.
"""

from __future__ import annotations

from flows.interrupt import Interrupts, cancel_flow_run, in_thread, kill_open_runs, resume_hint, stop_children
from flows.prefect_server import PrefectAPI, ServerError, apply_defaults, healthy

apply_defaults()  # before Prefect is imported: no telemetry, our progress lines, generous timeouts

import atexit  # noqa: E402
import gc  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Optional  # noqa: E402

import typer  # noqa: E402
from rich.table import Table  # noqa: E402

from flows import cli_read  # noqa: E402
from flows.cli_common import (  # noqa: E402
    DEFAULT_CONFIG,
    ConfigOpt,
    SetOpt,
    err,
    fail,
    fmt,
    load_plan,
    out,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
# Registered before Prefect and MLflow are imported, so it runs after their exit handlers: the process
# then ends without a last garbage collection over everything they loaded (1.3 s of `slmflow run`'s
# exit on an idle 2-core machine). Only objects in reference cycles miss their finalizers, as Python
# never promises them at exit.
atexit.register(gc.freeze)


def _names(values: list[str] | None) -> list[str]:
    return [n for v in values or [] for n in v.split(",") if n]


def _require_server(what: str) -> str:
    """Deployments live on a Prefect server; the temporary one `slmflow run` starts dies with it."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        fail(f"{what} needs a Prefect server: start one (prefect server start --host 127.0.0.1) and set "
             f"PREFECT_API_URL=http://127.0.0.1:4200/api (README, \"Running on GPU agents and on a schedule\")")
    if not healthy(url):
        fail(f"{what}: the Prefect server at PREFECT_API_URL={url} does not answer: start it "
             f"(prefect server start --host 127.0.0.1) or point PREFECT_API_URL at one")
    return url


def _check_tracking(configured: str | None) -> None:
    """A tracking server that does not answer: one line now, not minutes of retries and a traceback."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")) and not healthy(uri.rstrip("/")):
        fail(f"the MLflow tracking server {uri} does not answer: start it (mlflow server --host 127.0.0.1 "
             f"--port 5000) or point run.mlflow_uri / MLFLOW_TRACKING_URI at one (unset: sqlite:///mlflow.db here)")


def _run(api: PrefectAPI, stop: Interrupts, config: str | Path, only: list[str], force: list[str], sets: list[str],
         rerun_stale: bool = False) -> dict:
    """Plan and check the run, set MLflow up, then wait for Prefect's API and run the flow (off the main
    thread, which stays free for Ctrl-C: flows/interrupt.py)."""
    from flows.config import ConfigError
    from tasks.core.faults import on_file
    from tasks.core.lineage import Tracker, sqlite_file, tracking_uri
    from tasks.core.stage import StageError

    cfg, plan = load_plan(config, sets)
    stop.hint = lambda: resume_hint(cfg, plan)
    _check_tracking(cfg.run.mlflow_uri)
    try:
        plan.check_names(force, "--force")
        plan.check(plan.needed(only))  # bad paths and settings fail here, before a server starts
    except (ConfigError, StageError) as e:
        fail(str(e))
    if cfg.run.execution == "deployments":
        _require_server("run.execution deployments")

    from flows.pipeline import pipeline

    uri = tracking_uri(cfg.run.mlflow_uri)
    with on_file(sqlite_file(uri) or uri):  # a database that is not one is named in the fault's line
        Tracker.shared(uri, cfg.run.experiment)  # the flow's parent run and stages reuse it
    try:
        api.url()
        return in_thread(pipeline, str(config), only or None, force or None, sets, None, rerun_stale)
    except (ConfigError, StageError, ServerError) as e:
        fail(str(e))


@app.command()
def run(
    config: ConfigOpt = DEFAULT_CONFIG,
    only: Annotated[Optional[list[str]], typer.Option(help="run only these stages (and what they need)")] = None,
    force: Annotated[Optional[list[str]], typer.Option(help="recompute these stages even if cached")] = None,
    set_: SetOpt = None,
    rerun_stale: Annotated[bool, typer.Option("--rerun-stale", help="also recompute stored outputs made by other code "
                                              "than the current (stale), and what is downstream of them")] = False,
):
    """Run the pipeline (cached stages are skipped) and print the report card."""
    # Prefect's temporary server starts first and is waited for last: its seconds of start-up overlap
    # the imports, the plan, the checks and MLflow's set-up instead of adding to them. Ctrl-C or SIGTERM
    # from here on ends the open MLflow runs as KILLED, stops the server last and exits (130 / 143).
    with Interrupts() as stop, PrefectAPI(log=lambda line: err.print(line, highlight=False, soft_wrap=True)) as api:
        stop.steps = [kill_open_runs, cancel_flow_run, stop_children, api.stop]
        result = _run(api, stop, config, _names(only), _names(force), list(set_ or []), rerun_stale)
    from flows.report import ACCURACY_TITLE, accuracy_table, cached_cell, stale_notes

    table = Table(title="slmflow report card")
    for col in ("stage", "key", "cached", "rows", "metrics", "time (s)"):
        table.add_column(col)
    for r in result["report"]:
        table.add_row(
            r["stage"], r["key"], cached_cell(r),
            "\n".join(f"{k}: {v:,}" for k, v in r["rows"].items()),
            "\n".join(f"{k}: {fmt(v)}" for k, v in r["metrics"].items()),
            f"{r['seconds']:.1f}",
        )
    out.print(table)
    for note in stale_notes(result["report"]):
        out.print(note, highlight=False, soft_wrap=True)
    header, acc = accuracy_table(result["report"], result.get("baseline"))
    if acc:
        grid = Table(title=ACCURACY_TITLE)
        for col in header:
            grid.add_column(col)
        for row in acc:
            grid.add_row(*row)
        out.print(grid)
    out.print(f"report: {result['report_path']}   MLflow parent run: {result['mlflow_run_id']}")


@app.command()
def config(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None):
    """The resolved config: every setting of every stage, defaults included, as YAML."""
    import yaml

    cfg, _ = load_plan(config, set_)
    out.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), highlight=False, soft_wrap=True)


for command in (cli_read.status, cli_read.show, cli_read.lineage, cli_read.ls, cli_read.verify):
    app.command()(command)


from flows import cli_gc  # noqa: E402  (gc judges the stores as the read commands do, without the stages)

app.command()(cli_gc.gc)


for command in (cli_read.difficulty, cli_read.export):
    app.command()(command)


@app.command()
def deploy():
    """Create the cpu and gpu work pools (if missing) and register deployments/prefect.yaml's deployments."""
    from flows.deploy import PREFECT_FILE, create_pools
    from flows.deploy import deploy as prefect_deploy

    url = _require_server("slmflow deploy")
    if not PREFECT_FILE.exists():
        fail(f"{PREFECT_FILE} not found: run slmflow deploy from the project root")
    created = create_pools()
    out.print(f"work pools at {url}: created {', '.join(created) or 'none (cpu and gpu exist)'}")
    prefect_deploy(Path.cwd())


@app.command()
def serve(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None):
    """Serve the pipeline and stage deployments from this process (no workers), on run.schedule."""
    from flows.deploy import serve as serve_all

    cfg, _ = load_plan(config, set_)
    _require_server("slmflow serve")
    schedule = f"on cron {cfg.run.schedule!r} ({cfg.run.timezone})" if cfg.run.schedule else "with no schedule (run.schedule)"
    out.print(f"serving slmflow-pipeline/pipeline {schedule} and slmflow-stage/<family> with {config}")
    try:
        serve_all(str(config), list(set_ or []), cfg.run)
    except RuntimeError as e:
        fail(str(e))


def main() -> None:
    """`slmflow`: the commands inside one fault boundary. An ordinary fault (disk full, permissions, a corrupt
    file: tasks.core.faults) is one line and exit 1; anything else is one line too, its traceback in a log
    file. `--debug` anywhere on the line (or SLMFLOW_DEBUG=1) shows every traceback instead."""
    import sys
    import tempfile
    import traceback

    from tasks.core.faults import DEBUG_ENV, debugging, explain

    if "--debug" in sys.argv[1:]:
        sys.argv.remove("--debug")
        os.environ[DEBUG_ENV] = "1"
    try:
        app()
    except Exception as e:  # typer.Exit and SystemExit are not Exceptions: they pass
        if debugging():
            raise
        line = explain(e)
        if line is None:
            log = Path(tempfile.gettempdir()) / "slmflow-last-error.log"
            log.write_text("".join(traceback.format_exception(e)))
            line = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''} " \
                   f"(unexpected: the traceback is in {log}; rerun with --debug to see it)"
        err.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
