"""`slmflow` command line: run the pipeline, see what the store holds, trace lineage.

Imports are deferred to the commands that need them: `--help` and the read commands (`status`,
`show`, `lineage`, `ls`, `verify`) import no stage module, torch, mlflow or prefect, and read the
plan of the last run recorded in the store (flows/record.py) unless given a --config.
"""

from __future__ import annotations

from flows.prefect_server import ServerError, apply_defaults, healthy, prefect_api

apply_defaults()  # before Prefect is imported: no telemetry, our progress lines, generous timeouts

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Optional  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from flows.record import RECORD, Graph, RunRecord, lineage as lineage_graph, runs_dir  # noqa: E402
from tasks.core.store import Store, check_name  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
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


def _names(values: list[str] | None) -> list[str]:
    return [n for v in values or [] for n in v.split(",") if n]


def _load(config: Path, sets: list[str] | None):
    from flows.config import ConfigError, load_config
    from flows.pipeline import make_plan

    try:
        cfg = load_config(config, sets or [])
        return cfg, make_plan(cfg)
    except ConfigError as e:
        fail(str(e))


def _record(config: Path | None, sets: list[str] | None) -> RunRecord:
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
    cfg, plan = _load(config, sets)
    return RunRecord.from_plan(cfg, plan, str(config), sets)


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


@app.command()
def run(
    config: ConfigOpt = DEFAULT_CONFIG,
    only: Annotated[Optional[list[str]], typer.Option(help="run only these stages (and what they need)")] = None,
    force: Annotated[Optional[list[str]], typer.Option(help="recompute these stages even if cached")] = None,
    set_: SetOpt = None,
):
    """Run the pipeline (cached stages are skipped) and print the report card."""
    from flows.config import ConfigError
    from tasks.core.stage import StageError

    cfg, plan = _load(config, set_)
    only, force = _names(only), _names(force)
    _check_tracking(cfg.run.mlflow_uri)
    try:
        plan.check_names(force, "--force")
        for name in plan.needed(only):  # bad paths and settings fail here, before anything runs
            planned = plan.stages[name]
            if planned.stage.check:
                planned.stage.check(planned.cfg)
    except (ConfigError, StageError) as e:
        fail(str(e))
    if cfg.run.execution == "deployments":
        _require_server("run.execution deployments")

    from flows.pipeline import pipeline

    try:
        with prefect_api(log=lambda line: err.print(line, highlight=False, soft_wrap=True)):
            result = pipeline(str(config), only or None, force or None, list(set_ or []))
    except (ConfigError, StageError, ServerError) as e:
        fail(str(e))
    table = Table(title="slmflow report card")
    for col in ("stage", "key", "cached", "rows", "metrics", "time (s)"):
        table.add_column(col)
    for r in result["report"]:
        table.add_row(
            r["stage"], r["key"], "yes" if r["cached"] else "no",
            "\n".join(f"{k}: {v:,}" for k, v in r["rows"].items()),
            "\n".join(f"{k}: {_fmt(v)}" for k, v in r["metrics"].items()),
            f"{r['seconds']:.1f}",
        )
    out.print(table)
    from flows.report import accuracy_table

    header, acc = accuracy_table(result["report"])
    if acc:
        grid = Table(title="held-out accuracy (greedy pass@1 per task and mean; sampled pass@1 and pass@k at eval.temperature)")
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

    cfg, _ = _load(config, set_)
    out.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), highlight=False, soft_wrap=True)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _check_tracking(configured: str | None) -> None:
    """A tracking server that does not answer: one line now, not minutes of retries and a traceback."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")) and not healthy(uri.rstrip("/")):
        fail(f"the MLflow tracking server {uri} does not answer: start it (mlflow server --host 127.0.0.1 "
             f"--port 5000) or point run.mlflow_uri / MLFLOW_TRACKING_URI at one (unset: sqlite:///mlflow.db here)")


@app.command()
def status(config: ReadConfigOpt = None, set_: SetOpt = None):
    """Each stage of the pipeline: its key, whether the store has it, rows, created."""
    record = _record(config, set_)
    table = Table(title=f"stages of {record.describe()}")
    for col in ("stage", "key", "cached", "rows", "created"):
        table.add_column(col)
    for name, inst in record.stages.items():
        hit = record.store(inst.store).get(inst.stage, inst.key)
        rows = ", ".join(f"{k} {v:,}" for k, v in hit.rows.items()) if hit else ""
        table.add_row(name, inst.key, "yes" if hit else "no", rows, hit.manifest.get("created", "") if hit else "")
    out.print(table)


def _instance(record: RunRecord, stage: str):
    if stage not in record.stages:
        fail(f"no such stage: {stage} (stages: {', '.join(record.stages)})")
    return record.stages[stage]


def _artifact(record: RunRecord, stage: str, key: str | None):
    inst = _instance(record, stage)
    key = key or inst.key
    try:
        hit = record.store(inst.store).get(inst.stage, check_name(key, "--key"))
    except ValueError as e:
        fail(str(e))
    if hit is None:
        fail(f"{stage} {key} is not in the store {record.store(inst.store).root} "
             f"(run `slmflow run -c {record.config_file or DEFAULT_CONFIG} --only {stage}` first)")
    return hit


@app.command()
def show(
    stage: str,
    config: ReadConfigOpt = None,
    set_: SetOpt = None,
    key: KeyOpt = None,
    table: Annotated[Optional[str], typer.Option(help="which table of the output (default: first)")] = None,
    rows: Annotated[int, typer.Option(help="rows to show")] = 5,
):
    """A stage output's manifest and its first rows (read with duckdb)."""
    import duckdb

    art = _artifact(_record(config, set_), stage, key)
    m = art.manifest
    summary = {k: m.get(k) for k in ("stage", "key", "version", "inputs", "rows", "metrics", "created", "mlflow_run_id")}
    out.print_json(json.dumps(summary, default=str))
    tables = sorted({f.split("/")[0] for f in m["files"] if f.endswith(".parquet")})
    if not tables:
        return
    name = table or tables[0]
    if name not in tables:
        fail(f"{stage} has no table {name!r} (tables: {', '.join(tables)})")
    rel = duckdb.sql(f"SELECT * FROM read_parquet({art.files(name)!r}) LIMIT {int(rows)}")
    grid = Table(title=f"{stage}/{name} ({art.rows.get(name, '?')} rows)")
    for col in rel.columns:
        grid.add_column(col, overflow="fold", max_width=60)
    for row in rel.fetchall():
        grid.add_row(*[(repr(v)[:200] if isinstance(v, str) else str(v)) for v in row])
    out.print(grid)


def _lineage_table(graph: Graph, title: str) -> Table:
    table = Table(title=title)
    for col in ("stage", "key", "rows", "reads", "MLflow run"):
        table.add_column(col)
    for nid, n in graph.nodes.items():
        name = n.name if n.name == n.stage else f"{n.name} ({n.stage})"
        rows = ", ".join(f"{k} {v:,}" for k, v in n.rows.items()) if n.path else "not in the store"
        reads = ", ".join(up if up == inp else f"{inp}: {up}" for inp, up in graph.inputs_of(nid))
        table.add_row(name, n.key, rows, reads, (n.mlflow_run_id or "")[:12])
    return table


@app.command()
def lineage(
    stage: str,
    config: ReadConfigOpt = None,
    set_: SetOpt = None,
    key: KeyOpt = None,
    format: Annotated[str, typer.Option("--format", help="table, json or mermaid")] = "table",
):
    """The outputs that produced a stage's output, each once, upstream first (a DAG, not a tree)."""
    record = _record(config, set_)
    _instance(record, stage)
    if format not in ("table", "json", "mermaid"):
        fail(f"--format {format}: expected table, json or mermaid")
    try:
        graph = lineage_graph(record, [stage], check_name(key, "--key") if key else None)
    except ValueError as e:
        fail(str(e))
    if format == "json":
        out.print_json(json.dumps(graph.to_json()))
    elif format == "mermaid":
        print(graph.to_mermaid(), end="")
    else:
        out.print(_lineage_table(graph, f"lineage of {stage} {key or record.stages[stage].key}: "
                                        f"{len(graph.nodes)} outputs"))


@app.command()
def ls(config: ReadConfigOpt = None, set_: SetOpt = None):
    """Everything the stores hold: stage, key, created, size, the config that produced it, its instance in the plan."""
    record = _record(config, set_)
    instances = {(i.stage, i.key): name for name, i in record.stages.items()}
    table = Table(title=f"outputs in {', '.join(s.root for s in record.roots())}")
    for col in ("stage", "key", "created", "MB", "produced with", "in the plan as"):
        table.add_column(col)
    count, total = 0, 0
    for store in record.roots():
        for stage in store.stages():
            for k in store.keys(stage):
                m = store.read_manifest(stage, k) or {}
                size = sum(m.get("sizes", {}).values())
                count, total = count + 1, total + size
                table.add_row(stage, k, m.get("created", "?"), f"{size / 1e6:,.1f}", m.get("config_file") or "",
                              instances.get((stage, k), ""))
    out.print(table)
    out.print(f"{count} outputs, {total / 1e6:,.1f} MB")


@app.command(help="Check stored outputs against their manifests (every file's size and sha256); a damaged "
             "output is named and set aside, so the next run recomputes it. Exit 1 if any was.")
def verify(
    stage: Annotated[Optional[str], typer.Argument(help="a stage or instance name (default: every output)")] = None,
    config: ReadConfigOpt = None,
    set_: SetOpt = None,
):
    record = _record(config, set_)
    name = record.stages[stage].stage if stage in record.stages else stage
    checked, damaged, nbytes = 0, 0, 0
    for store in record.roots():
        for stage_name in store.stages():
            if name and stage_name != name:
                continue
            for key in store.keys(stage_name):
                manifest = store.read_manifest(stage_name, key)
                problems = store.problems(stage_name, key, manifest, digests=True)
                checked += 1
                nbytes += sum(manifest.get("sizes", {}).values())
                for line in problems:
                    err.print(f"[bold red]damaged:[/] {line}", highlight=False, soft_wrap=True)
                if problems:
                    damaged += 1
                    err.print(f"  {stage_name} {key} set aside as {store.set_aside(stage_name, key)}; "
                              f"the next run recomputes it", highlight=False, soft_wrap=True)
    if name and not checked:
        fail(f"no stored outputs of stage {name!r} under {', '.join(s.root for s in record.roots())}")
    out.print(f"verified {checked} outputs ({nbytes / 1e6:,.1f} MB): {damaged} damaged")
    if damaged:
        raise typer.Exit(1)


@app.command(help="List (with --yes remove) what no longer counts in the stores: unfinished or replaced outputs "
             "of stopped runs, damaged outputs set aside, stale checkpoints and lock files, and outputs that no given "
             "config reaches. Keys a run holds are never touched.")
def gc(
    config: Annotated[Optional[list[Path]], typer.Option("--config", "-c", help="configs whose outputs to keep "
                                                         "(repeatable; default configs/default.yaml)")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="remove what is listed (default: only list it)")] = False,
):
    from tasks.core.housekeeping import find_garbage

    configs = config or [DEFAULT_CONFIG]
    loaded = [_load(c, []) for c in configs]
    reachable = {(p.stage.name, p.key) for _, plan in loaded for p in plan.stages.values()}
    roots = dict.fromkeys(root for cfg, _ in loaded for root in (cfg.run.data_root, cfg.run.models_root))
    garbage = [g for root in roots for g in find_garbage(Store(root), reachable)]
    if not garbage:
        out.print(f"nothing to remove under {', '.join(roots)}")
        return
    table = Table(title=f"not needed by {', '.join(map(str, configs))}")
    for col in ("path", "MB", "why"):
        table.add_column(col)
    for g in garbage:
        table.add_row(str(g.path), f"{g.bytes / 1e6:,.1f}", g.why)
    out.print(table)
    total = sum(g.bytes for g in garbage) / 1e6
    if not yes:
        out.print(f"{len(garbage)} entries, {total:,.1f} MB: run again with --yes to remove them")
        return
    for g in garbage:
        g.remove()
    out.print(f"removed {len(garbage)} entries, {total:,.1f} MB")


@app.command()
def difficulty(prompt_id: str, config: ReadConfigOpt = None, set_: SetOpt = None):
    """A prompt's pass rate over time: every offline difficulty table and RL history that scored it."""
    import duckdb

    record = _record(config, set_)
    found = []
    for store, stage, table, query in (
        (record.data_root, "difficulty", "pass_rates",
         "SELECT NULL AS step, k, correct, pass_rate, kept FROM read_parquet($files) WHERE prompt_id = $id"),
        (record.models_root, "rl", "history",
         "SELECT step, NULL AS k, NULL AS correct, any_value(pass_rate) AS pass_rate, any_value(kept) AS kept "
         "FROM read_parquet($files) WHERE prompt_id = $id GROUP BY step ORDER BY step"),
    ):
        st = Store(store)
        for key in st.keys(stage):
            files = st.get(stage, key).files(table)
            if files:
                rows = duckdb.execute(query, {"files": files, "id": prompt_id}).fetchall()
                found += [(f"{stage} {key}", *row) for row in rows]
    if not found:
        fail(f"prompt {prompt_id!r} appears in no difficulty table or RL history in the store")
    grid = Table(title=f"pass rate of prompt {prompt_id}")
    for col in ("output", "rl step", "k", "correct", "pass_rate", "kept (used for training)"):
        grid.add_column(col)
    for row in found:
        grid.add_row(*["" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)) for v in row])
    out.print(grid)


@app.command()
def export(
    stage: str,
    directory: Path,
    config: ReadConfigOpt = None,
    set_: SetOpt = None,
    key: KeyOpt = None,
):
    """Write a model stage's weights in the Hugging Face layout (loads as LlamaForCausalLM, with the
    chat template of SFT and RL, so `apply_chat_template` gives the prompts the model was trained on)."""
    from tasks.core.export import export_hf
    from tasks.core.store import local_dir

    art = _artifact(_record(config, set_), stage, key)

    if "model/model.safetensors" not in art.manifest["files"]:
        fail(f"{stage} has no model to export (not a training stage)")
    from tasks.core.chat import HF_CHAT_TEMPLATE
    from tasks.core.tokens import BOS, END, PAD

    special = {"bos_token": BOS, "eos_token": END, "pad_token": PAD}
    try:
        model_dir = local_dir(f"{art.path}/model")
        out_dir = export_hf(model_dir, directory, tokenizer_json=model_dir / "tokenizer.json", special_tokens=special,
                            chat_template=HF_CHAT_TEMPLATE)
    except ValueError as e:
        fail(f"export {stage}: {e}")
    out.print(f"exported {stage} {art.key} to {out_dir} (Hugging Face Llama layout)")


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

    cfg, _ = _load(config, set_)
    _require_server("slmflow serve")
    schedule = f"on cron {cfg.run.schedule!r} ({cfg.run.timezone})" if cfg.run.schedule else "with no schedule (run.schedule)"
    out.print(f"serving slmflow-pipeline/pipeline {schedule} and slmflow-stage/<family> with {config}")
    try:
        serve_all(str(config), list(set_ or []), cfg.run)
    except RuntimeError as e:
        fail(str(e))


if __name__ == "__main__":
    app()
