"""The content-addressed stage store: keys, atomic commit, manifest last, damage caught on read.

Output of stage S with key K lives at `<root>/<S>/<K>/`: data files plus `manifest.json`, which
records each file's sha256 and size. A directory without a manifest never counts as done, and
neither does one whose files no longer match it: `get` checks every file's size on each read (a
truncated, missing or grown file is reported in one line and the output is recomputed), and
`verify` checks the digests. Local roots get an atomic rename of a fully written sibling directory,
fsynced file by file before the manifest is written and the directory renamed, so a power cut cannot
leave a manifest that points at unwritten data; other fsspec filesystems (object stores, which have
no rename) get the data files first and the manifest last, so the manifest is the commit.

A manifest that does not parse, lacks what `commit` writes (stage, key, files, sizes) or names another
output vouches for nothing: `manifest_or_damage` says why (`DamagedManifest`), `read_manifest` treats it as
not committed, and `get` sets the output aside and reports it in one line, so the run recomputes it.

Hidden names in a stage directory (leading dot) are never outputs: `.tmp-<key>-*` (an output being
written), `.old-<key>-*` (one being replaced), `.damaged-<key>-*` (set aside by `verify`, or by `get`
for a bad manifest), `.work-<key>` (checkpoints that survive a crash: on a remote root the store's copy
of a local working copy, `tasks.core.checkpoint_mirror`), `.lock-<key>` (whoever
computes the key, on a local root), `.lease-<key>` (the same on an `s3://` root: `tasks.core.lease`,
so runs on any machine compute a key once) and `.scratch-<key>` (on a remote root, the scratch files map
steps on Dask workers share while the key is computed: `tasks.core.shared_scratch`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from tasks.core.base import log
from tasks.core.faults import first_line, on_file
from tasks.core.locks import FileLock
from tasks.core.settings import identity

if TYPE_CHECKING:  # boto3 is imported by s3:// stores only (the s3 extra)
    from tasks.core.lease import ObjectLease

MANIFEST = "manifest.json"
KEY_CHARS = 16  # 64 bits of sha256: short enough for paths, far from collisions at our scale
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def canonical_json(value: Any) -> str:
    """The one JSON spelling of a value: sorted keys, no whitespace, UTF-8 kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def stage_key(name: str, version: int, config: BaseModel | dict, input_keys: dict[str, str]) -> str:
    """Hash of the stage name, its VERSION, the identity of its config and its inputs' keys: nothing else."""
    cfg = identity(config) if isinstance(config, BaseModel) else config
    payload = canonical_json({"stage": name, "version": version, "config": cfg, "inputs": input_keys})
    return hashlib.sha256(payload.encode()).hexdigest()[:KEY_CHARS]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_parquet(table: pa.Table, path: Path) -> None:
    """The one way stages write a Parquet shard: zstd, and the same bytes for the same rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd")


def _is_local(fs) -> bool:
    return fs.protocol in ("file", "local") or "file" in fs.protocol


def read_table(path: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file of a store, by local path or fsspec URI (what every stage reads its inputs with)."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    with on_file(path):
        return pq.read_table(fs_path if _is_local(fs) else path, columns=columns,
                             filesystem=None if _is_local(fs) else fs)


def read_schema(path: str) -> pa.Schema:
    fs, fs_path = fsspec.core.url_to_fs(path)
    with on_file(path), fs.open(fs_path, "rb") as f:
        return pq.read_schema(f)


def parquet_rows(path: str) -> int:
    """Rows of a Parquet file, from its footer (nothing else is read)."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    with on_file(path), fs.open(fs_path, "rb") as f:
        return pq.read_metadata(f).num_rows


def read_text(path: str) -> str:
    with on_file(path), fsspec.open(path, "r", encoding="utf-8") as f:
        return f.read()


def copy_file(path: str, local: Path) -> None:
    """Copy one file of a store (local path or URI) to a local path."""
    with fsspec.open(path, "rb") as src:
        local.write_bytes(src.read())


def local_dir(path: str) -> Path:
    """A directory of a store as a local directory: itself for a local store, else a copy downloaded once
    per process into the temp dir (stage outputs never change under their key, so the copy stays valid)."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    if _is_local(fs):
        return Path(fs_path)
    local = Path(tempfile.gettempdir()) / "slmflow-cache" / hashlib.sha256(path.encode()).hexdigest()[:16]
    if not local.exists():
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=local.parent))
        fs.get(fs_path.rstrip("/") + "/", str(tmp), recursive=True)
        try:
            os.replace(tmp, local)
        except OSError:  # another process got there first: theirs is the same bytes
            shutil.rmtree(tmp, ignore_errors=True)
    return local


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root` (and `root` itself) to disk."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_file(Path(dirpath, name))
        fsync_file(Path(dirpath))


def fsync_file(path: Path) -> None:
    """fsync a file or a directory (a directory's entries: what a rename into it changed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(root: Path) -> None:
    """Files 0644 and directories 0755 (less the umask): temp dirs are created 0700 and safetensors
    writes 0600, but a store is shared (a group's runs, a worker reading what another wrote)."""
    mask = current_umask()
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, (0o755 if p.is_dir() else 0o644) & ~mask)


def check_name(value: str, what: str) -> str:
    """A stage or key as a path component: no separators, no leading dot (`../../etc` is refused)."""
    if not _NAME.fullmatch(value or ""):
        raise ValueError(f"{what} {value!r} is not a valid name (letters, digits, '_', '-', '.'; no '/' or leading '.')")
    return value


@dataclass(frozen=True)
class DamagedManifest:
    """A manifest that vouches for nothing (`why`): its output counts as damaged, never as done."""

    path: str
    why: str

    def __str__(self) -> str:
        return f"{self.path}: {self.why}"


def _inside(name: object) -> bool:
    """A file name of a manifest stays inside its output directory (no `..`, no absolute path)."""
    return isinstance(name, str) and not name.startswith("/") and all(p not in ("", ".", "..") for p in name.split("/"))


def manifest_problem(manifest: object, stage: str, key: str) -> str | None:
    """Why a parsed manifest cannot vouch for output <stage>/<key> (None: it can). Required is what
    `commit` writes: its own stage and key, `files` (name -> sha256) and `sizes` (name -> bytes)."""
    if not isinstance(manifest, dict):
        return "not a JSON object"
    missing = [f for f in ("stage", "key", "files", "sizes") if f not in manifest]
    if missing:
        return f"lacks {', '.join(missing)}"
    if (manifest["stage"], manifest["key"]) != (stage, key):
        return f"names {manifest['stage']} {manifest['key']}, not the output it is in ({stage} {key})"
    files, sizes = manifest["files"], manifest["sizes"]
    if not isinstance(files, dict) or not all(isinstance(d, str) and _SHA256.fullmatch(d) for d in files.values()):
        return "files is not a map of file name to sha256"
    if not isinstance(sizes, dict) or not all(type(n) is int and n >= 0 for n in sizes.values()):
        return "sizes is not a map of file name to byte count"
    if set(files) != set(sizes):
        return "files and sizes name different files"
    if not all(_inside(name) for name in files):
        return "names a file outside its output directory"
    return None


class Artifact(BaseModel):
    """A finished stage output: what tasks pass to each other (small and JSON-able)."""

    model_config = ConfigDict(frozen=True)

    stage: str
    key: str
    path: str  # URI or local path of the output directory
    manifest: dict

    @property
    def rows(self) -> dict[str, int]:
        return self.manifest.get("rows", {})

    def files(self, table: str) -> list[str]:
        """Paths of the Parquet shards of one table of this output, in order."""
        names = sorted(f for f in self.manifest["files"] if f.startswith(f"{table}/") and f.endswith(".parquet"))
        return [f"{self.path}/{n}" for n in names]


class Store:
    """One store root (local path or fsspec URI); data stages and weights use separate roots."""

    def __init__(self, root: str | os.PathLike):
        self.root = str(root).rstrip("/")
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root)
        self.local = _is_local(self.fs)

    def path(self, stage: str, key: str) -> str:
        return f"{self.root}/{stage}/{key}"

    @property
    def local_path(self) -> Path:
        """The root as a local directory (local roots only)."""
        assert self.local, f"{self.root} is not a local store"
        return Path(self._root_path)

    def _fs_path(self, stage: str, key: str) -> str:
        return f"{self._root_path}/{check_name(stage, 'stage')}/{check_name(key, 'key')}"

    def read_manifest(self, stage: str, key: str) -> dict | None:
        """The manifest as written, whatever the state of the files (None: not committed, or a manifest
        that vouches for nothing: `manifest_or_damage` says why). Never raises on a bad manifest."""
        manifest = self.manifest_or_damage(stage, key)
        return manifest if isinstance(manifest, dict) else None

    def manifest_or_damage(self, stage: str, key: str) -> dict | DamagedManifest | None:
        """The manifest as written (None: not committed), or why it vouches for nothing: it does not
        parse (cut short, not JSON, binary), lacks what a commit writes, or names another output."""
        mpath = f"{self._fs_path(stage, key)}/{MANIFEST}"
        if not self.local:  # another process (a run we waited for) may have committed it since we listed it
            self.fs.invalidate_cache(self._fs_path(stage, key))
        if not self.fs.exists(mpath):
            return None
        where = f"{self.path(stage, key)}/{MANIFEST}"
        try:
            with self.fs.open(mpath, "rb") as f:
                manifest = json.loads(f.read())
        except (ValueError, RecursionError) as e:  # not JSON, not UTF-8 (binary), or nested absurdly deep
            return DamagedManifest(where, f"not JSON ({first_line(e)})")
        problem = manifest_problem(manifest, stage, key)
        return DamagedManifest(where, problem) if problem else manifest

    def problems(self, stage: str, key: str, manifest: dict, digests: bool = False) -> list[str]:
        """How the files of an output differ from its manifest: one line per file (none: intact).
        Sizes always (cheap: one listing); sha256 digests when `digests` (reads every byte)."""
        base = self._fs_path(stage, key)
        found = {p[len(base) + 1:]: int(info.get("size") or 0)
                 for p, info in self.fs.find(base, detail=True).items()}
        sizes = manifest.get("sizes", {})
        out = []
        for name, digest in sorted(manifest.get("files", {}).items()):
            where = f"{self.path(stage, key)}/{name}"
            if name not in found:
                out.append(f"{where} is missing")
            elif name in sizes and found[name] != sizes[name]:
                out.append(f"{where} has {found[name]:,} bytes, its manifest says {sizes[name]:,}")
            elif digests:
                with self.fs.open(f"{base}/{name}", "rb") as f:
                    h = hashlib.sha256()
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                if h.hexdigest() != digest:
                    out.append(f"{where} does not match its sha256 in the manifest (edited?)")
        return out

    def get(self, stage: str, key: str) -> Artifact | None:
        """The finished output, or None: only a directory with a manifest whose files are all there,
        at their recorded sizes, counts. A damaged one is reported and treated as missing."""
        manifest = self.manifest_or_damage(stage, key)
        if manifest is None:
            return None
        if isinstance(manifest, DamagedManifest):
            aside = self._set_aside_if_idle(stage, key)
            log.warning("%s %s is damaged: %s; %sit will be recomputed", stage, key, manifest,
                        f"set aside as {aside}, " if aside else "")
            return None
        damage = self.problems(stage, key, manifest)
        if damage:
            more = f" (and {len(damage) - 1} more)" if len(damage) > 1 else ""
            log.warning("%s %s is damaged: %s%s; it will be recomputed", stage, key, damage[0], more)
            return None
        return Artifact(stage=stage, key=key, path=self.path(stage, key), manifest=manifest)

    def stages(self) -> list[str]:
        if not self.fs.exists(self._root_path):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._root_path, detail=False)]
        return sorted(n for n in names if _NAME.fullmatch(n) and self.fs.isdir(f"{self._root_path}/{n}"))

    def keys(self, stage: str) -> list[str]:
        """Keys of the committed outputs of a stage (intact or not: `get` checks)."""
        base = f"{self._root_path}/{check_name(stage, 'stage')}"
        if not self.fs.exists(base):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False)]
        return sorted(n for n in names if not n.startswith(".") and self.fs.exists(f"{base}/{n}/{MANIFEST}"))

    def hidden(self) -> list[tuple[str, str]]:
        """(stage, name) of every hidden entry: scratch, replaced, damaged, work and lock entries."""
        if not self.local:
            return []
        return [(stage, p.name) for stage in self.stages() for p in sorted((Path(self._root_path) / stage).iterdir())
                if p.name.startswith(".")]

    def lock(self, stage: str, key: str) -> FileLock | ObjectLease:
        """The lock of one (stage, key): whoever holds it is the one computing that output.

        Local roots keep a flock beside the output, so every run on this store (from any machine that
        mounts it) sees it. An `s3://` root keeps a lease object beside the output (`tasks.core.lease`),
        so runs on any machine compute a key once. Any other remote root's lock is a flock local to this
        machine: runs here compute a key once; runs on two machines may both compute it, and the
        manifest-last commit keeps that safe."""
        if self.local:
            path = Path(self._root_path) / stage / f".lock-{check_name(key, 'key')}"
        elif self.root.startswith("s3://"):
            from tasks.core.lease import ObjectLease

            url = f"{self.root}/{check_name(stage, 'stage')}/.lease-{check_name(key, 'key')}"
            return ObjectLease(url, what=f"{stage} {key}")
        else:
            tag = hashlib.sha256(self.root.encode()).hexdigest()[:12]
            path = Path(tempfile.gettempdir()) / "slmflow-locks" / tag / f"{stage}-{check_name(key, 'key')}.lock"
        return FileLock(path, what=f"{stage} {key}")

    def clear_stale(self, stage: str, key: str) -> None:
        """Drop what a killed run left of this key (call while holding its lock: nobody else writes it)."""
        if self.local:
            base = Path(self._root_path) / stage
            for p in [*base.glob(f".tmp-{key}-*"), *base.glob(f".old-{key}-*")]:
                shutil.rmtree(p, ignore_errors=True)

    def tidy(self, stage: str, key: str) -> None:
        """After a cache hit: drop what a run killed after the commit left of this key (its lock file,
        checkpoints, scratch), unless a run holds the key right now (e.g. a forced recompute)."""
        if not self.local:
            self._tidy_work_mirror(stage, key)
            return
        base = Path(self._root_path) / stage
        if not any(base.glob(f".*-{key}*")):
            return
        lock = self.lock(stage, key)
        if lock.acquire(blocking=False):
            try:
                self.clear_stale(stage, key)
                shutil.rmtree(base / f".work-{key}", ignore_errors=True)
            finally:
                lock.release()

    def scratch(self, stage: str, key: str = "") -> Path:
        """A fresh local directory to write an output into before commit.

        For a local root it is a hidden sibling of the final directory, so commit is one rename
        on the same filesystem; hidden names (leading dot) never count as outputs.
        """
        prefix = f".tmp-{key}-" if key else ".tmp-"
        if self.local:
            parent = Path(self._root_path) / stage
            parent.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        return Path(tempfile.mkdtemp(prefix=f"slmflow-{stage}{prefix}"))

    def work_dir(self, stage: str, key: str) -> Path:
        """A directory that survives a crash of this (stage, key): training checkpoints live here
        so a rerun resumes. Hidden, so it never counts as an output; dropped after commit. A remote
        root's is a local working copy in the temp dir; its checkpoints are mirrored to `work_mirror`."""
        if self.local:
            path = Path(self._root_path) / stage / f".work-{key}"
        else:
            path = Path(tempfile.gettempdir()) / "slmflow-work" / stage / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def work_mirror(self, stage: str, key: str) -> str | None:
        """Where a remote root keeps the checkpoints of work_dir, `<root>/<stage>/.work-<key>` (so another
        machine resumes: `tasks.core.checkpoint_mirror`); None for a local root, whose work_dir is in it."""
        return None if self.local else f"{self.root}/{check_name(stage, 'stage')}/.work-{check_name(key, 'key')}"

    def shared_dir(self, stage: str, key: str) -> str:
        """Where map steps on workers without this machine's disk share scratch files while the key is
        computed, `<root>/<stage>/.scratch-<key>` (`tasks.core.shared_scratch`; removed after it)."""
        return f"{self.root}/{check_name(stage, 'stage')}/.scratch-{check_name(key, 'key')}"

    def _work_mirror_path(self, stage: str, key: str) -> str:
        return f"{self._root_path}/{check_name(stage, 'stage')}/.work-{check_name(key, 'key')}"

    def drop_work_mirror(self, stage: str, key: str) -> None:
        """Remove the store's checkpoints of this key (after its commit). A failure only warns: the output
        is committed, and the next cache hit's `tidy` tries again."""
        if self.local:
            return
        path = self._work_mirror_path(stage, key)
        try:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        except Exception as e:  # noqa: BLE001 - any store's error; the output is safe either way
            log.warning("%s %s: its checkpoints in the store stay (%s); the next cache hit removes them",
                        stage, key, first_line(e))

    def _tidy_work_mirror(self, stage: str, key: str) -> None:
        """`tidy` on a remote root: the checkpoints a run killed after its commit left in the store."""
        path = self._work_mirror_path(stage, key)
        self.fs.invalidate_cache(path)  # a listing cached earlier in this process may predate the kill
        if not self.fs.exists(path):
            return
        lock = self.lock(stage, key)
        if lock.acquire(blocking=False):
            try:
                self.drop_work_mirror(stage, key)
            finally:
                lock.release()

    def commit(self, scratch: Path, stage: str, key: str, manifest: dict) -> Artifact:
        """Write the manifest (file digests and sizes) and move the finished directory into place."""
        files = sorted(p for p in scratch.rglob("*") if p.is_file() and p.name != MANIFEST)
        manifest["stage"], manifest["key"] = stage, key  # a manifest names its output: a moved copy is caught
        manifest["files"] = {p.relative_to(scratch).as_posix(): file_digest(p) for p in files}
        manifest["sizes"] = {p.relative_to(scratch).as_posix(): p.stat().st_size for p in files}
        make_readable(scratch)
        if self.local:
            fsync_tree(scratch)  # the data is on disk before the manifest that vouches for it
        (scratch / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        final = self._fs_path(stage, key)
        if self.local:
            fsync_file(scratch / MANIFEST)
            fsync_file(scratch)
            final_path = Path(final)
            old = None
            if final_path.exists():  # --force, or a damaged output: swap the old one out, then drop it
                old = final_path.with_name(f".old-{key}-{uuid.uuid4().hex[:8]}")
                os.replace(final_path, old)
            os.replace(scratch, final_path)
            fsync_file(final_path.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            self.fs.invalidate_cache(final)  # another run may have committed it since this process listed it
            if self.fs.exists(final):
                self.fs.rm(final, recursive=True)
            for p in files:
                self.fs.put_file(str(p), f"{final}/{p.relative_to(scratch).as_posix()}")
            self.fs.put_file(str(scratch / MANIFEST), f"{final}/{MANIFEST}")  # last: the commit point
            shutil.rmtree(scratch, ignore_errors=True)
        return Artifact(stage=stage, key=key, path=self.path(stage, key), manifest=manifest)

    def set_aside(self, stage: str, key: str) -> str:
        """Take a damaged output out of the store (it no longer counts; the next run recomputes it),
        keeping its files for inspection under a hidden name that `slmflow gc` removes."""
        final = self._fs_path(stage, key)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        if self.local:
            aside = Path(final).with_name(f".damaged-{key}-{stamp}")
            os.replace(final, aside)
            return str(aside)
        aside = f"{final}/manifest.damaged-{stamp}.json"  # no rename on object stores: un-commit it
        self.fs.mv(f"{final}/{MANIFEST}", aside)
        return aside

    def _set_aside_if_idle(self, stage: str, key: str) -> str | None:
        """Set aside an output whose manifest is damaged, unless a run holds its key: that run's commit
        replaces it, and setting it aside then could take away the output it just committed."""
        lock = self.lock(stage, key)
        if not lock.acquire(blocking=False):
            return None
        try:
            if isinstance(self.manifest_or_damage(stage, key), DamagedManifest):  # still, now that we hold the key
                return self.set_aside(stage, key)
            return None
        finally:
            lock.release()

    @staticmethod
    def discard(scratch: Path) -> None:
        shutil.rmtree(scratch, ignore_errors=True)
