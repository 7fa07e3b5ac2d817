"""Training checkpoints in a remote store, so a preempted machine's successor resumes where it stopped.

A stage on a remote root (s3://...) trains in a local work dir (the working copy, in the temp dir:
`Store.work_dir`) and mirrors its checkpoints under the store's work prefix `<root>/<stage>/.work-<key>/`
(`Store.work_mirror`). After each checkpoint is saved locally, rank 0 uploads it (`upload_checkpoint`):
the files of `ckpt-<step>/` first, then the marker `ckpt-<step>.done` (object stores have no rename: the
marker is the upload's commit point, as the manifest is an output's), then it deletes the stored
checkpoints older than those kept locally. When the stage starts computing, `pull_checkpoints` downloads
the complete ones (marker present) that the local work dir lacks, so `resume` (tasks.core.train) finds
them exactly as they were saved; one without its marker is ignored.

Only checkpoints travel: token arrays are recomputed from the stage's inputs. Files a loop names `beside`
a checkpoint (RL's samples, which nothing recomputes) are uploaded before its marker and downloaded too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import fsspec

from tasks.core.base import log
from tasks.core.store import fsync_file, fsync_tree

DONE = ".done"  # the marker's suffix: `ckpt-<step>.done` beside `ckpt-<step>/`
_CHECKPOINT = re.compile(r"ckpt-(\d+)")
_MARKER = re.compile(r"ckpt-(\d+)\.done")


def _listing(fs, base: str) -> dict[str, str]:
    """Name -> "file" or "directory" of what lies directly under `base` (nothing uploaded yet: empty).
    Read fresh: another machine may have written it since this process last looked."""
    fs.invalidate_cache(base)
    try:
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["type"] for e in fs.ls(base, detail=True)}
    except FileNotFoundError:
        return {}


def _steps(names: Iterable[str], pattern: re.Pattern) -> set[int]:
    return {int(m.group(1)) for n in names if (m := pattern.fullmatch(n))}


def upload_checkpoint(ckpt: Path, mirror: str, oldest_kept: int, beside: Iterable[Path] = ()) -> None:
    """Upload the local checkpoint `ckpt` (`ckpt-<step>/`) to `mirror`: `beside` files and its files, then its
    marker; then delete the stored checkpoints older than step `oldest_kept` (the oldest one kept locally)."""
    fs, base = fsspec.core.url_to_fs(mirror)
    base = base.rstrip("/")
    marker = f"{base}/{ckpt.name}{DONE}"
    try:  # a step saved again (its stored copy did not load): un-commit it before its files change
        fs.rm(marker)
    except FileNotFoundError:
        pass
    for path in beside:
        fs.put_file(str(path), f"{base}/{path.name}")
    files = {p.relative_to(ckpt).as_posix(): p for p in sorted(ckpt.rglob("*")) if p.is_file()}
    for name, path in files.items():
        fs.put_file(str(path), f"{base}/{ckpt.name}/{name}")
    sizes = {name: path.stat().st_size for name, path in files.items()}
    fs.pipe_file(marker, json.dumps({"files": sizes}).encode())  # last: the commit point
    _drop_older(fs, base, oldest_kept)


def _drop_older(fs, base: str, oldest_kept: int) -> None:
    """Delete stored checkpoints before step `oldest_kept`: the marker first, so none is ever complete and torn."""
    names = _listing(fs, base)
    for step in sorted(_steps(names, _CHECKPOINT) | _steps(names, _MARKER)):
        if step >= oldest_kept:
            continue
        if f"ckpt-{step}{DONE}" in names:
            fs.rm(f"{base}/ckpt-{step}{DONE}")
        if f"ckpt-{step}" in names:
            fs.rm(f"{base}/ckpt-{step}", recursive=True)


def pull_checkpoints(mirror: str, work: Path, who: str) -> list[str]:
    """Download into `work` the complete checkpoints under `mirror` that it lacks, and the files beside them;
    returns the checkpoints downloaded. Logs one line when the newest checkpoint is one of them (the run
    resumes from the store's copy)."""
    fs, base = fsspec.core.url_to_fs(mirror)
    base = base.rstrip("/")
    names = _listing(fs, base)
    for name, kind in sorted(names.items()):
        if kind == "file" and not _MARKER.fullmatch(name) and not (work / name).exists():
            tmp = work / f".{name}.download"
            fs.get_file(f"{base}/{name}", str(tmp))
            os.replace(tmp, work / name)
    fetched = []
    for step in sorted(_steps(names, _MARKER)):
        name = f"ckpt-{step}"
        if not (work / name).exists() and _download(fs, f"{base}/{name}", work / name):
            fetched.append(name)
    newest = max(_steps((p.name for p in work.iterdir()), _CHECKPOINT), default=None)
    if f"ckpt-{newest}" in fetched:
        log.info("%s: resuming from step %d (checkpoint from %s/ckpt-%d)", who, newest, mirror.rstrip("/"), newest)
    return fetched


def _download(fs, stored: str, local: Path) -> bool:
    """One complete stored checkpoint to `local`, whole or not at all (a sibling renamed into place, as
    `save_checkpoint` does). False, with a warning, when its files do not match its marker."""
    tmp = local.with_name(f".{local.name}.download")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        sizes = json.loads(fs.cat_file(f"{stored}{DONE}"))["files"]
        for name in sizes:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{stored}/{name}", str(tmp / name))
        wrong = [f"{name} has {(tmp / name).stat().st_size} bytes, its marker says {size}"
                 for name, size in sizes.items() if (tmp / name).stat().st_size != size]
    except FileNotFoundError as e:  # deleted since the listing (a run elsewhere moved on)
        wrong = [f"{Path(e.filename or str(e)).name} is gone"]
    if wrong:
        log.warning("stored checkpoint %s does not match its marker (%s); not used", stored, wrong[0])
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    fsync_tree(tmp)
    os.replace(tmp, local)
    fsync_file(local.parent)
    return True
