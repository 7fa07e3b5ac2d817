"""The content-addressed stage store (DESIGN.md, "The stage contract").

Output of stage S with key K lives at `<root>/<S>/<K>/`: data files plus `manifest.json`.
A directory without a manifest never counts as done. Local roots get an atomic rename of
a fully written sibling directory; other fsspec filesystems (object stores, which have no
rename) get the data files first and the manifest last, so the manifest is the commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

MANIFEST = "manifest.json"
KEY_CHARS = 16  # 64 bits of sha256: short enough for paths, far from collisions at our scale


def canonical_json(value: Any) -> str:
    """The one JSON spelling of a value: sorted keys, no whitespace, UTF-8 kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def stage_key(name: str, version: int, config: BaseModel | dict, input_keys: dict[str, str]) -> str:
    """Hash of the stage name, its VERSION, its canonical config and its inputs' keys: nothing else."""
    cfg = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
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
        self.local = self.fs.protocol in ("file", "local") or "file" in self.fs.protocol

    def path(self, stage: str, key: str) -> str:
        return f"{self.root}/{stage}/{key}"

    def _fs_path(self, stage: str, key: str) -> str:
        return f"{self._root_path}/{stage}/{key}"

    def get(self, stage: str, key: str) -> Artifact | None:
        """The finished output, or None: only a directory with a manifest counts."""
        mpath = f"{self._fs_path(stage, key)}/{MANIFEST}"
        if not self.fs.exists(mpath):
            return None
        with self.fs.open(mpath, "r") as f:
            manifest = json.load(f)
        return Artifact(stage=stage, key=key, path=self.path(stage, key), manifest=manifest)

    def keys(self, stage: str) -> list[str]:
        base = f"{self._root_path}/{stage}"
        if not self.fs.exists(base):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False)]
        return sorted(n for n in names if not n.startswith(".") and self.fs.exists(f"{base}/{n}/{MANIFEST}"))

    def scratch(self, stage: str) -> Path:
        """A fresh local directory to write an output into before commit.

        For a local root it is a hidden sibling of the final directory, so commit is one rename
        on the same filesystem; hidden names (leading dot) never count as outputs.
        """
        if self.local:
            parent = Path(self._root_path) / stage
            parent.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
        return Path(tempfile.mkdtemp(prefix=f"slmflow-{stage}-"))

    def work_dir(self, stage: str, key: str) -> Path:
        """A directory that survives a crash of this (stage, key): training checkpoints live here
        so a rerun resumes. Hidden, so it never counts as an output; dropped after commit."""
        if self.local:
            path = Path(self._root_path) / stage / f".work-{key}"
        else:  # resuming across machines needs a shared disk; a remote root resumes per machine
            path = Path(tempfile.gettempdir()) / "slmflow-work" / stage / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def commit(self, scratch: Path, stage: str, key: str, manifest: dict) -> Artifact:
        """Write the manifest (with file digests) and move the finished directory into place."""
        files = sorted(p for p in scratch.rglob("*") if p.is_file() and p.name != MANIFEST)
        manifest["files"] = {p.relative_to(scratch).as_posix(): file_digest(p) for p in files}
        (scratch / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        final = self._fs_path(stage, key)
        if self.local:
            final_path = Path(final)
            old = None
            if final_path.exists():  # --force: swap the old output out, then drop it
                old = final_path.with_name(f".old-{key}-{uuid.uuid4().hex[:8]}")
                os.replace(final_path, old)
            os.replace(scratch, final_path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            if self.fs.exists(final):
                self.fs.rm(final, recursive=True)
            for p in files:
                self.fs.put_file(str(p), f"{final}/{p.relative_to(scratch).as_posix()}")
            self.fs.put_file(str(scratch / MANIFEST), f"{final}/{MANIFEST}")  # last: the commit point
            shutil.rmtree(scratch, ignore_errors=True)
        return Artifact(stage=stage, key=key, path=self.path(stage, key), manifest=manifest)

    @staticmethod
    def discard(scratch: Path) -> None:
        shutil.rmtree(scratch, ignore_errors=True)
