"""Inter-process locks on local (or NFS) files, for one computation per stage key and one SQLite writer.

`FileLock` is an exclusive `flock` on a lock file. The kernel (or the NFSv4 server's lease) drops it
when its holder dies, even by SIGKILL, so a lock left by a killed process is taken over at once
instead of being waited on forever. The holder writes who it is into the file, so a waiter can say
whom it waits for. On release the holder unlinks the file while still holding it; an acquirer that
locked an inode which was unlinked meanwhile notices (the path no longer names its inode) and
retries, so there is never a second holder and no lock file is left behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable


def wait_to_take(take: Callable[[], bool], owner: Callable[[], dict], blocking: bool,
                 on_wait: Callable[[dict, float], None] | None, every_s: float, poll_s: float) -> bool:
    """Call `take` until it succeeds (True), every `poll_s`; False at once when not `blocking`.
    `on_wait(owner(), waited_seconds)` at once and then every `every_s` while it does not (a flock and a
    store's lease wait alike)."""
    start = time.monotonic()
    told = None
    while not take():
        if not blocking:
            return False
        waited = time.monotonic() - start
        if on_wait and (told is None or waited - told >= every_s):
            told = waited
            on_wait(owner(), waited)
        time.sleep(poll_s)
    return True


class FileLock:
    """An exclusive lock on `path`: `with FileLock(p): ...`, or `acquire(on_wait=...)` / `release()`."""

    def __init__(self, path: str | os.PathLike, what: str = ""):
        self.path = Path(path)
        self.what = what or self.path.name
        self._fd: int | None = None

    def _try(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:  # the previous holder unlinked it after we opened it
            same = False
        if not same:
            os.close(fd)
            return False
        self._fd = fd
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "since": datetime.now(timezone.utc).isoformat(timespec="seconds"), "what": self.what}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        return True

    def owner(self) -> dict:
        """Who holds the lock, as its holder wrote it ({} if unknown)."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self, blocking: bool = True, on_wait: Callable[[dict, float], None] | None = None,
                every_s: float = 30.0, poll_s: float = 0.2) -> bool:
        """Take the lock; `on_wait(owner, waited_seconds)` is called at once and then every `every_s`
        while another process holds it. Non-blocking: False if it is held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return wait_to_take(self._try, self.owner, blocking, on_wait, every_s, poll_s)

    def held(self) -> bool:
        """Whether a process holds the lock now (a peek: takes nothing, removes nothing)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops a lock the peek took
        return False

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: see the module docstring
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
