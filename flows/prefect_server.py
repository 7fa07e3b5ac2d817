"""Prefect's temporary API server, started by slmflow itself so that a slow first start never fails a run.

With no `PREFECT_API_URL`, Prefect starts a temporary server per process and gives up after 20 s
(`PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`). The first start on a machine creates Prefect's
SQLite database (about 18 s on an idle 2-core machine), so a busy laptop failed there. `slmflow run`
instead starts the same server (`uvicorn prefect.server.api.server:create_app`, as Prefect does) and
waits on the wall clock, generously, for as long as the process lives; one start at a time per
`PREFECT_HOME`, so two runs never migrate one database at once. The server's URL goes into this
process's environment, so stage subprocesses (torchrun, Dask workers) use it too, and the server
dies with the run (also on SIGKILL of the run alone).

`apply_defaults` runs before Prefect is imported: telemetry off (no network), slmflow's progress
lines forwarded, and Prefect's own timeouts raised to minutes where a slow machine could hit them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

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


def _die_with_parent() -> None:
    """In the server process: get SIGTERM when the run that started it dies (Linux)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


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


def _start(timeout_s: float, log) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    errors = Path(tempfile.mkstemp(prefix="slmflow-prefect-server-", suffix=".log")[1])
    deadline = time.monotonic() + timeout_s
    while True:
        port = _free_port()
        url = f"http://127.0.0.1:{port}/api"
        log(f"Starting Prefect's temporary server on {url} (the first start on a machine creates its "
            f"database: a minute or more on a busy machine)")
        with open(errors, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
                 "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
                env=env, stdout=subprocess.DEVNULL, stderr=err, preexec_fn=_die_with_parent)
        while proc.poll() is None and not healthy(url):
            if time.monotonic() > deadline:
                proc.kill()
                raise ServerError(f"Prefect's temporary server did not answer within {timeout_s:.0f} s "
                                  f"(its last output: {_last_line(errors)}); {ADVICE}")
            time.sleep(0.2)
        if proc.poll() is None:
            errors.unlink(missing_ok=True)
            return proc, url
        if proc.returncode != PORT_IN_USE:  # another process took the port first: try another one
            raise ServerError(f"Prefect's temporary server exited with code {proc.returncode} "
                              f"({_last_line(errors)}); {ADVICE}")


@contextlib.contextmanager
def prefect_api(log=print, timeout_s: float | None = None) -> Iterator[str]:
    """The Prefect API for this process: `PREFECT_API_URL` if set, else a temporary server that
    lives for this block. Raises ServerError (one line) if it cannot be started."""
    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        if not healthy(configured):
            raise ServerError(f"the Prefect server at PREFECT_API_URL={configured} does not answer: start it "
                              f"(prefect server start --host 127.0.0.1) or unset PREFECT_API_URL, and slmflow "
                              f"starts a temporary one")
        yield configured
        return
    from tasks.core.locks import FileLock

    timeout_s = timeout_s or float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", STARTUP_TIMEOUT_S))
    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    with FileLock(home / "slmflow-server-start.lock", what="Prefect server start"):  # one migration at a time
        proc, url = _start(timeout_s, log)
    os.environ["PREFECT_API_URL"] = url
    if "prefect.context" in sys.modules:  # Prefect read its settings at import: make it read them again
        sys.modules["prefect.context"].refresh_global_settings_context()
    try:
        yield url
    finally:
        if "prefect.logging.handlers" in sys.modules:  # send the last log lines and events while it is up
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            for worker in (APILogWorker, EventsWorker):
                with contextlib.suppress(Exception):
                    worker.drain_all(timeout=10)
        del os.environ["PREFECT_API_URL"]
        if "prefect.context" in sys.modules:
            sys.modules["prefect.context"].refresh_global_settings_context()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
