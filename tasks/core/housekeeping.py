"""What `slmflow gc` may remove from a store: entries that no longer count, each with the reason.

- `.tmp-<key>-*` and `.old-<key>-*`: an output a killed run was writing or replacing;
- `.damaged-<key>-*`: an output `slmflow verify` set aside;
- `.work-<key>`: checkpoints of a key that finished, or that no given config names;
- `.lock-<key>`: a lock file a killed run left (never one that is held);
- `<key>`: a stored output that no given config reaches.

An entry whose key's lock is held belongs to a run in progress and is never listed.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from tasks.core.store import Store

_HIDDEN = re.compile(r"\.(tmp|old|damaged|work|lock)-([0-9a-f]{16})?")


@dataclass(frozen=True)
class Garbage:
    path: Path
    stage: str
    why: str
    bytes: int

    def remove(self) -> None:
        if self.path.is_dir():
            shutil.rmtree(self.path)
        else:
            self.path.unlink(missing_ok=True)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def find_garbage(store: Store, reachable: set[tuple[str, str]]) -> list[Garbage]:
    """Entries of a local store that no longer count; `reachable`: (stage, key) of every output
    the given configs name (their plans)."""
    if not store.local:
        return []
    root = store.local_path
    found = []
    for stage, name in store.hidden():
        match = _HIDDEN.match(name)
        if not match:
            continue
        kind, key = match.groups()
        if key and store.lock(stage, key).held():
            continue  # a run is computing this key right now
        why = {"tmp": "unfinished output of a stopped run", "old": "replaced output a stopped run left",
               "damaged": "damaged output set aside by slmflow verify", "lock": "lock file a stopped run left"}.get(kind)
        if kind == "work":
            if store.read_manifest(stage, key) is not None:
                why = "checkpoints of a finished output"
            elif (stage, key) not in reachable:
                why = "checkpoints of a key no given config names"
        if why:
            path = root / stage / name
            found.append(Garbage(path, stage, why, _size(path)))
    for stage in store.stages():
        for key in store.keys(stage):
            if (stage, key) not in reachable and not store.lock(stage, key).held():
                path = root / stage / key
                found.append(Garbage(path, stage, "output no given config reaches", _size(path)))
    return found
