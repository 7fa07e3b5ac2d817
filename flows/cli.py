"""`slmflow` command line: run the pipeline, see what the store holds, trace lineage."""

from __future__ import annotations

from flows.prefect_server import ServerError, apply_defaults, prefect_api

apply_defaults()  # before Prefect is imported: no telemetry, our progress lines, generous timeouts

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Optional  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from rich.tree import Tree  # noqa: E402

from flows.config import ConfigError, PipelineConfig, load_config  # noqa: E402
from flows.report import accuracy_table, fmt  # noqa: E402
from tasks.core.stage import StageError  # noqa: E402
from tasks.core.store import Store, check_name  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
# Piped output (logs, CI) gets a wide fixed width so report cards don't wrap into columns.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="pipeline YAML")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override: stage.field=value (repeatable)")]
KeyOpt = Annotated[Optional[str], typer.Option(help="a stored key other than the configured one")]
DEFAULT_CONFIG = Path("configs/default.yaml")


def fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _names(values: list[str] | None) -> list[str]:
    return [n for v in values or [] for n in v.split(",") if n]


def _load(config: Path, sets: list[str] | None):
    from flows.pipeline import make_plan

    try:
        cfg = load_config(config, sets or [])
        return cfg, make_plan(cfg)
    except ConfigError as e:
        fail(str(e))


def _require_server(what: str) -> str:
    """Deployments live on a Prefect server; the temporary one `slmflow run` starts dies with it."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        fail(f"{what} needs a Prefect server: start one (prefect server start --host 127.0.0.1) and set "
             f"PREFECT_API_URL=http://127.0.0.1:4200/api (README, \"Running on GPU agents and on a schedule\")")
    return url


def _store(cfg: PipelineConfig, plan, stage_name: str) -> Store:
    return Store(cfg.run.models_root if plan.store_of(stage_name) == "models" else cfg.run.data_root)


@app.command()
def run(
    config: ConfigOpt = DEFAULT_CONFIG,
    only: Annotated[Optional[list[str]], typer.Option(help="run only these stages (and what they need)")] = None,
    force: Annotated[Optional[list[str]], typer.Option(help="recompute these stages even if cached")] = None,
    set_: SetOpt = None,
):
    """Run the pipeline (cached stages are skipped) and print the report card."""
    cfg, plan = _load(config, set_)
    only, force = _names(only), _names(force)
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
            result = pipeline(cfg.model_dump(mode="json"), only or None, force or None)
    except (ConfigError, StageError, ServerError) as e:
        fail(str(e))
    table = Table(title="slmflow report card")
    for col in ("stage", "key", "cached", "rows", "metrics", "time (s)"):
        table.add_column(col)
    for r in result["report"]:
        table.add_row(
            r["stage"], r["key"], "yes" if r["cached"] else "no",
            "\n".join(f"{k}: {v:,}" for k, v in r["rows"].items()),
            "\n".join(f"{k}: {fmt(v)}" for k, v in r["metrics"].items()),
            f"{r['seconds']:.1f}",
        )
    out.print(table)
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


@app.command()
def status(config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None):
    """Each stage of the configured pipeline: its key, whether the store has it, rows, created."""
    cfg, plan = _load(config, set_)
    table = Table(title=f"stages of {config}")
    for col in ("stage", "key", "cached", "rows", "created"):
        table.add_column(col)
    for name, planned in plan.stages.items():
        hit = _store(cfg, plan, planned.stage.name).get(planned.stage.name, planned.key)
        rows = ", ".join(f"{k} {v:,}" for k, v in hit.rows.items()) if hit else ""
        table.add_row(name, planned.key, "yes" if hit else "no", rows, hit.manifest.get("created", "") if hit else "")
    out.print(table)


def _artifact(cfg, plan, stage: str, key: str | None):
    if stage not in plan.stages:
        fail(f"no such stage: {stage} (stages: {', '.join(plan.stages)})")
    planned = plan.stages[stage]
    key = key or planned.key
    try:
        hit = _store(cfg, plan, planned.stage.name).get(planned.stage.name, check_name(key, "--key"))
    except ValueError as e:
        fail(str(e))
    if hit is None:
        fail(f"{stage} {key} is not in the store (run `slmflow run --only {stage}` first)")
    return hit


@app.command()
def show(
    stage: str,
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    key: KeyOpt = None,
    table: Annotated[Optional[str], typer.Option(help="which table of the output (default: first)")] = None,
    rows: Annotated[int, typer.Option(help="rows to show")] = 5,
):
    """A stage output's manifest and its first rows (read with duckdb)."""
    import duckdb

    cfg, plan = _load(config, set_)
    art = _artifact(cfg, plan, stage, key)
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


@app.command()
def lineage(
    stage: str,
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    key: KeyOpt = None,
):
    """The chain of stages and keys that produced a stage's output."""
    cfg, plan = _load(config, set_)

    def node(art, tree):
        rows = ", ".join(f"{k} {v:,}" for k, v in art.rows.items())
        label = f"[bold]{art.stage}[/] {art.key}  {rows}  (MLflow run {art.manifest.get('mlflow_run_id')})"
        branch = tree.add(label) if tree is not None else Tree(label)
        for name, ref in art.manifest.get("inputs", {}).items():
            up = _store(cfg, plan, ref["stage"]).get(ref["stage"], ref["key"])
            if up is None:
                branch.add(f"{name}: {ref['stage']} {ref['key']} (not in the store)")
            else:
                node(up, branch)
        return branch

    out.print(node(_artifact(cfg, plan, stage, key), None))


def _roots(cfg: PipelineConfig) -> list[Store]:
    return [Store(root) for root in dict.fromkeys((cfg.run.data_root, cfg.run.models_root))]


@app.command(help="Check stored outputs against their manifests (every file's size and sha256); a damaged "
             "output is named and set aside, so the next run recomputes it. Exit 1 if any was.")
def verify(
    stage: Annotated[Optional[str], typer.Argument(help="a stage or instance name (default: every output)")] = None,
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
):
    cfg, plan = _load(config, set_)
    name = plan.stages[stage].stage.name if stage in plan.stages else stage
    checked, damaged, nbytes = 0, 0, 0
    for store in _roots(cfg):
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
        fail(f"no stored outputs of stage {name!r} under {', '.join(s.root for s in _roots(cfg))}")
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
    roots = dict.fromkeys(s.root for cfg, _ in loaded for s in _roots(cfg))
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
def difficulty(prompt_id: str, config: ConfigOpt = DEFAULT_CONFIG, set_: SetOpt = None):
    """A prompt's pass rate over time: every offline difficulty table and RL history that scored it."""
    import duckdb

    cfg, _ = _load(config, set_)
    found = []
    for store, stage, table, query in (
        (cfg.run.data_root, "difficulty", "pass_rates",
         "SELECT NULL AS step, k, correct, pass_rate, kept FROM read_parquet($files) WHERE prompt_id = $id"),
        (cfg.run.models_root, "rl", "history",
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
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: SetOpt = None,
    key: KeyOpt = None,
):
    """Write a model stage's weights in the Hugging Face layout (loads as LlamaForCausalLM)."""
    from tasks.core.export import export_hf

    cfg, plan = _load(config, set_)
    art = _artifact(cfg, plan, stage, key)
    from tasks.core.store import local_dir

    if "model/model.safetensors" not in art.manifest["files"]:
        fail(f"{stage} has no model to export (not a training stage)")
    from tasks.core.tokens import BOS, END, PAD

    special = {"bos_token": BOS, "eos_token": END, "pad_token": PAD}
    try:
        model_dir = local_dir(f"{art.path}/model")
        out_dir = export_hf(model_dir, directory, tokenizer_json=model_dir / "tokenizer.json", special_tokens=special)
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
