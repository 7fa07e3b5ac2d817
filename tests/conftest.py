"""Shared fixtures: one Prefect test server per session, a fresh store + MLflow DB per test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading

# One torch (OpenMP) thread for the whole session, in-process and in every subprocess it starts (`slmflow
# run`, Prefect workers and their flow runs, the benchmarks): on a 2-core machine a second thread only
# spin-waits whenever anything else wants a core (the Prefect server, a second run, a worker): beside one
# busy process, 60 tiny training steps took 6-16 s on two threads and 2.5 s on one, and `slmflow run` of
# tiny.yaml beside other work 9.5 min instead of 1.8. Its 26 outputs are the same bytes either way;
# one setting everywhere keeps the byte-for-byte comparisons between processes like for like. Set before
# torch is imported; a value from the environment wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The session's Prefect server takes every run's log lines otherwise (it used 60 CPU seconds, the most
# of any process in the session): no test here reads them from it; the server that does get them is the
# agents' own (its environment leaves out this session's PREFECT_ settings).
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from flows.prefect_server import apply_defaults  # noqa: E402

apply_defaults()  # as the CLI does, before Prefect is imported (stages also run outside a flow here)

# Prefect binds its console log handler to sys.stderr when it sets up logging. The CLI imports it only
# inside `slmflow run`; under CliRunner that stderr is a buffer closed after the call, and every later
# Prefect log line would fail against it. Set it up here, bound to the real stderr.
from prefect.logging.configuration import setup_logging  # noqa: E402

setup_logging()

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def prefect_server():
    """A temporary Prefect API on 127.0.0.1 (its own SQLite database), stopped at the end."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()  # the CLI (`slmflow run` in-process) uses it too
        yield
        del os.environ["PREFECT_API_URL"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: a second thread only adds sync cost (and spins badly on a busy machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# One-digit +/- (the default task before 2026-12-07): short prompts and answers of one to three tokens,
# what the rollout, RL-loop and difficulty tests were written around
ONE_DIGIT_ARITHMETIC = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+", "-"],
                        "allow_parentheses": False, "allow_negation": False}


def chat_tokenizer(rows: list[dict]):
    """A small byte-level BPE (the tokenizer stage's, 320 tokens) trained on prompt rows in the chat format."""
    from tokenizers import pre_tokenizers, trainers

    from tasks.core import chat
    from tasks.tokenizer import TokenizerConfig, new_tokenizer

    t = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=320, min_frequency=2, special_tokens=TokenizerConfig().special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    t.train_from_iterator([r["question"] + "\n" + chat.completion_text(r["answer"]) for r in rows] * 4, trainer)
    return t


# tiny.yaml's training, shortened, for the tests of mechanics rather than of learning (byte-identical
# outputs across stores and execution modes, one computation per key under concurrent runs, kills and
# resumes): every stage still runs, pretrain and rl still checkpoint before they end (so a kill after the
# first checkpoint resumes), and the data stages keep tiny.yaml's keys. SFT keeps 100 of its 300 steps:
# from that model RL's balanced filter keeps 31-37% of the groups at every step, so every RL step updates
# the policy (after 20 SFT steps it kept none, and RL's weights would have been SFT's). The checks of
# learning (test_pretrain, test_plasticity) read `tiny_run`, trained to tiny.yaml's full length.
QUICK = {"pretrain": {"max_steps": 60, "eval_every": 60, "checkpoint_every": 20},
         "sft": {"max_steps": 100, "eval_every": 100, "checkpoint_every": 50},
         "rl": {"max_steps": 4, "eval_every": 4, "checkpoint_every": 2}}
QUICK_SETS = [f"--set={section}.{k}={v}" for section, values in QUICK.items() for k, v in values.items()]  # the benchmarks'


def tiny_config(root: Path, *, training: dict | None = None, **run) -> Path:
    """configs/tiny.yaml with its store and MLflow SQLite file under `root` (and `run` settings; `training`:
    settings per section over tiny.yaml's, e.g. QUICK)."""
    raw = yaml.safe_load(TINY.read_text())
    raw["run"].update({"data_root": str(root / "data"), "models_root": str(root / "models"),
                       "mlflow_uri": f"sqlite:///{root / 'mlflow.db'}", **run})
    for section, settings in (training or {}).items():
        raw[section].update(settings)
    root.mkdir(parents=True, exist_ok=True)
    (root / "tiny.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    if raw["run"]["mlflow_uri"] == f"sqlite:///{root / 'mlflow.db'}" and not (root / "mlflow.db").exists():
        shutil.copyfile(empty_mlflow_store(), root / "mlflow.db")
    return root / "tiny.yaml"


# where the session's empty MLflow store lies (its subprocesses read the variable, so they share it)
if "SLMFLOW_TESTS_MLFLOW_STORE" not in os.environ:
    STORE_DIR = Path(tempfile.mkdtemp(prefix="slmflow-tests-"))  # removed at the session's end
    os.environ["SLMFLOW_TESTS_MLFLOW_STORE"] = str(STORE_DIR / "mlflow.db")


def pytest_sessionfinish(session):
    if "STORE_DIR" in globals():
        shutil.rmtree(STORE_DIR, ignore_errors=True)


def empty_mlflow_store() -> Path:
    """An MLflow SQLite store as MLflow creates it, made once for the session: a new store otherwise runs
    MLflow's schema migrations again (2 CPU-seconds each, for each of the ~30 stores the tests make). Runs
    that create their store themselves remain (the benchmarks', the agents')."""
    path = Path(os.environ["SLMFLOW_TESTS_MLFLOW_STORE"])
    if not path.exists():
        from mlflow import MlflowClient

        made = path.with_name(f"made-{os.getpid()}.db")  # two processes may make it at once: the last one stays
        MlflowClient(f"sqlite:///{made}").search_experiments()
        os.replace(made, path)
    return path


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A working directory with tiny.yaml pointed at a store and an MLflow SQLite file inside it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tiny_config(tmp_path)
    return tmp_path


TESTS = Path(__file__).resolve().parent


class Early:
    """A test's subprocesses, run in the background from the start of the session (see `early`); the test
    waits for them. Each one's stdout goes to a file (and its stderr too, or to a file of its own:
    `stderr_apart`)."""

    def __init__(self, root: Path, args: list[str], env: dict[str, str], cwd: Path, count: int = 1,
                 stderr_apart: bool = False, after: Early | None = None):
        self.root, self.args, self.env, self.cwd, self.stderr_apart = root, args, env, cwd, stderr_apart
        self.after = after  # a job whose outputs this one reads: it starts once that one has ended
        self.files = [(root / f"stdout-{i}.txt", root / f"stderr-{i}.txt") for i in range(count)]
        self.procs: list[subprocess.Popen] = []
        self.ended, self.lock, self.stopped, self.error = threading.Event(), threading.Lock(), False, None

    def run(self) -> None:
        """Start the processes and wait for them all (on the background thread)."""
        if self.after:
            self.after.ended.wait()
        if self.error:  # it could not even be set up
            self.ended.set()
            return
        try:
            for out, err in self.files:
                with self.lock, open(out, "w") as o, open(err, "w") as e:
                    if self.stopped:
                        return
                    self.procs.append(subprocess.Popen(self.args, cwd=self.cwd, env=self.env, stdout=o,
                                                       stderr=e if self.stderr_apart else subprocess.STDOUT))
            for p in self.procs:
                p.wait()
        except BaseException as e:  # noqa: BLE001 - the test that waits for this job reports it
            self.error = e
        finally:
            self.ended.set()

    def wait(self, timeout: float) -> list[tuple[int, str, str]]:
        """(exit code, stdout, stderr) per process, once each has ended."""
        if not self.ended.wait(timeout):
            self.stop()
            raise TimeoutError(f"{self.args} did not end within {timeout} s")
        if self.error:
            raise self.error
        return [(p.returncode, out.read_text(), err.read_text()) for p, (out, err) in zip(self.procs, self.files)]

    def result(self, timeout: float):
        """What a `python_job` function wrote (JSON), once it has ended; its stderr's end if it failed."""
        [(code, _, stderr)] = self.wait(timeout)
        assert code == 0, stderr[-3000:]
        return json.loads((self.root / "result.json").read_text())

    def check(self, label: str, timeout: float = 3600) -> None:
        """Fail the calling test with the traceback of this `checks_job`'s check `label`, if it raised."""
        failed = self.result(timeout)[label]
        if failed:
            pytest.fail(failed, pytrace=False)

    def stop(self) -> None:
        """SIGTERM (a benchmark then stops the servers it started), SIGKILL after 30 s."""
        with self.lock:
            self.stopped = True
            for p in self.procs:
                if p.poll() is None:
                    p.terminate()
            for p in self.procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()


def python_job(root: Path, module: str, function: str, *, after: Early | None = None, **kwargs) -> Early:
    """`module.function(out=<root>/result.json, **kwargs)` of tests/ in a Python process of its own, with
    this session's environment (its Prefect server included), in `root` as its working directory (what a
    run writes there, such as a remote store's run records, stays out of the checkout)."""
    kwargs = {"out": str(root / "result.json"), **kwargs}
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import {module}; {module}.{function}(**{kwargs!r})"
    return Early(root, [sys.executable, "-c", code], dict(os.environ), root, stderr_apart=True, after=after)


def checks_job(root: Path, module: str, checks: dict[str, tuple[str, dict]], after: Early | None = None) -> Early:
    """Checks of a test module that only drive subprocesses (signals to `slmflow run`, say), run in the
    background by `run_checks`: label -> (function of `module`, its keyword arguments). The module's
    tests each wait for theirs (`Early.check`): the session's own process does not sit waiting on them."""
    return python_job(root, "conftest", "run_checks", after=after, test_module=module, checks=checks)


def run_checks(out: str, test_module: str, checks: dict[str, tuple[str, dict]]) -> None:
    """`checks_job`'s process: each check in turn; to `out`, per label, None or the traceback it raised."""
    import importlib
    import traceback

    found = {}
    for label, (function, kwargs) in checks.items():
        try:
            getattr(importlib.import_module(test_module), function)(**kwargs)
            found[label] = None
        except Exception:  # noqa: BLE001 - the test waiting for this check fails with it
            found[label] = traceback.format_exc()
    write_json(out, found)


def write_json(out: str, value) -> None:
    Path(out).write_text(json.dumps(value, default=str))


def run_pipeline(out: str, config: str, upstream_from: str | None = None) -> None:
    """The pipeline on `config`, in this process; its result to `out` (`quick_run`, `tiny_run`). With
    `upstream_from`, the outputs up to pack come from the store under that directory (the same keys)."""
    from flows.pipeline import pipeline

    if upstream_from:
        copy_outputs(Path(upstream_from), Path(config), ["pack"])
    write_json(out, pipeline(config))


# benchmarks/faults.py's cases that tests/test_faults.py runs
FAULTS_CASES = ("cached_parquet_flipped", "source_gzip_truncated")


# what makes a test slow: a session run it waits for, or servers and `slmflow run`s of its own
SLOW_FIXTURES = {"quick_run", "tiny_run"}  # and `early` asked for by name (it is autouse)
SLOW_MODULES = {"test_agents", "test_deployments", "test_interrupt", "test_remote_dask", "test_remote_resume"}
# `early`'s two lanes, each job after the one before it, and the order the jobs are ready in (about)
LANES = (("two_runs", "quick_run", "tiny_run", "agents"), ("faults", "interrupt", "s3", "chaos"))
READY = ("two_runs", "quick_run", "faults", "tiny_run", "interrupt", "s3", "agents", "chaos")
WAITS_FOR = {"test_faults": "faults", "test_interrupt": "interrupt", "test_object_store": "s3",
             "test_reliability": "chaos", "test_agents": "agents"}  # the last job a module's tests wait for


def pytest_collection_modifyitems(items):
    """The test modules that wait for the session's background work go after those that do not, which run
    meanwhile instead of waiting behind it, and in the order their jobs are ready: first the tests of no
    fixture of `early`'s, then those of `quick_run` (about a minute in), `tiny_run`, ..., last those of
    the agents' topology (test_agents.py)."""
    def waits(item) -> int:
        jobs = [n for n in ("quick_run", "tiny_run") if n in item.fixturenames]
        jobs += [WAITS_FOR[item.module.__name__]] if item.module.__name__ in WAITS_FOR else []
        return max((1 + READY.index(n) for n in jobs), default=0)
    for item in items:  # `pytest -m "not slow"` leaves them out
        if (SLOW_FIXTURES & set(item.fixturenames) or "early" in item._fixtureinfo.argnames
                or item.module.__name__ in SLOW_MODULES):
            item.add_marker(pytest.mark.slow)
    module = {}  # a module's tests stay together (its module fixtures start once): they go as its last one
    for item in items:
        module[item.module.__name__] = max(module.get(item.module.__name__, 0), waits(item))
    items.sort(key=lambda item: module[item.module.__name__])


@pytest.fixture(scope="session", autouse=True)
def early(request, tmp_path_factory) -> dict[str, Early]:
    """Slow work that is only subprocesses and needs nothing from the tests before it: the pipeline runs
    (`quick_run`, `tiny_run` from its data), the agents' topology (benchmarks/agents.py, which compares
    with quick_run), the faults benchmark's cases, two concurrent runs, the S3 run, the chaos run and the
    signals to `slmflow run` (`checks_job`), on two background lanes. They start with the session, and
    each test then waits for its own and checks what it checked before. A session's tests keep about
    one core of this 2-core machine busy (one torch thread, above): this work fills the other one
    instead of running after everything else. Only for tests that will run; each subprocess sees this
    session's environment (its Prefect server, as the tests' own runs did)."""
    items = request.session.items
    names = {item.nodeid for item in items}
    jobs: dict[str, Early] = {}

    def add(name: str, make) -> None:
        """jobs[name] = make(); where that fails, the test that waits for it fails with the error, not the session."""
        try:
            jobs[name] = make()
        except Exception as e:  # noqa: BLE001
            jobs[name] = Early(TESTS, [], {}, TESTS, count=0)
            jobs[name].error = e

    def quick_job():
        request.getfixturevalue("prefect_server")
        root = tmp_path_factory.mktemp("quick_run")
        return python_job(root, "conftest", "run_pipeline", config=str(quick_config(root)))

    def tiny_job():
        request.getfixturevalue("prefect_server")
        root = tmp_path_factory.mktemp("tiny_run")
        return python_job(root, "conftest", "run_pipeline", after=jobs["quick_run"], config=str(tiny_config(root)),
                          upstream_from=str(jobs["quick_run"].root))

    def agents_job():
        """benchmarks/agents.py with quick_run (the lane's job before it) as its reference run."""
        quick = jobs["quick_run"].root / "tiny.yaml"
        return Early(tmp_path_factory.mktemp("agents"), [sys.executable, str(ROOT / "benchmarks" / "agents.py"),
                                                          "--reference", str(quick), *QUICK_SETS,
                                                          "--seed", "ref_0", "ref_1", "ref_2"],
                     dict(os.environ), ROOT, stderr_apart=True, after=jobs["quick_run"])

    def faults_job():
        request.getfixturevalue("prefect_server")
        root = tmp_path_factory.mktemp("faults_benchmark")
        return Early(root, [sys.executable, str(ROOT / "benchmarks" / "faults.py"), "--workdir", str(root),
                            "--cases", *FAULTS_CASES, *QUICK_SETS], dict(os.environ), Path.cwd(), stderr_apart=True)

    def two_runs_job():
        root = tmp_path_factory.mktemp("two_concurrent_runs")
        env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
        env["PREFECT_HOME"] = str(root / "prefect-home")
        return Early(root, [str(Path(sys.executable).with_name("slmflow")), "run", "-c", str(quick_config(root))],
                     env, root, count=2)

    def s3_job():
        request.getfixturevalue("prefect_server")
        root = tmp_path_factory.mktemp("s3")
        return python_job(root, "test_object_store", "run_on_s3", config=str(
            quick_config(root, data_root="s3://slmflow/data", models_root="s3://slmflow/models")))

    def chaos_job():
        request.getfixturevalue("prefect_server")
        root = tmp_path_factory.mktemp("chaos")
        return python_job(root, "test_reliability", "chaos_run", workdir=str(root / "chaos"),
                          config=str(quick_config(root / "chaos", experiment="slmflow-chaos")))

    def interrupt_job():
        """tests/test_interrupt.py's signals to `slmflow run`: one Prefect home for them all (the first run
        creates its database, the later ones reuse it), a directory each."""
        request.getfixturevalue("prefect_server")
        root = tmp_path_factory.mktemp("interrupt")
        home = {"prefect_home": str(root / "prefect-home")}
        checks = {"ctrl_c_mid_pretrain_stops_at_once_and_the_rerun_resumes": {"quick_root": str(jobs["quick_run"].root)},
                  "a_signal_to_the_process_alone_stops_it_and_its_server[SIGTERM]": {"sig": "SIGTERM"},
                  "a_signal_to_the_process_alone_stops_it_and_its_server[SIGINT]": {"sig": "SIGINT"},
                  "the_server_dies_with_a_run_killed_alone": {},
                  "a_run_being_created_when_the_signal_comes_ends_killed": {}}
        return checks_job(root, "test_interrupt", {
            label: (label.split("[")[0], {"root": str(root / label.replace("[", "-").rstrip("]")), **home, **kwargs})
            for label, kwargs in checks.items()}, after=jobs["quick_run"])

    def lane(names: list[str]) -> None:
        for name in names:
            if name not in jobs:
                built.wait()
            if name in jobs:
                jobs[name].run()

    # Two lanes beside the session's own tests: a third made every process slower (1 050 CPU-seconds
    # instead of 870 for the same work), as the machine then has more to run than cores. They start
    # with the job that needs no session server (its runs start their own), while that server starts.
    built = threading.Event()
    if "tests/test_reliability.py::test_two_concurrent_runs_compute_each_stage_once" in names:
        add("two_runs", two_runs_job)
    for lane_names in LANES:
        threading.Thread(target=lane, args=(lane_names,), name="early-tests", daemon=True).start()
    tiny = any("tiny_run" in item.fixturenames for item in items)
    interrupt = any(item.nodeid.startswith("tests/test_interrupt.py::") and "early" in item._fixtureinfo.argnames
                    for item in items)
    try:
        if (tiny or interrupt or any("quick_run" in item.fixturenames for item in items)
                or any(n.startswith("tests/test_agents.py::") for n in names)):
            add("quick_run", quick_job)
        if tiny:
            add("tiny_run", tiny_job)
        if any(n.startswith("tests/test_agents.py::") for n in names):
            add("agents", agents_job)
        if "tests/test_faults.py::test_faults_benchmark_fast_cases" in names:
            add("faults", faults_job)
        if "tests/test_object_store.py::test_tiny_pipeline_on_s3_matches_the_local_run" in names:
            add("s3", s3_job)
        if "tests/test_reliability.py::test_chaos_kills_at_four_moments_then_matches_a_clean_run" in names:
            add("chaos", chaos_job)
        if interrupt:
            add("interrupt", interrupt_job)
    finally:
        built.set()
    try:
        yield jobs
    finally:
        for job in jobs.values():
            job.stop()


@pytest.fixture(scope="session")
def tiny_run(early) -> tuple[Path, dict]:
    """The whole tiny pipeline at tiny.yaml's full training length, for the checks of learning (pretrain
    below the unigram entropy, SFT above the base, RL's reward rising): (root, pipeline result). Its data
    stages and references are quick_run's outputs, copied (the same keys): it computes the training
    stages and what reads them, once per session, in `early`'s first lane. Shared read-only."""
    job = early["tiny_run"]
    return job.root, job.result(timeout=3600)


def quick_config(root: Path, **run) -> Path:
    """tiny_config with QUICK's shorter training."""
    return tiny_config(root, training=QUICK, **run)


def copy_outputs(source: Path, config: Path, upto: list[str]) -> None:
    """Copy `upto` and everything upstream of it from the store under `source` (tiny_config's layout)
    into the stores `config` names: those stages are then cache hits there, under the same keys."""
    from flows.config import load_config
    from flows.pipeline import make_plan

    cfg = load_config(config)
    plan = make_plan(cfg)
    for name in plan.needed(upto):
        p = plan.stages[name]
        target = Path(cfg.run.models_root if p.stage.store == "models" else cfg.run.data_root) / p.stage.name / p.key
        if not target.exists():
            shutil.copytree(source / p.stage.store / p.stage.name / p.key, target)


@pytest.fixture(scope="session")
def quick_run(early) -> tuple[Path, dict]:
    """The whole pipeline on quick_config, once per session, into its own store: (root, pipeline result).
    Computed by `early` from the start of the session (`run_pipeline` in a process of its own). Shared
    read-only: tests rerun it (all cache hits) and put new settings' outputs in stores of their own."""
    job = early["quick_run"]
    return job.root, job.result(timeout=3600)
