"""Ctrl-C and SIGTERM during `slmflow run` (flows/interrupt.py): a real signal to a real run of the tiny
pipeline ends it within seconds (130 / 143) with one line and no traceback, its MLflow runs KILLED and its
Prefect server gone, and the same command run again resumes training from the last checkpoint.

The checks that signal `slmflow run` only drive processes: they run in the background from the start of
the session (conftest's `early`, `checks_job`), each in a directory of its own, and each test here waits
for its check and fails with what it raised."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, copy_outputs, tiny_config
from mlflow import MlflowClient

from flows.config import load_config
from flows.pipeline import make_plan
from tasks.core.store import Store

SLMFLOW = str(Path(sys.executable).with_name("slmflow"))
STOP_S = 10  # how soon after the signal the run must be gone


class Run:
    """`slmflow run -c <root>/tiny.yaml ARGS` in its own process group, as a terminal starts it; its
    stderr is read on a thread so the test can wait for a line."""

    def __init__(self, root: Path, prefect_home: Path, *args: str):
        self.args = ["slmflow", "run", "-c", str(root / "tiny.yaml"), *args]
        prefect_home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
        # one torch thread: the tiny model's matmuls only spin on a second one on a busy machine (minutes)
        env.update(PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1",
                   OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([SLMFLOW, *self.args[1:]], cwd=root, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self._reader.start()

    def wait_for(self, pattern: str, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(re.search(pattern, line) for line in list(self.lines)):
            assert self.proc.poll() is None, f"exit {self.proc.returncode} before {pattern!r}:\n{self.stderr()[-3000:]}"
            assert time.monotonic() < deadline, f"no {pattern!r} within {timeout_s} s:\n{self.stderr()[-3000:]}"
            time.sleep(0.02)

    def servers(self) -> list[int]:
        """This run's Prefect server processes (its children running Prefect's API app)."""
        return [pid for pid in children(self.proc.pid) if b"prefect.server.api.server:create_app" in cmdline(pid)]

    def signal(self, sig: int, group: bool) -> tuple[int, float]:
        """Send `sig` (to the whole group, as a terminal's Ctrl-C does, or to the process alone); wait for
        the exit. Returns (exit code, seconds from the signal to the exit)."""
        start = time.monotonic()
        (os.killpg if group else os.kill)(self.proc.pid, sig)
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise
        return code, time.monotonic() - start

    def stderr(self) -> str:
        return "".join(self.lines)

    def finish(self, timeout_s: float = 600) -> int:
        code = self.proc.wait(timeout=timeout_s)
        self._reader.join(10)
        return code


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError):
            pass
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b""


def gone(pids: list[int], wait_s: float = 5) -> bool:
    """No process left of `pids` (a zombie counts as gone), after up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = []
        for pid in pids:
            try:
                alive += [pid] if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z" else []
            except OSError:
                pass
        if not alive or time.monotonic() > deadline:
            return not alive
        time.sleep(0.1)


def assert_stopped(run: Run, code: int, seconds: float, expected: int) -> str:
    """Exit code, time, one line and no traceback, no server left; returns that line."""
    run._reader.join(10)
    err = run.stderr()
    assert code == expected and seconds < STOP_S, f"exit {code} after {seconds:.1f} s:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"interrupted: rerun `{' '.join(run.args)}` to resume"), err[-3000:]
    return last


def mlflow_runs(root: Path) -> list:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("slmflow-tiny").experiment_id], max_results=500)


def test_ctrl_c_mid_pretrain_stops_at_once_and_the_rerun_resumes(early):
    """Ctrl-C in a terminal (SIGINT to the whole process group) once pretrain has checkpointed step 40 of
    120 (tiny.yaml's pretrain, shortened: the check is the stop and the resume). The store starts with the
    session's outputs upstream of pretrain (quick_run's, under the same keys: the run computes pretrain)."""
    early["interrupt"].check("ctrl_c_mid_pretrain_stops_at_once_and_the_rerun_resumes")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_to_the_process_alone_stops_it_and_its_server(early, sig):
    """SIGTERM (a process manager) or SIGINT to `slmflow run` alone, in a data stage: its server, in its
    own session, gets nothing, and is stopped by the run."""
    early["interrupt"].check(f"a_signal_to_the_process_alone_stops_it_and_its_server[{sig}]")


def test_the_server_dies_with_a_run_killed_alone(early):
    """SIGKILL to `slmflow run` alone: its server, in another session, goes too (PR_SET_PDEATHSIG)."""
    early["interrupt"].check("the_server_dies_with_a_run_killed_alone")


def test_a_run_being_created_when_the_signal_comes_ends_killed(early):
    """The race behind a RUNNING run after an interrupt: a stage thread is inside MLflow's create_run when
    the clean-up ends the open runs. The clean-up waits for it and ends it too; after it no run starts."""
    early["interrupt"].check("a_run_being_created_when_the_signal_comes_ends_killed")


def test_a_second_signal_exits_at_once(tmp_path):
    """While the first signal's clean-up is still under way (here: a step that hangs), a second Ctrl-C
    ends the process at once. polars is imported first: it sets SA_RESTART on SIGINT, which would keep a
    plain wait asleep through the signal."""
    script = textwrap.dedent("""
        import time
        import polars  # noqa: F401
        from flows.interrupt import Interrupts, in_thread
        with Interrupts("slmflow run -c x.yaml") as stop:
            stop.steps = [lambda: time.sleep(60)]
            print("ready", flush=True)
            in_thread(time.sleep, 60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None  # the first one waits for its clean-up
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=10)
        assert code == 130 and time.monotonic() - start < 2
        assert proc.stderr.read().strip() == "interrupted: rerun `slmflow run -c x.yaml` to resume"
    finally:
        proc.kill()


# -- the checks, run by `checks_job` (root: a directory of the check's own) ------------------------------

def ctrl_c_mid_pretrain_stops_at_once_and_the_rerun_resumes(root: str, prefect_home: str, quick_root: str) -> None:
    root, prefect_home = Path(root), Path(prefect_home)
    cfg = tiny_config(root, training={"pretrain": {"max_steps": 120, "eval_every": 120, "checkpoint_every": 40}})
    copy_outputs(Path(quick_root), cfg, ["pack"])
    run = Run(root, prefect_home, "--only", "pretrain")
    run.wait_for(r"train step [56]0/120")  # past its step-40 checkpoint, well before the step-80 one
    servers = run.servers()
    assert servers, "no Prefect server child found"
    code, seconds = run.signal(signal.SIGINT, group=True)
    last = assert_stopped(run, code, seconds, 130)
    assert last.endswith("(pretrain resumes from step 40's checkpoint)"), last
    assert gone(servers), servers
    runs = mlflow_runs(root)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"], [r.info for r in runs]
    killed = {r.info.run_name for r in runs if r.info.status == "KILLED"}
    assert "pretrain" in killed and any(name.startswith("pipeline-") for name in killed), killed
    planned = make_plan(load_config(cfg)).stages["pretrain"]
    models = Store(root / "models")
    assert models.get("pretrain", planned.key) is None, "a half-done pretrain is visible"
    assert (root / "models" / "pretrain" / f".work-{planned.key}" / "ckpt-40").is_dir(), "no ckpt-40"

    again = Run(root, prefect_home, "--only", "pretrain")  # the same command
    assert again.finish() == 0, again.stderr()[-3000:]
    assert "resuming from ckpt-40 (step 40)" in again.stderr(), again.stderr()[-3000:]
    resumed = models.get("pretrain", planned.key).manifest["metrics"]["resumed_from_step"]
    assert resumed == 40, resumed
    statuses = {r.info.status for r in mlflow_runs(root)}
    assert statuses == {"FINISHED", "KILLED"}, statuses


def a_signal_to_the_process_alone_stops_it_and_its_server(root: str, prefect_home: str, sig: str) -> None:
    root, prefect_home, sig = Path(root), Path(prefect_home), signal.Signals[sig]
    tiny_config(root)
    run = Run(root, prefect_home, "--only", "dedup")
    run.wait_for(r"slmflow - ingest: ")  # ingest is computing
    servers = run.servers()
    assert servers, "no Prefect server child found"
    code, seconds = run.signal(sig, group=False)
    assert_stopped(run, code, seconds, 128 + sig)
    assert gone(servers), servers
    runs = mlflow_runs(root)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"], [r.info for r in runs]
    parents = [r.info.status for r in runs if r.info.run_name.startswith("pipeline-")]
    assert parents == ["KILLED"], parents


def the_server_dies_with_a_run_killed_alone(root: str, prefect_home: str) -> None:
    root, prefect_home = Path(root), Path(prefect_home)
    tiny_config(root)
    run = Run(root, prefect_home, "--only", "ingest")
    run.wait_for(r"slmflow - ingest: ")
    servers = run.servers()
    assert servers, "no Prefect server child found"
    run.proc.kill()
    run.finish()
    assert gone(servers, wait_s=15), servers  # SIGTERM from the kernel, then the server's own shutdown


def a_run_being_created_when_the_signal_comes_ends_killed(root: str, prefect_home: str) -> None:
    tmp_path = Path(root)
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = textwrap.dedent(f"""
        import threading, time
        from tasks.core import lineage
        tracker = lineage.Tracker("sqlite:///{tmp_path / 'mlflow.db'}", "race")
        create, inside, go = tracker.client.create_run, threading.Event(), threading.Event()
        def slow_create(*args, **kwargs):
            inside.set(); go.wait()
            return create(*args, **kwargs)
        tracker.client.create_run = slow_create
        stage = threading.Thread(target=tracker.start_parent, args=("dedup", {{}}))
        stage.start(); inside.wait()
        threading.Timer(0.5, go.set).start()  # create_run returns while kill_open_runs is under way
        killed = lineage.kill_open_runs()
        stage.join()
        print(len(killed), [r.info.status for r in tracker.client.search_runs([tracker.experiment_id])])
        try:
            tracker.start_parent("late", {{}})
        except RuntimeError as e:
            print(e)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.splitlines() == ["1 ['KILLED']", "interrupted: no new MLflow run"], out.stderr[-3000:]
