"""The import rules, read from the source: flows -> a stage (tasks/<stage>) -> tasks/core, never up or sideways.

- a building block (`tasks/core/*`) imports no stage and nothing of `flows`;
- a stage (`tasks/<stage>.py`, or a package `tasks/<stage>/` with its private helpers) imports only
  `tasks.core` and its own package: never another stage, never `flows`;
- no stage imports the runner (`tasks.core.orchestration`, `tasks.core.lineage`), Prefect or MLflow:
  `flows/` wraps stages, so loading a stage (or a YAML config of stages) loads neither;
- everything directly in `tasks/` is a stage (it defines `STAGE`): shared code lives in `tasks/core`.
Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ("tasks.core.orchestration", "tasks.core.lineage")
FRAMEWORKS = ("prefect", "mlflow")


def imported_modules(path: Path) -> set[str]:
    """Project modules (tasks.*, flows.*) and frameworks (prefect, mlflow) a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module in ("tasks", "tasks.core") \
                else [node.module]
            found.update(names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.split(".")[0] in ("tasks", "flows", *FRAMEWORKS)}


def layer(module: str) -> str:
    """flows | core | framework | stage:<name> (a stage and its private modules share one name)."""
    top = module.split(".")[0]
    if top in ("flows", *FRAMEWORKS):
        return "framework" if top in FRAMEWORKS else "flows"
    if module.startswith("tasks.core"):
        return "core"
    return "stage:" + module.split(".")[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def violations(path: Path, me: str) -> list[str]:
    """What `me` (the module at `path`) imports against the rules."""
    mine, wrong = layer(me), []
    for dep in sorted(imported_modules(path)):
        theirs = layer(dep)
        if mine == "core":
            bad = theirs in ("flows",) or theirs.startswith("stage:")
        else:  # a stage
            bad = theirs in ("flows", "framework") or dep.startswith(RUNNER) or (theirs.startswith("stage:") and theirs != mine)
        if bad:
            wrong.append(f"{me} imports {dep}")
    return wrong


def test_layers_point_down_only():
    wrong = []
    for path in sorted((ROOT / "tasks").rglob("*.py")):
        if path.parent != ROOT / "tasks" or path.name != "__init__.py":
            wrong += violations(path, module_name(path))
    assert wrong == []


def test_everything_in_tasks_is_a_stage():
    for path in sorted((ROOT / "tasks").iterdir()):
        if path.name in ("__init__.py", "core", "__pycache__"):
            continue
        source = path / "__init__.py" if path.is_dir() else path
        assert "\nSTAGE = Stage(" in source.read_text(), f"{path.name} is not a stage: move it to tasks/core"


def test_the_rules_catch_each_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from tasks.prompts import generate\n    from tasks.core import chat\n"
                   "    from tasks.dedup.minhash import signatures\n    import prefect\n"
                   "    from tasks.core.orchestration import stage_task\n    from flows.cli import main\n")
    assert imported_modules(bad) == {"tasks.prompts", "tasks.core.chat", "tasks.dedup.minhash", "prefect",
                                     "tasks.core.orchestration", "flows.cli"}
    assert violations(bad, "tasks.dedup.disk") == [
        "tasks.dedup.disk imports flows.cli", "tasks.dedup.disk imports prefect",
        "tasks.dedup.disk imports tasks.core.orchestration", "tasks.dedup.disk imports tasks.prompts"]
    assert violations(bad, "tasks.core.chat") == [
        "tasks.core.chat imports flows.cli", "tasks.core.chat imports tasks.dedup.minhash",
        "tasks.core.chat imports tasks.prompts"]


def test_core_holds_at_most_two_fifths_of_the_code():
    """The contract, the runner and what two or more stages share; a stage's own helpers live in its package."""
    def lines(paths):
        return sum(len(p.read_text().splitlines()) for p in paths)

    core = lines((ROOT / "tasks" / "core").rglob("*.py"))
    total = lines((ROOT / "tasks").rglob("*.py")) + lines((ROOT / "flows").rglob("*.py"))
    assert core <= 0.4 * total, f"tasks/core holds {core} of {total} lines ({core / total:.0%})"
