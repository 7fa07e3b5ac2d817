"""Scratch files a map step shares with the flow, through the object store when its workers share no disk.

A map step (dedup's `group_partition`, a filter's `decide_shard`) is a plain function of paths: it reads
and writes scratch files under the stage's work dir (`ctx.work`) or output dir (`ctx.out`), local to the
machine that runs the flow (the driver), which Dask workers on other machines do not see. So with a remote
store root (s3://...) and a map on Dask, `share_scratch` puts a `SharedScratchMap` in front of the map, and
the files go through a hidden prefix of the store, `<root>/<stage>/.scratch-<key>/` (`Store.shared_dir`):

- before a map, the driver uploads the files the step reads that it wrote itself since the last map;
- on a worker, a call downloads the files its item reads into a cache under the worker's own temp dir
  (once per file and worker), links them into a fresh directory for the call, runs the step with its
  paths moved there, and uploads what the step wrote;
- after the map, the driver downloads what the workers wrote that it reads next, and makes the
  directories of the rest (a listing of dedup's `bands/*` still finds every partition).

Scratch files are write-once (a step writes new names, never rewrites one: checked), so a name and a size
say whether a copy is current. The driver keeps the inventory of the prefix (what it uploaded, what each
call reports it wrote), so no call lists the store: each item goes out with the names and sizes it reads.
A step reads by default whatever its path arguments name (a file, or every file under a directory);
`scratch_files(reads=...)` declares less where that matters for scale (a key partition reads its own
partition, not all of them), `driver_reads=` which of its files the driver reads after the map (default:
all). The prefix goes when the stage commits or fails, and the workers' caches with it. A local store, or
the default thread runner, never gets here: no extra I/O.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import shutil
import tempfile
import uuid
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import fsspec

from tasks.core.base import log

if TYPE_CHECKING:
    from tasks.core.store import Store

Globs = Callable[..., Iterable[str]]  # a step's arguments, by name -> glob patterns of the driver's paths
CACHE = "slmflow-scratch"  # in each worker's temp dir: a folder per stage computation
GLOB_TOKEN = {"**": ".*", "*": "[^/]*", "?": "[^/]"}
MB = 1e6


def scratch_files(reads: Globs | None = None, driver_reads: Globs | None = None):
    """Declare what a map step shares: `reads(**arguments)`, the glob patterns (`*` and `?` within a name,
    `**` across directories) of the scratch files one call reads; `driver_reads(**arguments)`, those of the
    files it writes that the driver reads after the map. Unset: what its path arguments name; all it wrote."""
    def declare(fn):
        fn.scratch_reads, fn.scratch_driver_reads = reads, driver_reads
        return fn
    return declare


def step_reads(fn: Callable, arguments: dict[str, Any]) -> list[str]:
    """Glob patterns of the scratch files a call of `fn` with `arguments` reads (module docstring)."""
    declared = getattr(fn, "scratch_reads", None)
    if declared is not None:
        return [str(g) for g in declared(**arguments)]
    return [g for p in path_arguments(arguments) for g in (p, f"{p}/**")]


def path_arguments(value: Any) -> Iterator[str]:
    """Every absolute path in a step's arguments (inside tuples, lists and dicts too)."""
    if isinstance(value, (str, os.PathLike)) and os.path.isabs(path := os.fspath(value)):
        yield path
    elif type(value) in (tuple, list):
        for v in value:
            yield from path_arguments(v)
    elif type(value) is dict:
        for v in value.values():
            yield from path_arguments(v)


def matching(names: list[str], patterns: Iterable[str]) -> set[str]:
    """The names (sorted) that a pattern matches: only the run sharing its literal prefix is tried."""
    found = set()
    for pattern in set(patterns):
        prefix = re.split(r"[*?]", pattern, maxsplit=1)[0]
        regex = re.compile("".join(GLOB_TOKEN.get(t, re.escape(t)) for t in re.split(r"(\*\*|\*|\?)", pattern)))
        i = bisect_left(names, prefix)
        while i < len(names) and names[i].startswith(prefix):
            if regex.fullmatch(names[i]):
                found.add(names[i])
            i += 1
    return found


def moved(value: Any, dirs: list[tuple[str, str]]) -> Any:
    """`value` with each path under an `old` directory moved under its `new` one ((old, new) pairs)."""
    if isinstance(value, (str, Path)):
        path = os.fspath(value)
        for old, new in dirs:
            if path == old or path.startswith(old + "/"):
                return type(value)(new + path[len(old):])
        return value
    if type(value) in (tuple, list):
        return type(value)(moved(v, dirs) for v in value)
    if type(value) is dict:
        return {k: moved(v, dirs) for k, v in value.items()}
    return value


def download(fs, remote: list[str], local: list[str]) -> None:
    """fs.get of files written since this process may have listed their directories (s3fs answers a file
    missing from a cached listing with FileNotFoundError)."""
    for path in remote:
        fs.invalidate_cache(path)
    fs.get(remote, local)


def write_once(path: str, shared: int, now: int) -> None:
    if shared != now:
        raise RuntimeError(f"{path} changed after it was shared ({shared} -> {now} bytes): scratch files are "
                           "write-once")


@dataclass(frozen=True)
class SharedScratch:
    """Where a stage computation shares its scratch (small: it goes with every call)."""

    url: str  # the store's hidden prefix for the stage key
    root: str  # the same, as its filesystem's path
    dirs: tuple[tuple[str, str], ...]  # (a local directory of the driver, its name under `url`), longest first
    attempt: str  # names this computation's cache folder on the workers

    def remote(self, path: str) -> str:
        """The store's path (fsspec, no protocol) of a driver path under one of `dirs`."""
        for local, name in self.dirs:
            if path.startswith(local + "/"):
                return f"{self.root}/{name}/{path[len(local) + 1:]}"
        raise ValueError(f"{path} is in no shared scratch directory")

    def under(self, path: str) -> bool:
        return any(path == local or path.startswith(local + "/") for local, _ in self.dirs)


class Shipped:
    """A mapped item as it goes to a worker, with the files it reads (driver path, size) and the directories its
    path arguments name (a step may write into them without making them). Not a dataclass: Prefect leaves it be."""

    def __init__(self, item: Any, reads: tuple[tuple[str, int], ...], dirs: tuple[str, ...]):
        self.item, self.reads, self.dirs = item, reads, dirs


@dataclass
class ShardResult:
    """What a call on a worker returns: the step's value, the files it wrote (driver path, size), its downloads."""

    value: Any
    written: list[tuple[str, int]]
    downloaded: int


def on_worker(step: Callable, shared: SharedScratch) -> Callable:
    """`step`, for a map of `Shipped` items: it runs in a fresh local directory (`run_shipped`). Same name and
    signature (the map names its tasks and finds the mapped argument by them)."""
    @functools.wraps(step)
    def call(*args, **kwargs) -> ShardResult:
        bound = inspect.signature(step).bind(*args, **kwargs)
        first = next(iter(bound.signature.parameters))
        shipped, bound.arguments[first] = bound.arguments[first], bound.arguments[first].item
        return run_shipped(step, shared, shipped, bound)
    return call


def run_shipped(step: Callable, shared: SharedScratch, shipped: Shipped, bound: inspect.BoundArguments) -> ShardResult:
    """One call on a worker, in a fresh directory of its temp dir: its reads linked in from the cache, its path
    arguments moved there, what it wrote uploaded (and named in driver paths), the directory removed."""
    if not any(shared.under(p) for p in path_arguments(bound.arguments)):  # it shares nothing: no disk
        return ShardResult(step(*bound.args, **bound.kwargs), [], 0)
    cache = Path(tempfile.gettempdir()) / CACHE / shared.attempt
    cache.mkdir(parents=True, exist_ok=True)
    call = Path(tempfile.mkdtemp(prefix="call-", dir=cache))
    here = [(local, str(call / name)) for local, name in shared.dirs]
    try:
        downloaded = link_reads(shared, shipped.reads, cache / "files", here)
        for d in shipped.dirs:
            Path(moved(d, here)).mkdir(parents=True, exist_ok=True)
        bound.arguments.update(moved(dict(bound.arguments), here))
        value = step(*bound.args, **bound.kwargs)
        written = upload_written(shared, dict(shipped.reads), here)
        return ShardResult(moved(value, [(new, old) for old, new in here]), written, downloaded)
    finally:
        shutil.rmtree(call, ignore_errors=True)


def link_reads(shared: SharedScratch, reads: Iterable[tuple[str, int]], files: Path,
               here: list[tuple[str, str]]) -> int:
    """Link each file a call reads into its directory, downloading those the worker's cache (`files`) lacks
    first, to a temporary name (calls beside it may want the same file). Returns the downloads."""
    in_cache = [(local, str(files / name)) for local, name in shared.dirs]
    wanted = [(path, Path(moved(path, in_cache)), size) for path, size in reads]
    missing = [(path, cached) for path, cached, size in wanted
               if not (cached.exists() and cached.stat().st_size == size)]
    if missing:
        fs, _ = fsspec.core.url_to_fs(shared.url)
        temps = [cached.with_name(f".{cached.name}-{uuid.uuid4().hex[:8]}") for _, cached in missing]
        for t in temps:
            t.parent.mkdir(parents=True, exist_ok=True)
        download(fs, [shared.remote(path) for path, _ in missing], [str(t) for t in temps])
        for t, (_, cached) in zip(temps, missing):
            os.replace(t, cached)
    for path, cached, _ in wanted:
        target = Path(moved(path, here))
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(cached, target)
        except OSError:  # a cache on another filesystem
            shutil.copyfile(cached, target)
    return len(missing)


def upload_written(shared: SharedScratch, reads: dict[str, int], here: list[tuple[str, str]]) -> list[tuple[str, int]]:
    """Upload what a call wrote into its directory; (driver path, size) of each."""
    back = [(new, old) for old, new in here]
    written = []
    for _, top in here:
        for dirpath, _, names in os.walk(top):
            for name in names:
                local = os.path.join(dirpath, name)
                path, size = moved(local, back), os.path.getsize(local)
                if path in reads:
                    write_once(path, reads[path], size)
                else:
                    written.append((local, path, size))
    if written:
        fs, _ = fsspec.core.url_to_fs(shared.url)
        fs.put([local for local, _, _ in written], [shared.remote(path) for _, path, _ in written])
    return [(path, size) for _, path, size in written]


def drop_worker_cache(attempt: str) -> None:
    """On a worker: its cache of a finished stage computation."""
    shutil.rmtree(Path(tempfile.gettempdir()) / CACHE / attempt, ignore_errors=True)


class SharedScratchMap:
    """A map whose workers share no disk with this machine: the scratch its steps share goes through the
    store (module docstring). `width` is the map's."""

    def __init__(self, map_fn: Callable[..., list], shared: SharedScratch, stage: str):
        self.map_fn, self.shared, self.stage = map_fn, shared, stage
        self.fs = fsspec.core.url_to_fs(shared.url)[0]
        self.inventory: dict[str, int] = {}  # driver path -> size of every file under the prefix
        self.counts: Counter = Counter()
        self.used = False  # no map yet: nothing in the store to remove

    @property
    def width(self) -> int | None:
        return getattr(self.map_fn, "width", None)

    def __call__(self, fn: Callable, items: list, **common: Any) -> list:
        if not self.used:  # what a killed computation of the key left (we hold its lock)
            remove_prefix(self.shared.url)
            self.used = True
        arguments = [self.arguments(fn, item, common) for item in items]
        reads = [step_reads(fn, a) for a in arguments]
        self.upload({g for r in reads for g in r})
        names = sorted(self.inventory)
        shipped = [Shipped(item, tuple((p, self.inventory[p]) for p in sorted(matching(names, r))),
                           tuple(p for p in path_arguments(a) if self.shared.under(p) and os.path.isdir(p)))
                   for item, r, a in zip(items, reads, arguments)]
        results = self.map_fn(on_worker(fn, self.shared), shipped, **common)
        self.fetch(fn, arguments, results)
        return [r.value for r in results]

    @staticmethod
    def arguments(fn: Callable, item: Any, common: dict) -> dict[str, Any]:
        """A call's arguments by name (what `scratch_files` declarations get), defaults included."""
        bound = inspect.signature(fn).bind(item, **common)
        bound.apply_defaults()
        return {**bound.kwargs, **dict(zip(bound.signature.parameters, bound.args))}

    def upload(self, patterns: set[str]) -> None:
        """Upload the files under the shared directories that `patterns` match and the store lacks."""
        if not patterns:
            return
        local = sorted(os.path.join(d, n) for top, _ in self.shared.dirs for d, _, names in os.walk(top) for n in names)
        up = []
        for path in sorted(matching(local, patterns)):
            size = os.path.getsize(path)
            if path in self.inventory:
                write_once(path, self.inventory[path], size)
            else:
                up.append((path, size))
        if up:
            self.fs.put([p for p, _ in up], [self.shared.remote(p) for p, _ in up])
            self.inventory.update(up)
            self.counts.update(up=len(up), up_bytes=sum(s for _, s in up))

    def fetch(self, fn: Callable, arguments: list[dict], results: list[ShardResult]) -> None:
        """Record what the workers wrote, make its directories here, and download what the driver reads."""
        declared = getattr(fn, "scratch_driver_reads", None)
        down = []
        for args, result in zip(arguments, results):
            self.inventory.update(result.written)
            wanted = matching(sorted(p for p, _ in result.written), declared(**args)) if declared else None
            for path, size in result.written:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                if wanted is None or path in wanted:
                    down.append((path, size))
            self.counts.update(written=len(result.written), worker_downloads=result.downloaded)
        if down:
            download(self.fs, [self.shared.remote(p) for p, _ in down], [p for p, _ in down])
            self.counts.update(down=len(down), down_bytes=sum(s for _, s in down))

    def close(self) -> None:
        """Remove the prefix and the workers' caches (best effort: a failure here is not the stage's)."""
        c = self.counts
        if not (c["up"] or c["written"]):  # nothing went through the store: no prefix, no worker cache
            return
        log.info("%s: scratch shared through %s: %d files (%.1f MB) up from here, %d written by workers, "
                 "%d downloaded by workers, %d files (%.1f MB) down here", self.stage, self.shared.url, c["up"],
                 c["up_bytes"] / MB, c["written"], c["worker_downloads"], c["down"], c["down_bytes"] / MB)
        try:
            remove_prefix(self.shared.url)
            if run_on_workers := getattr(self.map_fn, "run_on_workers", None):
                run_on_workers(drop_worker_cache, self.shared.attempt)
        except Exception as e:  # noqa: BLE001 - scratch: the next computation of the key removes it
            log.warning("%s: could not remove the shared scratch %s: %s", self.stage, self.shared.url, e)


def remove_prefix(url: str) -> None:
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache(root)  # a listing cached in this process may predate the workers' uploads
    if fs.exists(root):
        fs.rm(root, recursive=True)


def share_scratch(map_fn: Callable[..., list], store: Store, stage: str, key: str,
                   dirs: list[Path]) -> Callable[..., list]:
    """`map_fn` itself, unless its workers share no disk with this machine (a remote store root and a map on
    Dask): then a SharedScratchMap sharing `dirs` (local directories) through the store (no I/O until a map)."""
    if store.local or not getattr(map_fn, "on_dask", False):
        return map_fn
    url = store.shared_dir(stage, key)
    named = sorted(((str(d), f"d{i}") for i, d in enumerate(dirs)), key=lambda d: -len(d[0]))  # nested: the inner first
    root = fsspec.core.url_to_fs(url)[1]
    return SharedScratchMap(map_fn, SharedScratch(url, root, tuple(named), uuid.uuid4().hex[:12]), stage)


def close_shared_scratch(map_fn: Callable[..., list]) -> None:
    if isinstance(map_fn, SharedScratchMap):
        map_fn.close()
