"""Ordinary faults in one line: what went wrong, with which file, and what to do.

Disk full, a permission or a read-only mount, a truncated compressed stream, Parquet, safetensors or
JSON that does not parse, an MLflow database that is not one: none of these is a bug, and each gets
one line from `explain` (the stage task turns it into a Failed state with that line; the command
prints it and exits 1), with the traceback kept for `--debug`. Readers and writers name their file
with `on_file(path)`, since a decoder's or a Rust library's own error rarely does.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from typing import Iterator

DEBUG_ENV = "SLMFLOW_DEBUG"  # set by `slmflow --debug` (workers inherit it): every fault keeps its traceback

_DISK_FULL = "free space (`slmflow gc` lists what the store no longer needs) and rerun: finished stages are kept"
_NO_WRITE = "fix its permissions, or point run.data_root / run.models_root at a directory you can write, and rerun"
ACTIONS = {
    errno.ENOSPC: _DISK_FULL,
    errno.EDQUOT: _DISK_FULL,
    errno.EACCES: _NO_WRITE,
    errno.EPERM: _NO_WRITE,
    errno.EROFS: "the file system is read-only: point run.data_root / run.models_root at a writable directory",
    errno.ENOENT: "it was removed or never made: rerun (the run recomputes what is missing; `slmflow verify` "
                  "checks the store)",
    errno.EIO: "the disk reported an I/O error: check the device, then `slmflow verify`",
}
_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_COMPRESSED = re.compile(r"(?i)compress|gzip|zstd|lz4|bz2|zlib|end-of-stream")
_CORRUPT = ("if it is in the store, `slmflow verify` sets its output aside and the next run recomputes it; "
            "else replace it")


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


@contextlib.contextmanager
def on_file(path) -> Iterator[None]:
    """Name `path` on any exception raised inside (reading or writing it): `explain` reports it (the
    innermost name wins)."""
    try:
        yield
    except Exception as e:
        if getattr(e, "fault_path", None) is None:
            e.fault_path = str(path)
        raise


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def file_of(exc: BaseException) -> str | None:
    """The file an exception (or one it was raised from) was reading or writing, if any names one."""
    return next((f for e in _chain(exc) if (f := getattr(e, "fault_path", None) or getattr(e, "filename", None))),
                None)


def first_line(exc: BaseException) -> str:
    """An exception's message as one short line: its first sentence (some messages span many lines)."""
    text = str(exc).strip().splitlines()
    return text[0].split(". ")[0][:200] if text else type(exc).__name__


def explain(exc: BaseException) -> str | None:
    """The one line for an ordinary fault, or None for anything else (a bug keeps its traceback)."""
    path = file_of(exc)
    where = f"{path}: " if path else ""
    for e in _chain(exc):
        name = type(e).__name__
        if isinstance(e, OSError) and e.errno in ACTIONS:
            return f"{e.filename or path or 'a file'}: {e.strerror or first_line(e)}: {ACTIONS[e.errno]}"
        if (code := _OS_ERROR.search(str(e))) and int(code[1]) in ACTIONS:  # Rust libraries (safetensors, polars)
            return f"{path or 'a file'}: {os.strerror(int(code[1]))}: {ACTIONS[int(code[1])]}"
        if isinstance(e, EOFError) or name in ("BadGzipFile", "ZstdError", "LZ4FrameError") or (
                name == "error" and type(e).__module__ == "zlib") or (
                isinstance(e, OSError) and e.errno is None and _COMPRESSED.search(str(e))):  # pyarrow's streams
            return f"{where}corrupt or truncated compressed data ({first_line(e)}): {_CORRUPT}"
        if (name in ("ArrowInvalid", "ArrowIOError") and ("arquet" in str(e) or "thrift" in str(e))) or (
                str(path).endswith(".parquet") and (name.startswith("Arrow") or isinstance(e, OSError))) or (
                type(e).__module__.startswith("duckdb") and "arquet" in str(e)):
            return f"{where}not readable as Parquet ({first_line(e)}): {_CORRUPT}"
        if name == "SafetensorError":
            return f"{where}weights that do not load ({first_line(e)}): {_CORRUPT}"
        if isinstance(e, json.JSONDecodeError) or (name == "ValidationError" and "Invalid JSON" in str(e)):
            return f"{where}not valid JSON ({first_line(e)}): {_CORRUPT}"
        if name == "DatabaseError" and "not a database" in str(e):
            return (f"{where}the MLflow store is not an SQLite database ({first_line(e)}): move it aside or set "
                    f"run.mlflow_uri to another one (e.g. sqlite:///mlflow-new.db)")
    return None
