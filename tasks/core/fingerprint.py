"""The fingerprint of the code a stage runs, so a cache hit made by other code is called stale.

A stage key hashes the stage's name, VERSION, config and inputs, never its code: an edit to a stage
that does not bump VERSION keeps every key, and the store answers with the output the old code made.
That is on purpose (a comment or a refactor must not throw away hours of training), but it should not
pass unseen. So every output's manifest records the code that made it, and a hit whose recorded code
differs from the current one is reported as stale; `slmflow run --rerun-stale` recomputes it and what
is downstream. Keys never change here: VERSION stays the way to force a rerun for everyone.

The code of a stage is its stage module (for a package `tasks/<stage>/`, every module of the package)
and every project module (`tasks.*`; `flows.*` never, stages do not import it) that it imports,
transitively, imports inside functions included, as read from the source with `ast` (nothing is
imported; the parent packages of an imported module count, as Python runs them; imports under
`if TYPE_CHECKING:` do not, as they never run; `importlib.import_module` calls are not seen). Each
module's hash is over its syntax tree without docstrings, so formatting, comments and docstrings
change nothing while any edit to what runs does. Hashes are cached per file by (path, mtime, size).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path

PROJECT = ("tasks",)  # the top-level packages whose modules are project code (a stage's own always is)
MODULE_CHARS = 12  # hex digits of a module's hash
FINGERPRINT_CHARS = 16  # hex digits of the combined fingerprint (as a stage key)

# (level, module, names) of one import statement: `from ..x import a, b` is (2, "x", ("a", "b"))
Import = tuple[int, str, tuple[str, ...]]
_cache: dict[tuple[str, int, int], tuple[str, tuple[Import, ...]]] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class Code:
    """The code of one stage: its module, each project module's hash, and one fingerprint over them."""

    module: str
    modules: dict[str, str]
    fingerprint: str

    def manifest(self) -> dict:
        """What a manifest records (`manifest["code"]`)."""
        return {"module": self.module, "fingerprint": self.fingerprint, "modules": dict(self.modules)}


def module_file(name: str, root: str | os.PathLike | None = None) -> Path | None:
    """The source file of module `name`, or None. The top-level package is found with
    `importlib.util.find_spec` (which imports nothing for a top-level name) or, with `root`, under that
    directory (a copy of the project); the rest of the name is a path below it, so nothing is imported."""
    top, *rest = name.split(".")
    if root is not None:
        base = Path(root) / top
        if not rest and not base.is_dir():
            return base.with_name(f"{top}.py") if base.with_name(f"{top}.py").is_file() else None
    else:
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):  # ValueError: a loaded module without a spec (__main__)
            return None
        if spec is None:
            return None
        if not spec.submodule_search_locations:  # a top-level module, not a package
            return Path(spec.origin) if not rest and spec.origin and spec.origin.endswith(".py") else None
        base = Path(list(spec.submodule_search_locations)[0])
    base = base.joinpath(*rest)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_name(f"{base.name}.py").is_file():
        return base.with_name(f"{base.name}.py")
    return None


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _type_checking(test: ast.expr) -> bool:
    """`if TYPE_CHECKING:` or `if typing.TYPE_CHECKING:`."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module) -> tuple[Import, ...]:
    """Every import statement of a module, wherever it is (functions, classes, try blocks)."""
    found: list[Import] = []
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _type_checking(node.test):
            todo.extend(node.orelse)  # the body never runs
            continue
        if isinstance(node, ast.Import):
            found.extend((0, a.name, ()) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or "", tuple(a.name for a in node.names)))
        todo.extend(ast.iter_child_nodes(node))
    return tuple(sorted(found))


def parse(path: Path) -> tuple[str, tuple[Import, ...]]:
    """(hash, imports) of one source file: sha256 of its syntax tree with the module, class and function
    docstrings removed (comments and formatting are not in the tree). Cached by (path, mtime, size)."""
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    with _lock:
        if key in _cache:
            return _cache[key]
    tree = ast.parse(path.read_bytes(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.body and _is_docstring(node.body[0]):
                node.body = node.body[1:]
    digest = hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()[:MODULE_CHARS]
    result = (digest, _imports(tree))
    with _lock:
        _cache[key] = result
    return result


def _absolute(imp: Import, importer: str, is_package: bool) -> list[str]:
    """The modules one import may name: `from a import b` names module a, and a.b when a.b is a module (b
    may be any name a defines: the caller keeps only names with a file). A relative import is resolved
    against the importer's package."""
    level, module, names = imp
    if level:
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        package = package[:len(package) - level + 1]
        module = ".".join([*package, module] if module else package)
    return [module, *(f"{module}.{n}" for n in names if n != "*")]


def _stage_unit(module: str, root: str | os.PathLike | None) -> list[str]:
    """A stage's own modules: its package `top.<stage>` (every module in it) when it is one, else its module."""
    parts = module.split(".")
    if len(parts) >= 2 and (init := module_file(".".join(parts[:2]), root)) and init.name == "__init__.py":
        package = ".".join(parts[:2])
        names = []
        for p in sorted(init.parent.rglob("*.py")):
            rel = p.relative_to(init.parent).with_suffix("").parts
            if any(part.startswith(".") or part == "__pycache__" for part in rel):
                continue
            names.append(".".join([package, *(rel[:-1] if rel[-1] == "__init__" else rel)]))
        return names
    return [module]


def fingerprint(module: str, packages: tuple[str, ...] = PROJECT, root: str | os.PathLike | None = None) -> Code:
    """The code of the stage whose function lives in `module`: per-module hashes (modules of `packages` and
    of the stage's own top-level package) and the combined fingerprint. `root`: read the source from
    that directory (one holding the top-level packages) instead of where Python finds it. Raises
    ValueError when the stage's module has no source file; SyntaxError when a module does not parse."""
    project = {*packages, module.split(".")[0]}
    hashes: dict[str, str] = {}
    if module_file(module, root) is None:
        raise ValueError(f"no source file for module {module}")
    todo = _stage_unit(module, root)
    while todo:
        name = todo.pop()
        if name in hashes or name.split(".")[0] not in project:
            continue
        path = module_file(name, root)
        if path is None:  # not a module (`from tasks.core import log`), or not there
            continue
        digest, imports = parse(path)
        hashes[name] = digest
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # the packages Python runs first
        for imp in imports:
            todo.extend(m for m in _absolute(imp, name, path.name == "__init__.py") if m)
    modules = dict(sorted(hashes.items()))
    combined = hashlib.sha256("\n".join(f"{m} {h}" for m, h in modules.items()).encode()).hexdigest()
    return Code(module, modules, combined[:FINGERPRINT_CHARS])


def current_code(module: str | None, packages: tuple[str, ...] = PROJECT) -> Code | None:
    """`fingerprint(module)`, or None when it cannot be told (no module, no source, a file that does not
    parse): a stage never fails for its fingerprint, its output just records no code."""
    if not module:
        return None
    try:
        return fingerprint(module, packages)
    except (OSError, ValueError, SyntaxError):
        return None


def stale_modules(recorded: dict | None, current: Code | None) -> list[str]:
    """The modules whose code differs between what an output recorded (`manifest["code"]`) and the current
    code: changed, new or no longer imported, sorted. Empty when the same, or when either is unknown
    (an output made before fingerprints, or code that cannot be read): unknown is never stale."""
    if not isinstance(recorded, dict) or current is None or recorded.get("fingerprint") == current.fingerprint:
        return []
    old, new = _modules(recorded), current.modules
    return sorted(m for m in old.keys() | new.keys() if old.get(m) != new.get(m))


def _modules(recorded: dict | None) -> dict:
    modules = recorded.get("modules") if isinstance(recorded, dict) else None
    return modules if isinstance(modules, dict) else {}


def describe(recorded: dict | None, current: Code | None) -> str:
    """The stale modules in a line: `tasks.dedup.minhash, tasks.core.x (new), tasks.core.y (no longer imported)`."""
    old, new = _modules(recorded), current.modules if current else {}
    return ", ".join(m if m in old and m in new else f"{m} (new)" if m in new else f"{m} (no longer imported)"
                     for m in stale_modules(recorded, current))


def stale_note(what: str, changes: str) -> str:
    """`<what> is stale: ...`, the words a stale output gets in a log line, the report card and `slmflow status`."""
    return (f"{what} is stale: its code changed since it was made ({changes}); "
            f"slmflow run --rerun-stale recomputes it and what is downstream")


def stale_line(label: str, key: str, recorded: dict | None, current: Code | None) -> str:
    """The one line a stale cache hit logs, instead of `<label>: cache hit <key>`."""
    return stale_note(f"{label}: cache hit {key}", describe(recorded, current))
