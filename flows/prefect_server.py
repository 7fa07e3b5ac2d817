"""Prefect's temporary API server, started by slmflow itself so that a slow first start never fails a run.

With no `PREFECT_API_URL`, Prefect starts a temporary server per process and gives up after 20 s
(`PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`). The first start on a machine creates Prefect's
SQLite database (about 18 s on an idle 2-core machine), so a busy laptop failed there. `slmflow run`
instead starts the same server (`uvicorn prefect.server.api.server:create_app`, as Prefect does) and
waits on the wall clock, generously, for as long as the process lives; one start at a time per
`PREFECT_HOME`, so two runs never migrate one database at once. The server's URL goes into this
process's environment, so stage subprocesses (torchrun, Dask workers) use it too, and the server
dies with the run (also on SIGKILL of the run alone). It runs in its own session: a Ctrl-C in the
terminal reaches the run only, which stops the server itself, last (flows/interrupt.py). `slmflow run`
starts it first and waits for it last, just before the flow: its seconds of start-up overlap the run's
planning, checks and MLflow set-up.

`apply_defaults` runs before Prefect is imported: telemetry off (no network), slmflow's progress
lines forwarded, and Prefect's own timeouts raised to minutes where a slow machine could hit them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

STARTUP_TIMEOUT_S = 600
PORT_IN_USE = 3  # uvicorn's exit code when the port is taken
DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "slmflow",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    # where Prefect starts its own temporary server (Python API, `pipeline(...)` called directly)
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(STARTUP_TIMEOUT_S),
    "PREFECT_API_REQUEST_TIMEOUT": "300",  # seconds per API call (default 60)
    "PREFECT_SERVER_DATABASE_TIMEOUT": "120",  # per statement, SQLite lock waits included (default 10)
    "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT": "60",  # (default 5)
}
ADVICE = ("start a server yourself (`prefect server start --host 127.0.0.1`) and set "
          "PREFECT_API_URL=http://127.0.0.1:4200/api")


class ServerError(RuntimeError):
    """The temporary server did not come up: one line, with what to do instead."""


def apply_defaults() -> None:
    """Prefect settings slmflow needs, unless the user set them; call before importing Prefect."""
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent(parent: int) -> None:
    """In the server process: get SIGTERM when the run that started it dies (Linux). The kernel sends it
    when the *thread* that spawned the server ends, so only threads that live as long as the server
    spawn it (the caller's, and the watcher, which waits for `stop`)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the run died before the line above: no signal will come
        os._exit(1)


def healthy(url: str) -> bool:
    """`GET <url>/health` answers 200 within 5 s (Prefect's API and MLflow's server both have it)."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def _last_line(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


class PrefectAPI:
    """The Prefect API for this process, as a context manager: `PREFECT_API_URL` if set, else a temporary
    server that lives for the block. Entering only starts the server; `url()` waits until it answers.
    The start takes seconds (the server imports Prefect's whole API in its own process), so the caller
    plans and checks the run and sets up MLflow in between, while it starts, instead of before or after.
    `url()` raises ServerError (one line) when there is no server to use."""

    def __init__(self, log=print, timeout_s: float | None = None):
        self.log = log
        self.timeout_s = timeout_s or float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
                                                           STARTUP_TIMEOUT_S))
        self.configured = os.environ.get("PREFECT_API_URL")
        self._url: str | None = None
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> PrefectAPI:
        if self.configured:
            return self
        from tasks.core.locks import FileLock

        home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
        self._lock = FileLock(home / "slmflow-server-start.lock", what="Prefect server start")
        self._lock.acquire()  # one migration at a time; released once the server answers
        self._errors = Path(tempfile.mkstemp(prefix="slmflow-prefect-server-", suffix=".log")[1])
        self._deadline = time.monotonic() + self.timeout_s
        self._failure: ServerError | None = None
        self._stop, self._ready = threading.Event(), threading.Event()
        self._spawn()
        self._watcher = threading.Thread(target=self._watch, name="slmflow-prefect-server", daemon=True)
        self._watcher.start()
        return self

    def _spawn(self) -> None:
        port = _free_port()
        self._starting = f"http://127.0.0.1:{port}/api"
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        with open(self._errors, "wb") as err:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
                 "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
                env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                preexec_fn=functools.partial(_die_with_parent, os.getpid()))

    def _watch(self) -> None:
        try:
            self._wait_for_server()
        finally:
            self._ready.set()
        self._stop.wait()  # a server this thread spawned dies when the thread ends (PR_SET_PDEATHSIG)

    def _wait_for_server(self) -> None:
        """Wait for the server (on a thread), then make its first API call at once: that call loads what
        /health does not (half a second of the server's time, spent while this process plans the run)."""
        while not healthy(self._starting):
            code = self._proc.poll()
            if self._stop.is_set():  # the run stopped before its flow
                return
            if code == PORT_IN_USE:  # another process took the port first: try another one
                self._spawn()
            elif code is not None:
                self._failure = ServerError(f"Prefect's temporary server exited with code {code} "
                                            f"({_last_line(self._errors)}); {ADVICE}")
                return
            elif time.monotonic() > self._deadline:
                self._failure = ServerError(f"Prefect's temporary server did not answer within {self.timeout_s:.0f} "
                                            f"s (its last output: {_last_line(self._errors)}); {ADVICE}")
                return
            time.sleep(0.05)
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"{self._starting}/ready", timeout=self.timeout_s).close()

    def url(self) -> str:
        """The API's URL, once it answers (the first call waits for the temporary server)."""
        if self._url:
            return self._url
        if self.configured:
            if not healthy(self.configured):
                raise ServerError(f"the Prefect server at PREFECT_API_URL={self.configured} does not answer: start "
                                  f"it (prefect server start --host 127.0.0.1) or unset PREFECT_API_URL, and slmflow "
                                  f"starts a temporary one")
            self._url = self.configured
            return self._url
        if not self._ready.is_set():
            self.log(f"Waiting for Prefect's temporary server on {self._starting} (the first start on a machine "
                     f"creates its database: a minute or more on a busy machine)")
        while not self._ready.wait(0.1):  # short waits: a Ctrl-C is handled only when this thread wakes
            pass
        if self._failure:
            raise self._failure
        self._lock.release()
        self._errors.unlink(missing_ok=True)
        os.environ["PREFECT_API_URL"] = self._url = self._starting
        if "prefect.context" in sys.modules:  # Prefect read its settings at import: make it read them again
            sys.modules["prefect.context"].refresh_global_settings_context()
        return self._url

    def __exit__(self, *exc) -> None:
        if self.configured:
            return
        self._lock.release()  # a no-op once released
        if self._url:
            if "prefect.logging.handlers" in sys.modules:  # send the last log lines and events while it is up
                from prefect.events.worker import EventsWorker
                from prefect.logging.handlers import APILogWorker

                for worker in (APILogWorker, EventsWorker):
                    with contextlib.suppress(Exception):
                        worker.drain_all(timeout=10)
            del os.environ["PREFECT_API_URL"]
            if "prefect.context" in sys.modules:
                sys.modules["prefect.context"].refresh_global_settings_context()
        self.stop(grace_s=10)

    def stop(self, grace_s: float = 3) -> None:
        """Stop the temporary server (SIGTERM, then SIGKILL after `grace_s`); a no-op with PREFECT_API_URL
        or once stopped. An interrupted run calls it directly: no waiting for log lines to reach it."""
        if self.configured or self._proc is None:
            return
        self._stop.set()
        self._proc.terminate()
        try:
            self._proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._errors.unlink(missing_ok=True)  # its output, kept until now for a failed start's message
