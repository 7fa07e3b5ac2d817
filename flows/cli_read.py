"""The `slmflow` commands that read the store: status, show, lineage, ls, verify, difficulty, export.
Without --config they follow the last run's plan (flows/record.py); none imports torch, mlflow or
prefect unless it must (export loads a model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from flows.cli_common import (
    KeyOpt,
    ReadConfigOpt,
    SetOpt,
    err,
    fail,
    instance_of,
    out,
    read_plan,
    stored_output,
)
from flows.record import Graph
from flows.record import lineage as lineage_graph
from tasks.core.fingerprint import current_code, describe, stale_modules, stale_note
from tasks.core.store import DamagedManifest, Store, check_name


def status(config: ReadConfigOpt = None, set_: SetOpt = None):
    """Each stage of the pipeline: its key, whether the store has it (and whether the code that made it is
    still the current: `yes (stale)` when not), rows, created."""
    record = read_plan(config, set_)
    table = Table(title=f"stages of {record.describe()}")
    for col in ("stage", "key", "cached", "rows", "created"):
        table.add_column(col)
    notes = []
    for name, inst in record.stages.items():
        store = record.store(inst.store)
        manifest = store.manifest_or_damage(inst.stage, inst.key)
        if isinstance(manifest, DamagedManifest):  # shown, not set aside: a read command leaves it to verify or a run
            table.add_row(name, inst.key, "damaged", f"{manifest.path.rsplit('/', 1)[-1]}: {manifest.why}", "")
            continue
        hit = store.get(inst.stage, inst.key)
        rows = ", ".join(f"{k} {v:,}" for k, v in hit.rows.items()) if hit else ""
        recorded = hit.manifest.get("code") if hit else None  # the code that made it, its module named
        current = current_code(recorded.get("module")) if isinstance(recorded, dict) else None  # read, not imported
        stale = stale_modules(recorded, current)
        if stale:
            notes.append(stale_note(f"{name} ({inst.key})", describe(recorded, current)))
        cached = ("yes (stale)" if stale else "yes") if hit else "no"
        table.add_row(name, inst.key, cached, rows, hit.manifest.get("created", "") if hit else "")
    out.print(table)
    for note in notes:
        out.print(note, highlight=False, soft_wrap=True)


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

    art = stored_output(read_plan(config, set_), stage, key)
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


def lineage(
    stage: str,
    config: ReadConfigOpt = None,
    set_: SetOpt = None,
    key: KeyOpt = None,
    format: Annotated[str, typer.Option("--format", help="table, json or mermaid")] = "table",
):
    """The outputs that produced a stage's output, each once, upstream first (a DAG, not a tree)."""
    record = read_plan(config, set_)
    instance_of(record, stage)
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


def ls(config: ReadConfigOpt = None, set_: SetOpt = None):
    """Everything the stores hold: stage, key, created, size, the config that produced it, its instance in the plan."""
    record = read_plan(config, set_)
    instances = {(i.stage, i.key): name for name, i in record.stages.items()}
    table = Table(title=f"outputs in {', '.join(s.root for s in record.roots())}")
    for col in ("stage", "key", "created", "MB", "produced with", "in the plan as"):
        table.add_column(col)
    count, total, damaged = 0, 0, []
    for store in record.roots():
        for stage in store.stages():
            for k in store.keys(stage):
                m = store.manifest_or_damage(stage, k) or {}
                count += 1
                if isinstance(m, DamagedManifest):
                    damaged.append(m)
                    table.add_row(stage, k, "damaged", "?", "", instances.get((stage, k), ""))
                    continue
                size = sum(m.get("sizes", {}).values())
                total += size
                table.add_row(stage, k, m.get("created", "?"), f"{size / 1e6:,.1f}", m.get("config_file") or "",
                              instances.get((stage, k), ""))
    out.print(table)
    out.print(f"{count} outputs, {total / 1e6:,.1f} MB" + (f", {len(damaged)} damaged" if damaged else ""))
    for m in damaged:
        err.print(f"[bold red]damaged:[/] {m}; slmflow verify sets it aside", highlight=False, soft_wrap=True)


def verify(
    stage: Annotated[Optional[str], typer.Argument(help="a stage or instance name (default: every output)")] = None,
    config: ReadConfigOpt = None,
    set_: SetOpt = None,
):
    """Check stored outputs against their manifests (the manifest itself, every file's size and sha256) and
    the checkpoints of unfinished keys (each loads); a damaged one is named and set aside, so the next run
    recomputes it or resumes from an earlier checkpoint. Exit 1 if any was."""
    record = read_plan(config, set_)
    name = record.stages[stage].stage if stage in record.stages else stage
    checked, damaged, nbytes, ckpts = 0, 0, 0, 0
    for store in record.roots():
        for stage_name in store.stages():
            if name and stage_name != name:
                continue
            for key in store.keys(stage_name):
                manifest = store.manifest_or_damage(stage_name, key)
                if manifest is None:  # gone since the listing (gc, or a run replacing it)
                    continue
                if isinstance(manifest, DamagedManifest):
                    problems = [str(manifest)]
                else:
                    problems = store.problems(stage_name, key, manifest, digests=True)
                    nbytes += sum(manifest["sizes"].values())
                checked += 1
                for line in problems:
                    err.print(f"[bold red]damaged:[/] {line}", highlight=False, soft_wrap=True)
                if problems:
                    damaged += 1
                    err.print(f"  {stage_name} {key} set aside as {store.set_aside(stage_name, key)}; "
                              f"the next run recomputes it", highlight=False, soft_wrap=True)
            bad, count = _verify_checkpoints(store, stage_name)
            damaged, ckpts = damaged + bad, ckpts + count
    if name and not checked and not ckpts:
        fail(f"no stored outputs of stage {name!r} under {', '.join(s.root for s in record.roots())}")
    also = f" and {ckpts} checkpoints" if ckpts else ""
    out.print(f"verified {checked} outputs ({nbytes / 1e6:,.1f} MB){also}: {damaged} damaged")
    if damaged:
        raise typer.Exit(1)


def _verify_checkpoints(store: Store, stage: str) -> tuple[int, int]:
    """Check that each checkpoint in the stage's `.work-<key>` dirs loads; set aside those that do not.
    (damaged, checked). torch is imported only when there are checkpoints; a key a run holds is skipped
    (it writes and prunes its checkpoints as we read)."""
    works = [store.local_path / stage / n for s, n in store.hidden() if s == stage and n.startswith(".work-")]
    works = [w for w in works if any(w.glob("ckpt-*")) and not store.lock(stage, w.name[len(".work-"):]).held()]
    if not works:
        return 0, 0
    from tasks.core.train import CheckpointError, checkpoints, read_checkpoint, set_aside_checkpoint

    damaged, checked = 0, 0
    for work in works:
        for path in checkpoints(work):
            checked += 1
            try:
                read_checkpoint(path)
            except CheckpointError as e:
                damaged += 1
                aside = set_aside_checkpoint(path)
                err.print(f"[bold red]damaged:[/] {path}: {e}", highlight=False, soft_wrap=True)
                err.print(f"  set aside as {aside.name if aside else '(moved already)'}; the next run resumes "
                          f"from an earlier checkpoint, or step 0", highlight=False, soft_wrap=True)
    return damaged, checked


def difficulty(prompt_id: str, config: ReadConfigOpt = None, set_: SetOpt = None):
    """A prompt's pass rate over time: every offline difficulty table and RL history that scored it."""
    import duckdb

    record = read_plan(config, set_)
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


def export(
    stage: str,
    directory: Path,
    config: ReadConfigOpt = None,
    set_: SetOpt = None,
    key: KeyOpt = None,
):
    """Write a model stage's weights in the Hugging Face layout (LlamaForCausalLM, with our chat template)."""
    from flows.export import export_hf
    from tasks.core.model import WEIGHTS
    from tasks.core.outputs import MODEL_DIR, local_model_dir
    from tasks.core.tokens import TOKENIZER_FILE

    art = stored_output(read_plan(config, set_), stage, key)

    if f"{MODEL_DIR}/{WEIGHTS}" not in art.manifest["files"]:
        fail(f"{stage} has no model to export (not a training stage)")
    from tasks.core.chat import HF_CHAT_TEMPLATE
    from tasks.core.tokens import BOS, END, PAD

    special = {"bos_token": BOS, "eos_token": END, "pad_token": PAD}
    try:
        model_dir = local_model_dir(art)
        out_dir = export_hf(model_dir, directory, tokenizer_json=model_dir / TOKENIZER_FILE, special_tokens=special,
                            chat_template=HF_CHAT_TEMPLATE)
    except ValueError as e:
        fail(f"export {stage}: {e}")
    out.print(f"exported {stage} {art.key} to {out_dir} (Hugging Face Llama layout)")
