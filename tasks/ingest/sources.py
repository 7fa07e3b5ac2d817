"""Where the ingest stage's documents come from: one class per source kind, each with its settings,
its up-front check (`check`), its reader (`read`, yielding RawDoc(source, ref, data)) and a size
for the progress line (`estimate` in documents, or `total_bytes`: then the line shows MB/s and an
ETA by bytes). `SourceConfig`, the union of every `Source` subclass below, is the only registry:
adding a kind is one class (and its test).

Readers of files yield raw bytes (the caller decodes: utf-8, errors=replace). Bad input raises one
SourceError with a one-line message naming the file, row or setting; `read` runs the full `check`
first, so nothing is yielded from a bad file. Order is deterministic (sorted walks and globs).
JSONL and invalid UTF-8: each line is decoded with surrogateescape; a text value that then holds
undecodable bytes is yielded as *bytes* (original bytes kept), a clean one as str. JSONL files are
read twice (a full check, then the yield). Files are local paths or fsspec URLs (`s3://...`,
`memory://...`; `file://` reads as a local path), every reader streams (Parquet in batches of
`batch_size` rows, JSONL line by line). Optional `stats` dicts receive counters such as
dropped_too_large and dropped_null.
"""
from __future__ import annotations

import contextlib
import fnmatch
import glob
import importlib.util
import io
import json
import os
import posixpath
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from tasks.core import chat, gym
from tasks.core.base import StageError
from tasks.core.faults import on_file

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
    id: str | None = None  # the user's own id (a source's id_column); else ingest derives one from the ref
    nbytes: int = 0  # input bytes read for it since the previous document (its file's share, as stored)


def _bump(stats: dict | None, key: str) -> None:
    if stats is not None:
        stats[key] = stats.get(key, 0) + 1


class Source(BaseModel):
    """A source kind: its settings are the fields; `kind` tells them apart in a config."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str | None = None  # the documents' `source` column; defaults to kind

    @property
    def source(self) -> str:
        return self.name or self.kind  # type: ignore[attr-defined]

    def check(self, full: bool = False) -> None:
        """Up-front checks (files, schemas, names, settings); SourceError on bad input. `full`: as
        thorough as reading (JSONL: every line, not only the first)."""

    def documents(self, stats: dict | None = None) -> Iterator[RawDoc]:
        raise NotImplementedError

    def read(self, stats: dict | None = None) -> Iterator[RawDoc]:
        """Check fully now (SourceError at call time), then a deterministic stream of documents."""
        self.check(full=True)
        return self.documents(stats)

    def estimate(self) -> int | None:
        """Number of documents for a progress line (an upper bound where rows may be skipped); None if unknown."""
        return None

    def total_bytes(self) -> int | None:
        """Input bytes in all, for a progress line by bytes (its documents' `nbytes` add up to it); None:
        the line counts documents."""
        return None


class StdlibSource(Source):
    """The CPython standard library's .py files (on every machine, with real near-duplicates)."""

    kind: Literal["stdlib"] = "stdlib"
    max_bytes: int = Field(200_000, gt=0)
    max_files: int | None = Field(None, gt=0)
    include_tests: bool = False

    def files(self, stats: dict | None = None) -> list[tuple[str, str]]:
        root, out = sysconfig.get_paths()["stdlib"], []
        skip = {"site-packages", "dist-packages", "__pycache__"} | (set() if self.include_tests else {"test", "tests", "idle_test"})
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in skip)
            for path in (os.path.join(dirpath, fn) for fn in sorted(filenames) if fn.endswith(".py")):
                if os.path.getsize(path) > self.max_bytes:
                    _bump(stats, "dropped_too_large")
                else:
                    out.append((Path(os.path.relpath(path, root)).as_posix(), path))
                if self.max_files is not None and len(out) >= self.max_files:
                    return out
        return out

    def check(self, full: bool = False) -> None:
        if not os.path.isdir(sysconfig.get_paths()["stdlib"]):
            raise SourceError("stdlib source: no stdlib directory found")

    def documents(self, stats: dict | None = None) -> Iterator[RawDoc]:
        for rel, path in self.files(stats):
            yield RawDoc(self.source, rel, Path(path).read_bytes())

    def estimate(self) -> int | None:
        return len(self.files())


class PydocSource(Source):
    """The reference topics of the Python documentation (`pydoc_data.topics`)."""

    kind: Literal["pydoc"] = "pydoc"

    def check(self, full: bool = False) -> None:
        if importlib.util.find_spec("pydoc_data") is None:
            raise SourceError("pydoc source: pydoc_data is not available in this Python")

    def documents(self, stats: dict | None = None) -> Iterator[RawDoc]:
        from pydoc_data.topics import topics

        for name in sorted(topics):
            yield RawDoc(self.source, f"topic:{name}", topics[name])

    def estimate(self) -> int | None:
        from pydoc_data.topics import topics

        return len(topics)


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


class PackageTextsSource(Source):
    """Prose files shipped inside installed packages (e.g. the novel in reasoning-gym's data)."""

    kind: Literal["package_texts"] = "package_texts"
    packages: list[str] = Field(default_factory=lambda: ["reasoning_gym"], min_length=1)
    patterns: list[str] = Field(default_factory=lambda: ["*.txt", "*.md", "*.rst"], min_length=1)
    exclude: list[str] = Field(default_factory=list)  # matched against "<pkg>/<relpath>"
    max_bytes: int = Field(2_000_000, gt=0)
    chunk_chars: int | None = Field(20_000, gt=0)  # measured in bytes; paragraphs kept whole
    strip_gutenberg: bool = True  # keep only text between *** START OF / *** END OF

    def files(self, stats: dict | None = None) -> list[tuple[str, str]]:
        out = []
        for pkg in self.packages:
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
                        if not any(fnmatch.fnmatchcase(ref, "*/" + p) for p in self.patterns) or any(
                                fnmatch.fnmatchcase(ref, x) for x in self.exclude):
                            continue
                        found += 1
                        if os.path.getsize(path) > self.max_bytes:
                            _bump(stats, "dropped_too_large")
                        else:
                            out.append((ref, path))
            if not found:
                raise SourceError(f"package_texts source: no files matching {self.patterns} in package {pkg!r}")
        return out

    def check(self, full: bool = False) -> None:
        self.files()

    def documents(self, stats: dict | None = None) -> Iterator[RawDoc]:
        for ref, path in self.files(stats):
            data = Path(path).read_bytes()
            data = _strip_gutenberg(data) if self.strip_gutenberg else data
            if self.chunk_chars is None or len(data) <= self.chunk_chars:
                yield RawDoc(self.source, ref, data)
                continue
            for i, chunk in enumerate(_chunks(data, self.chunk_chars)):
                yield RawDoc(self.source, f"{ref}#{i}", chunk)

    def estimate(self) -> int | None:
        return len(self.files()) if self.chunk_chars is None else None


class ReasoningGymSource(Source):
    """Worked problems from reasoning-gym's generators, rendered as text."""

    kind: Literal["reasoning_gym"] = "reasoning_gym"
    tasks: list[str] = Field(default_factory=lambda: list(DEFAULT_RG_TASKS), min_length=1)
    size: int = Field(200, gt=0)
    seed: int = 1234
    task_args: dict[str, dict[str, Any]] = Field(default_factory=dict)

    def check(self, full: bool = False) -> None:
        for task in self.task_args:
            if task not in self.tasks:
                raise SourceError(f"reasoning_gym source: task_args names {task!r}, which is not in tasks")
        for task in self.tasks:
            try:
                gym.check_task(task, self.task_args.get(task, {}), "reasoning_gym source: task_args")
            except StageError as e:
                raise SourceError(str(e)) from None

    def documents(self, stats: dict | None = None) -> Iterator[RawDoc]:
        for task in self.tasks:
            generated = gym.items(task, self.task_args.get(task, {}), self.size, self.seed, "reasoning_gym source")
            for i, item in enumerate(generated):
                text = chat.document_text(item["question"], item.get("answer"), gym.solution_of(item.get("metadata")))
                yield RawDoc(self.source, f"{task}:{self.seed}:{i}", text)

    def estimate(self) -> int | None:
        return self.size * len(self.tasks)


# What pyarrow's input_stream(compression="detect") decompresses, by file name ending.
COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".lz4": "lz4", ".zst": "zstd"}


def _remote(path: str):
    """(fsspec filesystem, path on it) for a URL of a non-local filesystem; (None, local path) for a
    plain path or a file:// URL, so that a file:// spelling reads, and names files, as the plain one."""
    if "://" not in path:
        return None, os.path.expanduser(path)
    import fsspec

    fs, on_fs = fsspec.core.url_to_fs(path)
    if "file" in fs.protocol or "local" in fs.protocol:
        return None, on_fs
    return fs, posixpath.normpath(on_fs)  # `//`, `./`, `..`: fsspec's glob would match nothing


def _fixed(parts: tuple[str, ...]) -> int:
    """How many leading parts of a glob are plain directories (the last part counts as a file)."""
    return next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts) - 1)


class _Files(Source):
    """A user's own files, matched by a glob: a local path, or an fsspec URL (s3://bucket/x/*.parquet)."""

    path: str
    text_column: str = "text"
    id_column: str | None = Field(None, description="a column of the user's own document ids, kept as the "
                                  "documents' ids (they must be unique)")

    def listing(self) -> dict[str, int]:
        """Every matching file, sorted, with its size in bytes: local paths, or URLs on another filesystem."""
        fs, pattern = _remote(self.path)
        if fs is None:
            found = {f: os.path.getsize(f) for f in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(f)}
        else:  # one listing with sizes, not a request per file
            found = {fs.unstrip_protocol(f): int(info.get("size") or 0)
                     for f, info in sorted(fs.glob(pattern, detail=True).items()) if info.get("type") == "file"}
        if not found:
            raise SourceError(f"{self.kind} source: no files match {self.path!r}")  # type: ignore[attr-defined]
        return found

    def files(self) -> list[str]:
        return list(self.listing())

    def total_bytes(self) -> int | None:
        return sum(self.listing().values())

    def relpath(self, f: str) -> str:
        """A matched file relative to the glob's fixed directory, its documents' refs being `<relpath>:<row>`:
        the same whichever way the path is spelled (relative, absolute, ~, ./, a symlinked directory,
        file://, a URL with `//` or `..`), so ids and keys do not change with it, and still naming the
        file and row a document came from."""
        fs, pattern = _remote(self.path)
        if fs is None:
            parts = Path(pattern).parts
            base = os.path.realpath(Path(*parts[:_fixed(parts)]) if _fixed(parts) else ".")
            return Path(os.path.relpath(os.path.realpath(f), base)).as_posix()
        parts = tuple(pattern.split("/"))
        return posixpath.relpath(_remote(f)[1], "/".join(parts[:_fixed(parts)]) or "/")


class ParquetSource(_Files):
    """Your own Parquet files by glob (e.g. web-crawl shards, a Hugging Face dataset directory's
    `**/*.parquet`), read in batches of `batch_size` rows."""

    kind: Literal["parquet"] = "parquet"
    batch_size: int = Field(1024, gt=0)

    def open(self, f: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        fs, on_fs = _remote(f)
        try:
            pf = pq.ParquetFile(on_fs, filesystem=fs)
        except Exception as e:
            raise SourceError(f"parquet source: {f} is not a Parquet file ({e})") from None
        schema = pf.schema_arrow
        if self.text_column not in schema.names:
            raise SourceError(f"parquet source: {f} has no column {self.text_column!r} (columns: {', '.join(schema.names)})")
        if self.id_column and self.id_column not in schema.names:
            raise SourceError(f"parquet source: {f} has no id column {self.id_column!r} (columns: {', '.join(schema.names)})")
        t = schema.field(self.text_column).type
        if not any(is_(t) for is_ in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                                      pa.types.is_large_binary)):
            raise SourceError(f"parquet source: {f} column {self.text_column!r} has type {t}, expected string")
        return pf

    def check(self, full: bool = False) -> None:
        for f in self.files():
            self.open(f)

    def documents(self, stats: dict | None = None) -> Iterator[RawDoc]:
        columns = [self.text_column, *([self.id_column] if self.id_column else [])]
        for f, size in self.listing().items():
            pf, rel = self.open(f), self.relpath(f)  # one file open at a time, one batch in memory
            rows, row, done = max(1, pf.metadata.num_rows), 0, 0
            for batch in _named(f, pf.iter_batches(batch_size=self.batch_size, columns=columns)):
                ids = batch.column(1).to_pylist() if self.id_column else [None] * batch.num_rows
                for value, user_id in zip(batch.column(0).to_pylist(), ids):
                    if value is None:
                        _bump(stats, "dropped_null")
                    else:
                        read = size * (row + 1) // rows  # the file's bytes, shared evenly by its rows
                        yield RawDoc(self.source, f"{rel}:{row}", value, _user_id(user_id, self, f, row), read - done)
                        done = read
                    row += 1

    def estimate(self) -> int | None:
        return sum(self.open(f).metadata.num_rows for f in self.files())


def _named(f: str, batches: Iterator) -> Iterator:
    """The batches of `f`; a corrupt page raises naming the file (the consumer's own errors are not the file's)."""
    while True:
        with on_file(f):
            batch = next(batches, None)
        if batch is None:
            return
        yield batch


def _user_id(value, source: _Files, f: str, row: int) -> str | None:
    if not source.id_column:
        return None
    if value is None or isinstance(value, (dict, list, float)) or str(value) == "":
        raise SourceError(f"{source.kind} source: {f} row {row}: id column {source.id_column!r} is {value!r}: "  # type: ignore[attr-defined]
                          f"ids must be non-empty strings or integers")
    return str(value)


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


class JsonlSource(_Files):
    """Your own JSON-lines files by glob: one object per line with a text field; `.gz`, `.zst`, `.bz2`
    and `.lz4` files are decompressed as they are read (pyarrow's streams, by extension)."""

    kind: Literal["jsonl"] = "jsonl"

    @staticmethod
    @contextlib.contextmanager
    def stream(f: str) -> Iterator[tuple[Any, io.BufferedReader]]:
        """(the file as stored, its lines' binary stream, decompressed by name): the stored file's
        position is how far a reader has got, in the bytes a progress line counts."""
        import pyarrow as pa

        fs, on_fs = _remote(f)
        with contextlib.ExitStack() as stack:
            if fs is None:
                raw = stack.enter_context(pa.OSFile(on_fs))
            else:  # an fsspec file, wrapped as a pyarrow one for the decompressing stream
                raw = stack.enter_context(pa.PythonFile(stack.enter_context(fs.open(on_fs, "rb")), mode="r"))
            codec = COMPRESSION.get(os.path.splitext(on_fs)[1])
            data = stack.enter_context(pa.CompressedInputStream(raw, codec)) if codec else raw
            yield raw, stack.enter_context(io.BufferedReader(data))

    def lines(self, f: str, limit: int | None = None) -> Iterator[tuple[int, bytes | str | None, str | None, int]]:
        """(line number, text, user id, bytes of the file read so far) per non-blank line; text None for a
        null value; bytes if not valid UTF-8."""
        key, seen = self.text_column, 0
        with on_file(f), self.stream(f) as (raw, fh):
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
                if self.id_column and self.id_column not in obj:
                    raise SourceError(f"jsonl source: {f} line {n}: no id key {self.id_column!r}")
                user_id = _user_id(obj.get(self.id_column), self, f, n) if self.id_column else None
                yield n, (None if text is None else _str_or_bytes(text)), user_id, raw.tell()
                seen += 1
                if limit is not None and seen >= limit:
                    return

    def check(self, full: bool = False) -> None:
        for f in self.files():
            for _ in self.lines(f, limit=None if full else 1):
                pass

    def documents(self, stats: dict | None = None) -> Iterator[RawDoc]:
        for f in self.files():
            rel, done = self.relpath(f), 0
            for n, text, user_id, read in self.lines(f):
                if text is None:
                    _bump(stats, "dropped_null")
                else:
                    yield RawDoc(self.source, f"{rel}:{n}", text, user_id, read - done)
                    done = read


def _kinds(base: type[Source] = Source) -> list[type[Source]]:
    """Every concrete source class (one with a `kind`) below `base`, in definition order."""
    return [k for c in base.__subclasses__() for k in ([c] if "kind" in c.model_fields else []) + _kinds(c)]


# The registry: the union of every source kind defined above (a config's `kind` picks one). A new
# kind is a new Source subclass with its own `kind` literal; nothing else names it.
SourceConfig = Annotated[Union[tuple(_kinds())], Field(discriminator="kind")]
