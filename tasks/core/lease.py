"""A lease object in an S3 store, for one computation per stage key across machines.

`ObjectLease` does for an `s3://` store what `tasks.core.locks.FileLock` does for a local one, with the
same interface. Whoever computes a key writes `<root>/<stage>/.lease-<key>` (hidden: never an output),
JSON: holder (a uuid per acquire), host, pid, since, heartbeat (epoch seconds), what, timeout_s.

- Acquire creates it with a conditional write (`IfNoneMatch="*"`): of two acquirers exactly one does.
- Nobody sees a holder die on an object store, so a holder shows that it lives: a daemon thread rewrites
  the heartbeat every quarter of the timeout, conditional on the ETag it wrote last (`IfMatch`).
- A waiter whose read of the lease finds no heartbeat for longer than the timeout takes it over with a
  write conditional on the ETag it read, so of many waiters exactly one wins. The holder it replaced
  (hung, or cut off from the store) learns it on its next heartbeat and logs one warning; it goes on,
  and the manifest-last commit keeps two commits of one key safe (the same bytes under the same key).
- Release deletes the object conditional on its ETag (on a store without conditional deletes: a plain
  delete, only while the object still names this holder) and stops the heartbeat.

`SLMFLOW_LEASE_TIMEOUT_S` (seconds, default 120) is how long a lease lives without a heartbeat: how
long the key of a killed holder waits before another run takes it over. A runtime setting, never part
of a key. Heartbeats are epoch seconds compared across machines: their clocks must agree to well
within the timeout (NTP does).
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Callable

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from tasks.core.base import StageError, log
from tasks.core.faults import first_line
from tasks.core.locks import wait_to_take

TIMEOUT_ENV = "SLMFLOW_LEASE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 120.0
_TAKEN = {"PreconditionFailed"}  # 412: the object is not the one our condition names
_RACE = _TAKEN | {"ConditionalRequestConflict"}  # 409: another conditional write to it was in flight
_GONE = {"NoSuchKey", "404"}


def lease_timeout_s() -> float:
    """`SLMFLOW_LEASE_TIMEOUT_S`, or the default."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise StageError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds")
    return value


def _code(e: ClientError) -> str:
    return e.response.get("Error", {}).get("Code", "")


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ObjectLease:
    """A lease on `url` (s3://bucket/key): `with ObjectLease(u): ...`, or `acquire(on_wait=...)` / `release()`."""

    def __init__(self, url: str, what: str = "", timeout_s: float | None = None, client=None):
        if not url.startswith("s3://"):
            raise ValueError(f"{url} is not an s3:// URL")
        self.url = url
        self.bucket, _, self.key = url.removeprefix("s3://").partition("/")
        self.what = what or self.key.rsplit("/", 1)[-1]
        self.timeout_s = lease_timeout_s() if timeout_s is None else timeout_s
        self._client = client
        self._holder: str | None = None  # set while this object holds the lease
        self._since = ""
        self._etag = ""  # of our last write: the condition of our next one
        self._io = threading.Lock()  # the heartbeat never writes while release deletes
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None
        self._lost_told = False

    @property
    def client(self):
        if self._client is None:  # honours AWS_ENDPOINT_URL and the usual AWS environment
            self._client = boto3.client("s3")
        return self._client

    # --- the object ---------------------------------------------------------------------------------

    def _content(self) -> bytes:
        return json.dumps({"holder": self._holder, "host": socket.gethostname(), "pid": os.getpid(),
                           "since": self._since, "heartbeat": time.time(), "what": self.what,
                           "timeout_s": self.timeout_s}).encode()

    def _write(self, **condition) -> str:
        """Write our content under `condition`; its ETag."""
        return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._content(),
                                      ContentType="application/json", **condition)["ETag"]

    def _read(self) -> tuple[dict, str, float] | None:
        """(content, ETag, heartbeat) of the lease as it is now; None: there is none."""
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
            body = got["Body"].read()
        except ClientError as e:
            if _code(e) in _GONE:
                return None
            raise
        try:
            content = json.loads(body)
        except ValueError:
            content = None
        content = content if isinstance(content, dict) else {}
        beat = content.get("heartbeat")
        if isinstance(beat, bool) or not isinstance(beat, (int, float)):
            beat = got["LastModified"].timestamp()  # content we cannot read: its last write is its heartbeat
        return content, got["ETag"], float(beat)

    def _timeout_of(self, content: dict) -> float:
        """The timeout its holder wrote (it beats well within that one), else ours."""
        timeout = content.get("timeout_s")
        ok = isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0
        return float(timeout) if ok else self.timeout_s

    def _etag_if_ours(self) -> str | None:
        """The lease's ETag when it still names this holder (e.g. a heartbeat that reached the store
        although its reply did not), else None."""
        found = self._read()
        return found[1] if found and found[0].get("holder") == self._holder else None

    # --- acquire -------------------------------------------------------------------------------------

    def _try(self) -> bool:
        self._holder, self._since = uuid.uuid4().hex, _now_iso()
        try:
            self._etag = self._write(IfNoneMatch="*")
            return True
        except ClientError as e:
            if _code(e) not in _RACE:
                raise StageError(f"{self.url}: the store refused the key's lease ({first_line(e)}): an s3:// store "
                                 "needs write access and S3 conditional writes (If-None-Match, If-Match)") from e
        if self._take_over_if_silent():
            return True
        self._holder = None
        return False

    def _take_over_if_silent(self) -> bool:
        found = self._read()
        if found is None:  # released since we tried: the next try creates it
            return False
        content, etag, beat = found
        silent = time.time() - beat
        if silent <= self._timeout_of(content):
            return False
        try:
            self._etag = self._write(IfMatch=etag)
        except ClientError as e:
            if _code(e) in _RACE | _GONE:  # another waiter took it over first, or its holder released it
                return False
            raise
        log.warning("%s: took over the lease of pid %s on %s (holding since %s) after %.0fs without a heartbeat",
                    self.what, content.get("pid", "?"), content.get("host", "?"), content.get("since", "?"), silent)
        return True

    def acquire(self, blocking: bool = True, on_wait: Callable[[dict, float], None] | None = None,
                every_s: float = 30.0, poll_s: float = 1.0) -> bool:
        """Take the lease; `on_wait(owner, waited_seconds)` is called at once and then every `every_s`
        while another run holds it. Non-blocking: False if it is held."""
        if not wait_to_take(self._try, self.owner, blocking, on_wait, every_s, poll_s):
            return False
        self._start_heartbeat()
        return True

    # --- hold ----------------------------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        self._stop = threading.Event()
        self._lost_told = False
        self._beating = threading.Thread(target=self._beat_until, args=(self._stop,), daemon=True,
                                         name=f"lease heartbeat {self.what}")
        self._beating.start()

    def _beat_until(self, stop: threading.Event) -> None:
        while not stop.wait(self.timeout_s / 4):
            with self._io:
                if stop.is_set():
                    return
                if not self._beat():
                    return

    def _beat(self) -> bool:
        """One heartbeat; False once the lease is lost (no more beats)."""
        try:
            self._etag = self._write(IfMatch=self._etag)
            return True
        except ClientError as e:
            if _code(e) not in _TAKEN | _GONE:
                log.warning("%s: a heartbeat of its lease failed (%s); retrying", self.what, first_line(e))
                return True
        except BotoCoreError as e:  # the store unreachable for a moment: the next beat may get through
            log.warning("%s: a heartbeat of its lease failed (%s); retrying", self.what, first_line(e))
            return True
        try:
            etag = self._etag_if_ours()
        except (ClientError, BotoCoreError):
            return True  # cannot tell now: the next beat asks again
        if etag:
            self._etag = etag
            return True
        self._tell_lost()
        return False

    def _tell_lost(self) -> None:
        if not self._lost_told:
            self._lost_told = True
            log.warning("%s: lost its lease %s to another run (no heartbeat reached the store within %.0fs); "
                        "both may compute it, and the manifest-last commit keeps that safe",
                        self.what, self.url, self.timeout_s)

    # --- peek and release ----------------------------------------------------------------------------

    def owner(self) -> dict:
        """Who holds the lease, as its holder wrote it ({} if unknown)."""
        try:
            found = self._read()
        except (ClientError, BotoCoreError):
            return {}
        return found[0] if found else {}

    def held(self) -> bool:
        """Whether a live run holds the lease now: it exists and its heartbeat is recent (takes nothing)."""
        found = self._read()
        if found is None:
            return False
        content, _, beat = found
        return time.time() - beat <= self._timeout_of(content)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours. Never raises for the store: a
        lease it could not delete expires after the timeout."""
        if self._holder is None:
            return
        self._stop.set()
        if self._beating is not None:
            self._beating.join()
        with self._io:
            try:
                self._delete()
            except (ClientError, BotoCoreError) as e:
                log.warning("%s: could not delete its lease %s (%s); another run takes it over after %.0fs",
                            self.what, self.url, first_line(e), self.timeout_s)
            finally:
                self._holder, self._beating = None, None

    def _delete(self) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self._etag)
            return
        except ClientError as e:
            code = _code(e)
        if code in _GONE:
            return
        etag = self._etag_if_ours()  # a heartbeat reply lost on the way, or a store without conditional deletes
        if etag is None:
            if code in _TAKEN:
                self._tell_lost()
            return  # another run's lease now (or none): not ours to delete
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=etag)
        except ClientError as e:
            if _code(e) in _RACE | _GONE:
                return
            self.client.delete_object(Bucket=self.bucket, Key=self.key)  # no conditional deletes here; it named us

    def __enter__(self) -> ObjectLease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
