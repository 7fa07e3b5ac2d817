"""Source readers for the ingest stage: each yields RawDoc(source, ref, data).

Readers of files yield raw bytes (the caller decodes: utf-8, errors=replace).
Bad input raises one SourceError with a one-line message naming the file, row or
setting; `validate` (also run first by `read_source`) checks every matched file's
schema before anything is yielded.  Order is deterministic (sorted walks/globs).
JSONL and invalid UTF-8: each line is decoded with surrogateescape; a text value
that then holds undecodable bytes is yielded as *bytes* (original bytes kept),
a clean one as str.  JSONL files are read twice (a full check, then the yield).
Optional `stats` dicts receive counters such as skipped_too_large, skipped_null.
"""
from __future__ import annotations

import contextlib
import fnmatch
import glob
import importlib.util
import io
import json
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

# Fast (< 0.3 ms/item), deterministic across PYTHONHASHSEED, readable arithmetic/word problems.
DEFAULT_RG_TASKS = ("basic_arithmetic chain_sum gsm_symbolic leg_counting family_relationships syllogism "
                    "caesar_cipher letter_counting word_sorting gcd fraction_simplification time_intervals "
                    "calendar_arithmetic spell_backward sentence_reordering").split()


class SourceError(ValueError):
    """Bad source input; the message is always a single line."""
    def __init__(self, msg: str):
        super().__init__(" ".join(str(msg).splitlines()))


@dataclass(frozen=True)
class RawDoc:
    source: str  # config source name (cfg.name or cfg.kind)
    ref: str  # stable reference within the source
    data: bytes | str


class _Src(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str | None = None  # RawDoc.source; defaults to kind


class StdlibSource(_Src):
    kind: Literal["stdlib"] = "stdlib"
    max_bytes: int = Field(200_000, gt=0)
    max_files: int | None = Field(None, gt=0)
    include_tests: bool = False


class PydocSource(_Src):
    kind: Literal["pydoc"] = "pydoc"


class PackageTextsSource(_Src):
    kind: Literal["package_texts"] = "package_texts"
    packages: list[str] = Field(default_factory=lambda: ["reasoning_gym"], min_length=1)
    patterns: list[str] = Field(default_factory=lambda: ["*.txt", "*.md", "*.rst"], min_length=1)
    exclude: list[str] = Field(default_factory=list)  # matched against "<pkg>/<relpath>"
    max_bytes: int = Field(2_000_000, gt=0)
    chunk_chars: int | None = Field(20_000, gt=0)  # measured in bytes; paragraphs kept whole
    strip_gutenberg: bool = True  # keep only text between *** START OF / *** END OF


class ReasoningGymSource(_Src):
    kind: Literal["reasoning_gym"] = "reasoning_gym"
    tasks: list[str] = Field(default_factory=lambda: list(DEFAULT_RG_TASKS), min_length=1)
    size: int = Field(200, gt=0)
    seed: int = 1234
    task_args: dict[str, dict[str, Any]] = Field(default_factory=dict)


class ParquetSource(_Src):
    kind: Literal["parquet"] = "parquet"
    path: str
    text_column: str = "text"
    batch_size: int = Field(1024, gt=0)


class JsonlSource(_Src):
    kind: Literal["jsonl"] = "jsonl"
    path: str
    text_column: str = "text"


SourceConfig = Annotated[
    Union[StdlibSource, PydocSource, PackageTextsSource, ReasoningGymSource, ParquetSource, JsonlSource],
    Field(discriminator="kind"),
]


def _bump(stats: dict | None, key: str) -> None:
    if stats is not None:
        stats[key] = stats.get(key, 0) + 1


def _glob(cfg: ParquetSource | JsonlSource) -> list[str]:
    files = sorted(f for f in glob.glob(os.path.expanduser(cfg.path), recursive=True) if os.path.isfile(f))
    if not files:
        raise SourceError(f"{cfg.kind} source: no files match {cfg.path!r}")
    return files


# --- stdlib / pydoc -------------------------------------------------------------------------------
def _stdlib_files(cfg: StdlibSource, stats: dict | None = None) -> list[tuple[str, str]]:
    root, out = sysconfig.get_paths()["stdlib"], []
    for dirpath, dirnames, filenames in os.walk(root):
        skip = {"site-packages", "dist-packages", "__pycache__"} | (set() if cfg.include_tests else {"test", "tests", "idle_test"})
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for path in (os.path.join(dirpath, fn) for fn in sorted(filenames) if fn.endswith(".py")):
            if os.path.getsize(path) > cfg.max_bytes:
                _bump(stats, "skipped_too_large")
            else:
                out.append((Path(os.path.relpath(path, root)).as_posix(), path))
            if cfg.max_files is not None and len(out) >= cfg.max_files:
                return out
    return out


def read_stdlib(cfg: StdlibSource, stats: dict | None = None) -> Iterator[RawDoc]:
    for rel, path in _stdlib_files(cfg, stats):
        yield RawDoc(cfg.name or cfg.kind, rel, Path(path).read_bytes())


def read_pydoc(cfg: PydocSource, stats: dict | None = None) -> Iterator[RawDoc]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield RawDoc(cfg.name or cfg.kind, f"topic:{name}", topics[name])


# --- prose files shipped in installed packages ----------------------------------------------------
def _package_files(cfg: PackageTextsSource, stats: dict | None = None) -> list[tuple[str, str]]:
    out = []
    for pkg in cfg.packages:
        try:
            spec = importlib.util.find_spec(pkg)
        except (ImportError, ValueError) as e:
            raise SourceError(f"package_texts source: cannot find package {pkg!r} ({e})") from None
        if spec is None:
            raise SourceError(f"package_texts source: package {pkg!r} is not installed")
        if not spec.submodule_search_locations:
            raise SourceError(f"package_texts source: {pkg!r} is a module, not a package")
        found = 0
        for loc in sorted(spec.submodule_search_locations):
            for dirpath, dirnames, filenames in os.walk(loc):
                dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
                for path in (os.path.join(dirpath, fn) for fn in sorted(filenames)):
                    ref = f"{pkg.replace('.', '/')}/{Path(os.path.relpath(path, loc)).as_posix()}"
                    if not any(fnmatch.fnmatchcase(ref, "*/" + p) for p in cfg.patterns) or any(
                            fnmatch.fnmatchcase(ref, x) for x in cfg.exclude):
                        continue
                    found += 1
                    if os.path.getsize(path) > cfg.max_bytes:
                        _bump(stats, "skipped_too_large")
                    else:
                        out.append((ref, path))
        if not found:
            raise SourceError(f"package_texts source: no files matching {cfg.patterns} in package {pkg!r}")
    return out


def _strip_gutenberg(data: bytes) -> bytes:
    start, end = data.find(b"*** START OF"), data.find(b"*** END OF")
    return data if start < 0 or end < start else data[data.find(b"\n", start) + 1 : end].strip() + b"\n"


def _chunks(data: bytes, size: int) -> list[bytes]:
    """Split at blank lines into pieces of about `size` bytes (a long paragraph stays whole)."""
    cuts = [m.end() for m in re.finditer(rb"\n[ \t\r]*\n", data)] + [len(data)]
    out, start, prev = [], 0, 0
    for c in cuts:
        if c - start > size and prev > start:
            out.append(data[start:prev])
            start = prev
        prev = c
    out.append(data[start:])
    return [o for o in out if o.strip()]


def read_package_texts(cfg: PackageTextsSource, stats: dict | None = None) -> Iterator[RawDoc]:
    for ref, path in _package_files(cfg, stats):
        data = Path(path).read_bytes()
        data = _strip_gutenberg(data) if cfg.strip_gutenberg else data
        if cfg.chunk_chars is None or len(data) <= cfg.chunk_chars:
            yield RawDoc(cfg.name or cfg.kind, ref, data)
            continue
        for i, chunk in enumerate(_chunks(data, cfg.chunk_chars)):
            yield RawDoc(cfg.name or cfg.kind, f"{ref}#{i}", chunk)


# --- reasoning-gym ---------------------------------------------------------------------------------
def _render(item: dict) -> str:
    parts = [str(item["question"]).strip()]
    cot = (item.get("metadata") or {}).get("answer_cot")  # worked solution (gsm_symbolic)
    if isinstance(cot, str) and cot.strip():
        parts.append(re.sub(r"\n#### .*$", "", cot.strip()))
    answer = item.get("answer")
    if answer is not None:
        answer = str(answer).strip()
        parts.append(f"Answer:\n{answer}" if "\n" in answer else f"Answer: {answer}")
    return "\n\n".join(parts) + "\n"


def read_reasoning_gym(cfg: ReasoningGymSource, stats: dict | None = None) -> Iterator[RawDoc]:
    import reasoning_gym

    for task in cfg.tasks:
        quiet = contextlib.redirect_stdout(io.StringIO())  # some generators print (e.g. bf)
        with quiet:
            ds = reasoning_gym.create_dataset(task, size=cfg.size, seed=cfg.seed, **cfg.task_args.get(task, {}))
        for i in range(cfg.size):
            with quiet:
                item = ds[i]
            yield RawDoc(cfg.name or cfg.kind, f"{task}:{cfg.seed}:{i}", _render(item))


def _check_reasoning_gym(cfg: ReasoningGymSource) -> None:
    from reasoning_gym.factory import DATASETS

    for task in cfg.tasks:
        if task not in DATASETS:
            known = ", ".join(sorted(DATASETS)[:8])
            raise SourceError(f"reasoning_gym source: unknown task {task!r} (known: {known}, ... {len(DATASETS)} in all)")
    for task, args in cfg.task_args.items():
        if task not in cfg.tasks:
            raise SourceError(f"reasoning_gym source: task_args names {task!r}, which is not in tasks")
        if {"size", "seed"} & set(args):
            raise SourceError(f"reasoning_gym source: task_args for {task!r} may not set size/seed")
        try:
            conf = DATASETS[task][1](size=cfg.size, seed=cfg.seed, **args)  # cheap: builds no dataset
            getattr(conf, "validate", lambda: None)()
        except Exception as e:
            raise SourceError(f"reasoning_gym source: bad task_args for {task!r} ({type(e).__name__}: {e})") from None


# --- user files ------------------------------------------------------------------------------------
def _parquet_check(cfg: ParquetSource, f: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except Exception as e:
        raise SourceError(f"parquet source: {f} is not a Parquet file ({e})") from None
    schema = pf.schema_arrow
    if cfg.text_column not in schema.names:
        raise SourceError(f"parquet source: {f} has no column {cfg.text_column!r} (columns: {', '.join(schema.names)})")
    t = schema.field(cfg.text_column).type
    if not any(is_(t) for is_ in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)):
        raise SourceError(f"parquet source: {f} column {cfg.text_column!r} has type {t}, expected string")
    return pf


def read_parquet(cfg: ParquetSource, stats: dict | None = None) -> Iterator[RawDoc]:
    files = [(f, _parquet_check(cfg, f)) for f in _glob(cfg)]
    for f, pf in files:
        row = 0
        for batch in pf.iter_batches(batch_size=cfg.batch_size, columns=[cfg.text_column]):
            for value in batch.column(0).to_pylist():
                if value is None:
                    _bump(stats, "skipped_null")
                else:
                    yield RawDoc(cfg.name or cfg.kind, f"{f}:{row}", value)
                row += 1


def _str_or_bytes(text: str) -> str | bytes:
    """A clean str as is; one holding undecodable input bytes (surrogateescape) as the original bytes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # lone surrogates written as \udXXX escapes in the JSON itself
            return text.encode("utf-8", "surrogatepass")


def _jsonl_rows(cfg: JsonlSource, f: str, limit: int | None = None) -> Iterator[tuple[int, bytes | str | None]]:
    """(line number, text) per non-blank line; text None for a null value; bytes if not valid UTF-8."""
    key, seen = cfg.text_column, 0
    with open(f, "rb") as fh:
        for n, line in enumerate(fh, 1):
            if n == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8", "surrogateescape"))
            except json.JSONDecodeError as e:
                raise SourceError(f"jsonl source: {f} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise SourceError(f"jsonl source: {f} line {n}: expected a JSON object, got {type(obj).__name__}")
            if key not in obj:
                raise SourceError(f"jsonl source: {f} line {n}: no key {key!r}")
            text = obj[key]
            if text is not None and not isinstance(text, str):
                raise SourceError(f"jsonl source: {f} line {n}: {key!r} is {type(text).__name__}, expected string")
            yield n, (None if text is None else _str_or_bytes(text))
            seen += 1
            if limit is not None and seen >= limit:
                return


def read_jsonl(cfg: JsonlSource, stats: dict | None = None) -> Iterator[RawDoc]:
    for f in _glob(cfg):
        for n, text in _jsonl_rows(cfg, f):
            if text is None:
                _bump(stats, "skipped_null")
            else:
                yield RawDoc(cfg.name or cfg.kind, f"{f}:{n}", text)


# --- public entry points ----------------------------------------------------------------------------
_READERS = {
    "stdlib": read_stdlib, "pydoc": read_pydoc, "package_texts": read_package_texts,
    "reasoning_gym": read_reasoning_gym, "parquet": read_parquet, "jsonl": read_jsonl,
}


def validate(cfg: SourceConfig, full: bool = False) -> None:
    """Up-front checks (files, schemas, task names/args); raises SourceError.

    JSONL: only each file's first line unless `full` (every line; read_source does that)."""
    if cfg.kind == "stdlib" and not os.path.isdir(sysconfig.get_paths()["stdlib"]):
        raise SourceError("stdlib source: no stdlib directory found")
    elif cfg.kind == "pydoc" and importlib.util.find_spec("pydoc_data") is None:
        raise SourceError("pydoc source: pydoc_data is not available in this Python")
    elif cfg.kind == "package_texts":
        _package_files(cfg)
    elif cfg.kind == "reasoning_gym":
        _check_reasoning_gym(cfg)
    elif cfg.kind == "parquet":
        for f in _glob(cfg):
            _parquet_check(cfg, f)
    elif cfg.kind == "jsonl":
        for f in _glob(cfg):
            for _ in _jsonl_rows(cfg, f, limit=None if full else 1):
                pass


def read_source(cfg: SourceConfig, stats: dict | None = None) -> Iterator[RawDoc]:
    """Validate now (SourceError at call time; JSONL fully read once), then a deterministic stream."""
    validate(cfg, full=True)
    return _READERS[cfg.kind](cfg, stats)


def estimate_count(cfg: SourceConfig) -> int | None:
    """Number of docs for a progress bar (an upper bound for parquet); None where unknown cheaply."""
    if cfg.kind == "stdlib":
        return len(_stdlib_files(cfg))
    if cfg.kind == "pydoc":
        from pydoc_data.topics import topics

        return len(topics)
    if cfg.kind == "package_texts":
        return len(_package_files(cfg)) if cfg.chunk_chars is None else None
    if cfg.kind == "reasoning_gym":
        return cfg.size * len(cfg.tasks)
    if cfg.kind == "parquet":
        return sum(_parquet_check(cfg, f).metadata.num_rows for f in _glob(cfg))
    return None
