"""Code fingerprints: which edits mark a stored output stale, the stale line, and what --rerun-stale reruns.

Keys never change here (tests/test_keys.py): a fingerprint only says that a cache hit was made by other code.
The project's own tree is fingerprinted from a copy (edits never touch the checkout); the stale line and
the reruns use toy stages in a temp package, run with run_stage against a store in tmp_path.
"""

from __future__ import annotations

import ast
import importlib
import logging
import os
import shutil
import textwrap
import uuid
from pathlib import Path

import pytest
from conftest import TINY
from typer.testing import CliRunner

from flows.config import load_config
from flows.pipeline import Plan, make_plan
from flows.record import Instance, RunRecord
from flows.report import headline, report_card, to_markdown
from tasks.core.fingerprint import fingerprint, stale_modules
from tasks.core.stage import Outcome, Stage, StageConfig, run_stage
from tasks.core.store import Store

ROOT = Path(__file__).resolve().parents[1]
STAGES = sorted(p.stem for p in (ROOT / "tasks").iterdir()
                if p.name not in ("core", "__init__.py") and not p.name.startswith((".", "_")))
# the stages whose code reads tasks/core/chat.py, directly or through another module (worked out by hand
# from their imports on 2026-12-07; test_chat_stages_match_an_import_scan keeps it honest)
CHAT_STAGES = {"difficulty", "eval", "ingest", "preselect", "prompts", "rl", "sft"}


def project_copy(tmp_path: Path) -> Path:
    """A copy of the project's tasks/ tree: (root holding tasks/)."""
    shutil.copytree(ROOT / "tasks", tmp_path / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def fingerprints(root: Path) -> dict[str, str]:
    return {s: fingerprint(f"tasks.{s}", root=root).fingerprint for s in STAGES}


def edit(path: Path, old: str, new: str) -> None:
    """Replace text in a file, with a later mtime whatever the clock's resolution (the cache reads it)."""
    text = path.read_text()
    assert old in text, (path, old)
    before = path.stat().st_mtime_ns
    path.write_text(text.replace(old, new, 1))
    os.utime(path, ns=(before + 10**9, before + 10**9))


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {s for s in before if before[s] != after[s]}


# --- which edits change which stage's fingerprint ---------------------------------------------------


def test_comments_formatting_and_docstrings_change_nothing(tmp_path):
    root = project_copy(tmp_path)
    before = fingerprints(root)
    store = root / "tasks" / "core" / "store.py"
    edit(store, "def canonical_json(value: Any) -> str:\n",
         "# a comment above a function\ndef canonical_json(value: Any) -> str:  # and one beside it\n")
    edit(store, '    """The one JSON spelling of a value: sorted keys, no whitespace, UTF-8 kept."""',
         '    """A new docstring,\n    on two lines."""')  # a function's docstring
    edit(store, '"""The content-addressed stage store:', '"""Reworded: the content-addressed stage store:')  # the module's
    edit(store, "KEY_CHARS = 16", "KEY_CHARS = (\n    16\n)")  # formatting only
    assert fingerprints(root) == before


def test_a_body_edit_in_chat_changes_exactly_the_stages_that_import_it(tmp_path):
    root = project_copy(tmp_path)
    before = {s: fingerprint(f"tasks.{s}", root=root) for s in STAGES}
    chat = root / "tasks" / "core" / "chat.py"
    chat.write_text(chat.read_text() + "\n_EDITED = 1\n")
    after = {s: fingerprint(f"tasks.{s}", root=root) for s in STAGES}
    assert {s for s in STAGES if before[s].fingerprint != after[s].fingerprint} == CHAT_STAGES
    for s in CHAT_STAGES:  # and the one module named is chat
        assert stale_modules(before[s].manifest(), after[s]) == ["tasks.core.chat"]


def test_a_body_edit_in_a_private_module_changes_only_its_stage(tmp_path):
    root = project_copy(tmp_path)
    before = fingerprints(root)
    minhash = root / "tasks" / "dedup" / "minhash.py"
    minhash.write_text(minhash.read_text() + "\n_EDITED = 1\n")
    assert changed(before, fingerprints(root)) == {"dedup"}


def test_a_body_edit_in_the_stage_contract_changes_every_stage(tmp_path):
    root = project_copy(tmp_path)
    before = fingerprints(root)
    store = root / "tasks" / "core" / "store.py"
    edit(store, "KEY_CHARS = 16", "KEY_CHARS = 16\n_EDITED = 1")
    assert changed(before, fingerprints(root)) == set(STAGES)


def independent_import_scan(target: str) -> set[str]:
    """The stages that reach `target` through `import` statements anywhere in their files: every module
    file of tasks/ read on its own, a name counted when some file of tasks/ is that module."""
    def name(p: Path) -> str:
        parts = p.relative_to(ROOT).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    files = {name(p): p for p in (ROOT / "tasks").rglob("*.py")}
    deps = {}
    for module, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        deps[module] = found & files.keys()
    reaching = set()
    for stage in STAGES:
        todo = [m for m in files if m == f"tasks.{stage}" or m.startswith(f"tasks.{stage}.")]
        seen: set[str] = set()
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(deps[m])
        if target in seen:
            reaching.add(stage)
    return reaching


def test_chat_stages_match_an_import_scan():
    """The literal set above, checked against a scan that shares no code with tasks.core.fingerprint: a
    new import of chat fails here instead of drifting."""
    assert independent_import_scan("tasks.core.chat") == CHAT_STAGES
    assert {s for s in STAGES if "tasks.core.chat" in fingerprint(f"tasks.{s}").modules} == CHAT_STAGES


def test_a_stage_package_counts_every_module_in_it():
    modules = fingerprint("tasks.dedup").modules
    assert {"tasks.dedup", "tasks.dedup.disk", "tasks.dedup.minhash", "tasks.core.store"} <= modules.keys()
    assert not any(m.startswith("flows") for m in modules)


# --- toy stages: the stale line, Outcome.stale, --rerun-stale ----------------------------------------


class ToyConfig(StageConfig):
    n: int = 1


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A package `toyfp_<id>` on sys.path: helper (imported inside b's function), a, b (reads a), c (reads b),
    d (alone). Returns (package dir, {name: Stage})."""
    pkg = f"toyfp_{uuid.uuid4().hex[:8]}"
    base = tmp_path / "code" / pkg
    base.mkdir(parents=True)
    (base / "__init__.py").write_text('"""Toy stages."""\n')
    (base / "helper.py").write_text("def scale(x):\n    return x * 2\n")
    body = """
        from tasks.core.base import log


        def make(cfg, inputs, ctx):
            {extra}
            (ctx.out / "out.txt").write_text(str(cfg.n))
            log.debug("made %s", ctx.stage)
            return {{"rows": {{"out": 1}}}}
        """
    for name in "acd":
        (base / f"{name}.py").write_text(textwrap.dedent(body.format(extra="pass")))
    (base / "b.py").write_text(textwrap.dedent(body.format(extra=f"from {pkg}.helper import scale\n            scale(1)")))
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    stages = {n: Stage(f"toy_{n}", 1, ToyConfig, importlib.import_module(f"{pkg}.{n}").make) for n in "abcd"}
    yield base, stages
    for m in [m for m in list(importlib.sys.modules) if m.startswith(pkg)]:
        del importlib.sys.modules[m]


def toy_plan(stages) -> Plan:
    plan = Plan()
    a = plan(stages["a"], ToyConfig())
    b = plan(stages["b"], ToyConfig(), documents=a)
    plan(stages["c"], ToyConfig(), documents=b)
    plan(stages["d"], ToyConfig())
    return plan


def run_plan(plan: Plan, store: Store, force: set[str] = frozenset()) -> dict[str, Outcome]:
    outcomes = {}
    for name, p in plan.stages.items():
        inputs = {k: outcomes[up].artifact for k, up in p.inputs.items()}
        outcomes[name] = run_stage(p.stage, p.cfg, inputs, store, force=name in force, key=p.key)
    return outcomes


def test_a_fresh_output_records_its_code(toy, tmp_path):
    base, stages = toy
    out = run_stage(stages["b"], ToyConfig(), {}, Store(tmp_path / "data"))
    code = out.artifact.manifest["code"]
    assert code == fingerprint(f"{base.name}.b").manifest()
    # its module, the helper it imports inside its function, the package that runs first, and tasks.*
    assert {f"{base.name}.b", f"{base.name}.helper", base.name, "tasks.core.base"} <= code["modules"].keys()
    assert f"{base.name}.a" not in code["modules"]


def test_a_real_stage_output_records_its_code(tmp_path):
    from tasks import prompts

    out = run_stage(prompts.STAGE, load_config(TINY).prompts, {}, Store(tmp_path / "data"))
    code = out.artifact.manifest["code"]
    assert code["module"] == "tasks.prompts"
    assert code["fingerprint"] == fingerprint("tasks.prompts").fingerprint
    assert "tasks.core.chat" in code["modules"]


def test_a_hit_made_by_other_code_is_stale_in_one_line(toy, tmp_path, caplog):
    base, stages = toy
    store = Store(tmp_path / "data")
    first = run_stage(stages["b"], ToyConfig(), {}, store, label="toy_b_1")
    with caplog.at_level(logging.INFO, logger="slmflow"):
        again = run_stage(stages["b"], ToyConfig(), {}, store, label="toy_b_1")
    assert again.cached and again.stale == []
    assert not [r for r in caplog.records if "stale" in r.getMessage()]

    edit(base / "helper.py", "x * 2", "x * 20")  # a body edit: the key stays, the code does not
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="slmflow"):
        hit = run_stage(stages["b"], ToyConfig(), {}, store, label="toy_b_1")
    assert hit.cached and hit.artifact.key == first.artifact.key
    assert hit.stale == [f"{base.name}.helper"]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"toy_b_1: cache hit {first.artifact.key} is stale: its code changed since it was made "
                     f"({base.name}.helper); slmflow run --rerun-stale recomputes it and what is downstream"]
    assert caplog.records[0].levelname == "WARNING"

    # a new import is named as new; recomputing records the current code, and the next hit is fresh
    edit(base / "b.py", "scale(1)", f"scale(1)\n    from {base.name} import c  # noqa: F401")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="slmflow"):
        assert sorted(run_stage(stages["b"], ToyConfig(), {}, store).stale) == sorted(
            [f"{base.name}.b", f"{base.name}.c", f"{base.name}.helper"])
    assert f"{base.name}.c (new)" in caplog.records[0].getMessage()
    run_stage(stages["b"], ToyConfig(), {}, store, force=True)
    assert run_stage(stages["b"], ToyConfig(), {}, store).stale == []


def test_an_output_from_before_fingerprints_is_not_stale(toy, tmp_path, caplog):
    base, stages = toy
    store = Store(tmp_path / "data")
    out = run_stage(stages["b"], ToyConfig(), {}, store)
    manifest = Path(out.artifact.path) / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"code": {', '"old_code": {'))
    edit(base / "helper.py", "x * 2", "x * 20")
    with caplog.at_level(logging.INFO, logger="slmflow"):
        hit = run_stage(stages["b"], ToyConfig(), {}, store)
    assert hit.cached and hit.stale == []
    assert not [r for r in caplog.records if "stale" in r.getMessage()]


def test_rerun_stale_picks_the_stale_stage_and_what_is_downstream(toy, tmp_path, caplog):
    base, stages = toy
    store = Store(tmp_path / "data")
    plan = toy_plan(stages)
    run_plan(plan, store)
    names = list(plan.stages)
    assert plan.stale(names, lambda s: store) == {}
    assert plan.rerun_stale(names, lambda s: store) == []

    edit(base / "helper.py", "x * 2", "x * 20")  # only b imports it
    assert plan.stale(names, lambda s: store) == {"toy_b": [f"{base.name}.helper"]}
    with caplog.at_level(logging.INFO, logger="slmflow"):
        rerun = plan.rerun_stale(names, lambda s: store)
    assert rerun == ["toy_b", "toy_c"]  # not a (upstream), not d (elsewhere)
    assert f"--rerun-stale: toy_b ({base.name}.helper) stale; recomputing toy_b, toy_c" in caplog.text
    assert plan.rerun_stale(["toy_a", "toy_b"], lambda s: store) == ["toy_b"]  # only what the run needs

    outcomes = run_plan(plan, store, force=set(rerun))
    assert {n for n, o in outcomes.items() if not o.cached} == {"toy_b", "toy_c"}
    assert plan.stale(names, lambda s: store) == {}


@pytest.mark.parametrize("stage,setting", [("dedup", "dedup.bands=20"), ("ref_0", "references.models.0.pretrain.lr=0.02"),
                                           ("pretrain", "pretrain.lr=0.02"), ("sft", "sft.lr=0.01"), ("rl", "rl.lr=0.002")])
def test_downstream_in_the_tiny_plan_is_what_a_key_change_reaches(stage, setting):
    """What --rerun-stale recomputes after a stale X is what a new key for X would recompute."""
    plan = make_plan(load_config(TINY))
    changed = {n for n, p in make_plan(load_config(TINY, [setting])).stages.items() if p.key != plan.stages[n].key}
    assert set(plan.downstream([stage])) == changed


# --- where a stale output is shown --------------------------------------------------------------------


def test_the_report_card_marks_a_stale_hit(toy, tmp_path):
    base, stages = toy
    store = Store(tmp_path / "data")
    plan = toy_plan(stages)
    run_plan(plan, store)
    edit(base / "helper.py", "x * 2", "x * 20")
    card = report_card(list(run_plan(plan, store).items()), plan)
    assert [r["stale"] for r in card] == [[], [f"{base.name}.helper"], [], []]
    md = to_markdown(card)
    assert f"| toy_b | `{plan.stages['toy_b'].key}` | yes (stale) |" in md
    assert f"| toy_c | `{plan.stages['toy_c'].key}` | yes |" in md
    assert (f"- toy_b ({plan.stages['toy_b'].key}) is stale: its code changed since it was made ({base.name}.helper); "
            f"slmflow run --rerun-stale recomputes it and what is downstream") in md
    assert "(4 cached, 1 stale)" in headline(card)


def test_status_marks_a_stale_output(toy, tmp_path, monkeypatch):
    from flows.cli import app

    base, stages = toy
    store = Store(tmp_path / "data")
    plan = toy_plan(stages)
    run_plan(plan, store)
    record = RunRecord(None, [], str(tmp_path / "data"), str(tmp_path / "data"),
                       {n: Instance(n, p.stage.name, p.key, "data", dict(p.inputs)) for n, p in plan.stages.items()})
    record.save()
    monkeypatch.setenv("SLMFLOW_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("COLUMNS", "250")
    fresh = CliRunner().invoke(app, ["status"])
    assert fresh.exit_code == 0, fresh.output
    assert "(stale)" not in fresh.output and "is stale" not in fresh.output

    edit(base / "helper.py", "x * 2", "x * 20")
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line.split("│")[3].strip() for line in result.output.splitlines()
            if line.startswith("│") and line.split("│")[1].strip().startswith("toy_")}
    assert rows == {"toy_a": "yes", "toy_b": "yes (stale)", "toy_c": "yes", "toy_d": "yes"}
    assert (f"toy_b ({plan.stages['toy_b'].key}) is stale: its code changed since it was made ({base.name}.helper); "
            f"slmflow run --rerun-stale recomputes it and what is downstream") in result.output


def test_run_has_rerun_stale():
    from flows.cli import app

    result = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert "--rerun-stale" in result.output


def test_relative_imports_count_and_type_checking_imports_do_not(toy):
    base, _ = toy
    (base / "e.py").write_text(textwrap.dedent("""
        from typing import TYPE_CHECKING

        if TYPE_CHECKING:  # never runs
            from . import d


        def make(cfg, inputs, ctx):
            from .helper import scale
            return scale(1)
        """))
    modules = fingerprint(f"{base.name}.e").modules
    assert f"{base.name}.helper" in modules and f"{base.name}.d" not in modules
