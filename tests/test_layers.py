"""The import rule, read from the source: flows -> tasks/<stage>.py -> tasks/core, never up or sideways.

- a building block (`tasks/core/*`) imports no stage module and nothing of `flows`;
- a stage module (`tasks/<stage>.py`) imports building blocks only: never another stage, never `flows`;
- every module directly in `tasks/` is a stage (it defines `STAGE`): shared code lives in `tasks/core`.
Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Project modules (tasks.*, flows.*) a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module in ("tasks", "tasks.core") \
                else [node.module]
            found.update(names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.split(".")[0] in ("tasks", "flows")}


def layer(module: str) -> str:
    if module.startswith("flows"):
        return "flows"
    return "core" if module.startswith("tasks.core") else "stage"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def test_layers_point_down_only():
    wrong = []
    for path in sorted((ROOT / "tasks").rglob("*.py")):
        if path.name == "__init__.py":
            continue
        me = module_name(path)
        for dep in sorted(imported_modules(path)):
            if layer(dep) == "flows" or (layer(me) == "core" and layer(dep) != "core") or \
                    (layer(me) == "stage" and layer(dep) == "stage"):
                wrong.append(f"{me} imports {dep}")
    assert wrong == []


def test_every_module_in_tasks_is_a_stage():
    for path in sorted((ROOT / "tasks").glob("*.py")):
        if path.name != "__init__.py":
            assert "\nSTAGE = Stage(" in path.read_text(), f"{path.name} is not a stage: move it to tasks/core"


def test_the_rule_catches_a_sideways_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from tasks.prompts import generate\n    from tasks.core import chat\n")
    assert imported_modules(bad) == {"tasks.prompts", "tasks.core.chat"}
    assert layer("tasks.prompts") == "stage" and layer("tasks.core.chat") == "core" and layer("flows.cli") == "flows"
