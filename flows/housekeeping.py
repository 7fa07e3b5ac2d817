"""What `slmflow gc` may remove from a store: entries that no longer count, each with the reason.

- `.tmp-<key>-*` and `.old-<key>-*`: an output a killed run was writing or replacing;
- `.damaged-<key>-*`: an output `slmflow verify` set aside;
- `.work-<key>`: checkpoints of a key that finished, or that no given config names; in any other,
  the `.bad-ckpt-<step>-*` checkpoints set aside because they did not load;
- `.lock-<key>`: a lock file a killed run left (never one that is held);
- `<key>`: a stored output that no kept plan (given configs, recorded runs) names, that no model
  registry version points at, and that was not made since a given time.

An entry whose key's lock is held belongs to a run in progress and is never listed.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
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


def _made_since(manifest: dict, since: datetime) -> bool:
    try:
        made = datetime.fromisoformat(manifest["created"])
    except KeyError:
        return False  # no date: as old as can be
    except (TypeError, ValueError):
        return True  # a date that does not parse: it may be recent, keep it
    return (made if made.tzinfo else made.replace(tzinfo=timezone.utc)) >= since


def _unreached(stage: str, key: str) -> str:
    return "output no given config reaches"


def find_garbage(store: Store, reachable: set[tuple[str, str]], why_unreached: Callable[[str, str], str] = _unreached,
                 made_since: datetime | None = None) -> list[Garbage]:
    """Entries of a local store that no longer count; `reachable`: (stage, key) of every output
    the kept plans name; `why_unreached`: what the listing says of a stored output they don't;
    `made_since`: stored outputs made since then are kept, reached or not."""
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
        elif kind == "work":  # kept for a resume: only the checkpoints set aside in it (tasks/core/train.py) go
            found += [Garbage(p, stage, "checkpoint that did not load, set aside", _size(p))
                      for p in sorted((root / stage / name).glob(".bad-ckpt-*"))]
    for stage in store.stages():
        for key in store.keys(stage):
            if (stage, key) in reachable or store.lock(stage, key).held():
                continue
            manifest = store.read_manifest(stage, key) or {}
            if manifest.get("info", {}).get("registered_version"):
                continue  # a model version in MLflow's registry points at these files (tasks.rl)
            if made_since and _made_since(manifest, made_since):
                continue  # a run that has not recorded its plan yet (one in progress) may be reading it
            path = root / stage / key
            found.append(Garbage(path, stage, why_unreached(stage, key), _size(path)))
    return found
