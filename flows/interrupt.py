"""Ctrl-C (SIGINT) and SIGTERM during `slmflow run`: stop within seconds, with the store and MLflow tidy.

A stage is a long call on a thread (a torch loop, a DuckDB query) that cannot be stopped cooperatively
in time, and a KeyboardInterrupt inside Prefect's engine becomes a crash report and minutes of retries
against the temporary server. So the flow runs off the main thread (`in_thread`; there Prefect installs
no SIGTERM handler of its own either), and the main thread, on the first signal, ends the run itself: the MLflow runs this process has open end as KILLED, its
Prefect flow run is marked Cancelled, stage subprocesses get SIGTERM, the temporary Prefect server
stops (last: the steps before it may use it), one line says how to resume, and the process exits
(os._exit: stage threads are not waited for). Nothing half-written becomes visible: a stage writes into
scratch and commits by one rename, and checkpoints are written atomically; the next run drops the scratch
and resumes training from the last checkpoint. A second signal exits at once. Exit code 128 + the
signal: 130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_S = 6.0  # the most the clean-up may take: then the process exits anyway (a test allows 10 s)


def command_line() -> str:
    """This command as a user reruns it: `slmflow run -c tiny.yaml`."""
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


class Interrupts:
    """In the main thread, for the length of a `with` block: the first SIGINT or SIGTERM runs `steps` in
    order (on a thread, at most GRACE_S: the main thread may have been interrupted holding a lock a step
    needs), prints `interrupted: ...` with `hint()`, and exits; a second signal exits at once."""

    def __init__(self, command: str | None = None):
        self.command = command or command_line()
        self.steps: list[Callable[[], Any]] = []
        self.hint: Callable[[], str] = lambda: ""
        self._signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupts:
        with contextlib.suppress(ValueError):  # not the main thread (an embedding caller): leave signals be
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        if self._signal is not None:  # the second signal (Python runs it inside the first one's wait)
            self._exit(signum, "")
        self._signal = signum
        said: list[str] = []
        clean_up = threading.Thread(target=self._clean_up, args=(said,), name="slmflow-interrupt", daemon=True)
        clean_up.start()
        join(clean_up, GRACE_S)
        self._exit(signum, said[0] if said else "")

    def _exit(self, signum: int, hint: str) -> None:
        resume = f" ({hint})" if hint else ""
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.write(f"\ninterrupted: rerun `{self.command}` to resume{resume}\n")
            sys.stderr.flush()
        os._exit(128 + signum)

    def _clean_up(self, said: list[str]) -> None:
        try:
            said.append(self.hint())  # before the steps: it reads which stage runs are open
        except Exception:  # noqa: BLE001  the line without its hint
            said.append("")
        logging.disable(logging.CRITICAL)  # stage threads still run: nothing of theirs after this line
        for step in self.steps:
            with contextlib.suppress(Exception):  # best effort: each step gets its chance
                step()


def join(thread: threading.Thread, timeout_s: float = float("inf")) -> None:
    """`thread.join(timeout_s)` in short waits: Python runs a signal handler only once the main thread
    wakes, and a library that sets SA_RESTART on SIGINT (polars does, on import) keeps a long wait asleep."""
    deadline = time.monotonic() + timeout_s
    while thread.is_alive() and time.monotonic() < deadline:
        thread.join(0.1)


def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` on a thread while the main thread waits, free to take a signal at once (a wait on a
    lock is interrupted by signals, a long torch or DuckDB call is not). fn's exception is raised here."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # noqa: BLE001  handed to the caller
            box["error"] = e

    thread = threading.Thread(target=target, name="slmflow-pipeline", daemon=True)
    thread.start()
    join(thread)
    if "error" in box:
        raise box["error"]
    return box["result"]


def _open_runs() -> dict[str, dict[str, str]]:
    """tasks.core.lineage.open_runs, without importing MLflow (seconds) where nothing has yet."""
    lineage = sys.modules.get("tasks.core.lineage")
    return lineage.open_runs() if lineage else {}


def kill_open_runs() -> None:
    """End this process's open MLflow runs as KILLED (tasks.core.lineage.kill_open_runs)."""
    if lineage := sys.modules.get("tasks.core.lineage"):
        lineage.kill_open_runs()


def cancel_flow_run() -> None:
    """Mark this process's pipeline flow run Cancelled on the Prefect server (else it stays Running there)."""
    ids = {tags.get("prefect.flow_run_id") for tags in _open_runs().values()} - {None, ""}
    if not ids:
        return
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    with get_client(sync_client=True) as client:
        for flow_run_id in ids:
            client.set_flow_run_state(flow_run_id, Cancelled(message="interrupted (Ctrl-C or SIGTERM)"), force=True)


def stop_children() -> None:
    """SIGTERM to this process's children in its session (torchrun, Dask workers): a terminal's Ctrl-C
    reaches them, a SIGTERM to this process alone does not. The Prefect server has its own session."""
    me, session = os.getpid(), os.getsid(0)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == me and int(fields[3]) == session:
                os.kill(int(stat.parent.name), signal.SIGTERM)


def resume_hint(cfg, plan) -> str:
    """`pretrain resumes from step 200's checkpoint`: what each stage this process is computing does on
    the rerun (finished stages are taken from the store)."""
    from tasks.core.store import Store

    said = []
    for tags in _open_runs().values():
        planned = plan.stages.get(tags.get("instance", ""))
        if planned is None or tags.get("cached") != "false":
            continue
        root = cfg.run.models_root if planned.stage.store == "models" else cfg.run.data_root
        work = Store(root).work_dir(planned.stage.name, planned.key)
        steps = [int(p.name.split("-")[1]) for p in work.glob("ckpt-*") if p.name.split("-")[1].isdigit()]
        said.append(f"{planned.name} resumes from step {max(steps)}'s checkpoint" if steps
                    else f"{planned.name} starts again")
    return ", ".join(said)
