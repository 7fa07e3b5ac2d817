"""Several machines on one: agents that share nothing but the servers and an object store.

Starts, on 127.0.0.1, what a team runs on rented machines: an S3-compatible object store (moto's
server), a Prefect server, an MLflow tracking server whose artifacts go to the object store, Prefect
process workers on the `cpu` and `gpu` pools, and a Dask scheduler with two Dask workers. Every
agent (each worker) runs in an empty directory of its own, as its working directory, TMPDIR and
HOME, and imports slmflow from a package installed for the agents (pip, from a copy of this
checkout): no agent reads the checkout or a store directory on local disk; both store roots are
`s3://` URLs and MLflow is an `http://` URL. Then three checks:

- identical: `prefect deployment run slmflow-pipeline/pipeline` on the config (run.execution
  deployments: pretrain, sft and rl on the gpu pool; data stages mapped on the two Dask workers)
  gives every planned output byte for byte as a local run of the same config does (manifest sha256s),
  and writes nothing outside the agents' own directories but through the object store.
- resumed: pretrain forced again through `slmflow-stage/pretrain`; the gpu worker and every process
  under it (its flow run has a session of its own) are killed once a checkpoint is in the object store; a new gpu worker in a new directory resumes from
  that checkpoint (after the killed holder's lease times out) and ends with the same weights.
- computed_once: two flow runs of `slmflow-stage/data`, on two cpu workers, ask for one new key at
  once (dedup with another seed; this process holds the key's lease until both wait for it, so they
  surely race); one computes it, the other waits for its lease and takes the hit.

Besides (under "checks", "deployments"): the pools and schedule `slmflow deploy` made, the README's
commands that resume and pause the nightly schedule, one stage rerun through its stage deployment,
and `slmflow serve` refusing names that deployments already have.

Prints ONE JSON object: {"identical", "resumed", "computed_once", "checks": {...}, "seconds": {...}}.

  python benchmarks/agents.py                      # configs/tiny.yaml; ~5 minutes on 2 cores
  python benchmarks/agents.py --set pretrain.max_steps=60 --keep /tmp/agents
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the Python environment every "machine" here shares (not the checkout)
BUCKET = "slmflow"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "agents", "AWS_SECRET_ACCESS_KEY": "agents", "AWS_DEFAULT_REGION": "us-east-1"}
STAGING = "/run" if os.path.isdir("/run") else "/var/tmp"  # outside every hidden directory (see `Topology.alone`)


def can_isolate() -> bool:
    """Whether agents can get a mount namespace of their own here (root, or CAP_SYS_ADMIN)."""
    probe = ["unshare", "--mount", "--propagation", "private", "sh", "-c", f"mount -t tmpfs tmpfs {STAGING}"]
    return shutil.which("unshare") is not None and subprocess.run(probe, capture_output=True).returncode == 0


ISOLATION = can_isolate()
LEASE_TIMEOUT_S = 8  # a killed holder's key is taken over this long after its last heartbeat
TRAINING = ("pretrain", "sft", "rl", "ref_0", "ref_1", "ref_2")  # tiny.yaml's instances the gpu pool runs
# what the checkout scan leaves out: git's and pytest's own files, and the Python environment (a Prefect
# server writes its UI build into its package on first start; the agents write no bytecode there)
CHECKOUT_SKIP = (".git", ".pytest_cache", "__pycache__", ".venv")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    """Until `url` answers (any status below 500), or fail with the tail of the process's log."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group, SIGKILL after 20 s."""
    if proc.poll() is None:
        with _gone():
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with _gone():
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def descendants(pid: int) -> list[int]:
    """`pid` and every process under it, whatever their process groups and sessions."""
    children: dict[int, list[int]] = {}
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(status.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def kill_machine(proc: subprocess.Popen) -> list[int]:
    """SIGKILL a process and every descendant: Prefect starts each flow run in a session of its own, so
    killing the worker's process group would leave the run going (and ending cleanly when its pipe
    breaks). This is a machine that is gone, all at once. Returns the pids killed."""
    tree = descendants(proc.pid)
    for pid in tree:
        with _gone():
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    return tree


class _gone:
    """Ignore ProcessLookupError (the group already exited)."""

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        return kind is ProcessLookupError


def files_under(root: Path, skip: tuple[str, ...] = ()) -> dict[str, float]:
    """Every file under `root` (relative path -> mtime), leaving out directories named in `skip`."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames:
            path = Path(dirpath, name)
            try:
                found[str(path.relative_to(root))] = path.stat().st_mtime
            except FileNotFoundError:
                continue
    return found


@dataclass
class Topology:
    """The servers and agents of this run, under `base` (one directory per server and per agent)."""

    base: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    site: Path | None = None  # the slmflow package the agents import

    # -- the servers -------------------------------------------------------------------------------
    def start_servers(self) -> None:
        s3, prefect, mlflow, dask = (free_port() for _ in range(4))
        self.urls.update(s3=f"http://127.0.0.1:{s3}", prefect=f"http://127.0.0.1:{prefect}/api",
                         mlflow=f"http://127.0.0.1:{mlflow}", dask=f"tcp://127.0.0.1:{dask}")
        self.spawn("s3", str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3))
        wait_for(self.urls["s3"], self.procs["s3"], self.log("s3"))
        os.environ.update(self.store_env())  # this process reads the store too (the checks)
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        home = self.home("prefect-server")
        self.spawn("prefect-server", str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                   str(prefect), env={"PREFECT_HOME": str(home / ".prefect")})
        self.spawn("mlflow-server", str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow),
                   "--backend-store-uri", f"sqlite:///{self.home('mlflow-server') / 'mlflow.db'}",
                   "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--workers", "1",
                   env={"MLFLOW_S3_ENDPOINT_URL": self.urls["s3"],
                        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # seven job-runner processes, unused
        self.spawn("dask-scheduler", str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(dask),
                   "--no-dashboard")
        wait_for(f"{self.urls['prefect']}/health", self.procs["prefect-server"], self.log("prefect-server"))
        wait_for(f"{self.urls['mlflow']}/health", self.procs["mlflow-server"], self.log("mlflow-server"))

    def store_env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.urls["s3"], **CREDENTIALS}

    def operator_env(self) -> dict[str, str]:
        """The machine a person types on: the two server URLs and the store's credentials."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "SLMFLOW_"))}
        env.update(self.store_env(), PREFECT_API_URL=self.urls["prefect"], MLFLOW_TRACKING_URI=self.urls["mlflow"],
                   PREFECT_SERVER_ANALYTICS_ENABLED="false")
        return env

    # -- the package and the agents --------------------------------------------------------------
    def install_package(self) -> None:
        """slmflow as an agent gets it: `pip install` of the project (from a copy, so the build writes
        nothing into the checkout) into a directory the agents put on their PYTHONPATH."""
        source, self.site = self.base / "package" / "source", self.base / "package" / "site"
        tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "pyproject.toml", "README.md", "flows", "tasks"], cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout.split()
        for name in tracked:
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(self.site), str(source)], cwd=self.base, check=True,
                       env={**os.environ, "TMPDIR": str(self.home("package"))})

    def home(self, name: str) -> Path:
        path = self.base / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log(self, name: str) -> Path:
        return self.home("logs") / f"{name}.log"

    def agent_env(self, home: Path) -> dict[str, str]:
        """An agent machine: its own directory as HOME and TMPDIR, the installed package, the URLs."""
        env = self.operator_env()
        env.update(HOME=str(home), TMPDIR=str(home / "tmp"), PREFECT_HOME=str(home / ".prefect"),
                   PYTHONPATH=str(self.site), PYTHONDONTWRITEBYTECODE="1",  # reads the installed .pyc, writes none
                   PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_LOGGING_EXTRA_LOGGERS="slmflow",
                   SLMFLOW_LEASE_TIMEOUT_S=str(LEASE_TIMEOUT_S))
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        return env

    def spawn(self, name: str, *args: str, env: dict[str, str] | None = None, agent: bool = False) -> subprocess.Popen:
        """A long-running process in its own directory and process group (its children stop with it); an
        agent runs `alone` (as on a machine of its own)."""
        home = self.home(f"agents/{name}" if agent else name)
        full = self.agent_env(home) if agent else {**self.operator_env(), "TMPDIR": str(home), **(env or {})}
        log = open(self.log(name), "w")
        proc = subprocess.Popen(self.alone(home, args) if agent else args, cwd=home, env=full, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def alone(self, home: Path, args: tuple[str, ...] | list[str]) -> list[str]:
        """`args` in a mount namespace of its own, where the temp dir, the checkout and this topology's
        directory are empty but for the agent's own directory, the installed package and the Python
        environment: whatever it reads or writes that is not its own goes through a URL. Needs root (or
        CAP_SYS_ADMIN); without it the agent runs beside the others, as `isolation` then reports."""
        if not ISOLATION:
            return list(args)
        keep = [home, self.site, BIN.parent]  # its own directory, the package, the Python environment
        hide = [Path(tempfile.gettempdir()).resolve(), ROOT, self.base]
        script = ["set -e", f"mount -t tmpfs tmpfs {STAGING}", f"stage={STAGING}/agent"]  # private to it
        for i, path in enumerate(keep):
            script += [f'mkdir -p "$stage/{i}"', f'mount --bind "{path}" "$stage/{i}"']
        script += [f'if [ -d "{path}" ]; then mount -t tmpfs tmpfs "{path}"; fi' for path in hide]
        for i, path in enumerate(keep):
            script += [f'mkdir -p "{path}"', f'mount --bind "$stage/{i}" "{path}"']
        script.append(f'cd "{home}" && exec "$@"')
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script), "agent", *args]

    def start_agents(self) -> None:
        for name in ("dask-1", "dask-2"):
            self.spawn(name, str(BIN / "dask"), "worker", self.urls["dask"], "--nthreads", "1", "--nworkers", "1",
                       "--no-dashboard", "--name", name, "--local-directory", str(self.home(f"agents/{name}") / "dask"),
                       agent=True)
        self.start_worker("cpu-1", "cpu")
        self.start_worker("gpu-1", "gpu")

    def start_worker(self, name: str, pool: str) -> subprocess.Popen:
        return self.spawn(name, str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name", name, agent=True)

    def code_from(self, name: str) -> dict:
        """What agent `name` sees: where it imports slmflow from (the installed package, never the checkout),
        and whether the checkout, the other agents' directories and a local store are out of its sight."""
        home = self.home(f"agents/{name}")
        others = [str(p) for p in self.agent_dirs() if p != home] + [str(self.home("reference"))]
        probe = ("import json, os, flows; "
                 f"print(json.dumps({{'code': flows.__file__, 'sees_checkout': os.path.exists({str(ROOT / 'flows')!r}), "
                 f"'sees_others': [d for d in {others!r} if os.path.isdir(d) and os.listdir(d)]}}))")
        done = subprocess.run(self.alone(home, [sys.executable, "-c", probe]), cwd=home, env=self.agent_env(home),
                              capture_output=True, text=True, check=True)
        return json.loads(done.stdout)

    def agent_dirs(self) -> list[Path]:
        return sorted((self.base / "agents").iterdir())

    # -- what a person types ---------------------------------------------------------------------
    def run(self, *args: str, cwd: Path | None = None, timeout: float = 900) -> str:
        done = subprocess.run(args, cwd=cwd or self.home("operator"), env=self.operator_env(), capture_output=True,
                              text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}")
        return done.stdout

    def api(self, method: str, path: str, **kwargs):
        for _ in range(30):  # 503 while the server's SQLite is busy
            response = httpx.request(method, f"{self.urls['prefect']}{path}", timeout=30, **kwargs)
            if response.status_code != 503:
                break
            time.sleep(1)
        response.raise_for_status()
        return response.json() if response.content else None

    def deployment_run(self, name: str, params: dict, watch: bool = True) -> str:
        """`prefect deployment run NAME --param k=v ... [--watch]`; returns the flow run id."""
        args = [str(BIN / "prefect"), "deployment", "run", name]
        for key, value in params.items():
            args += ["--param", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
        out = self.run(*args, *(["--watch"] if watch else []))
        if watch and "Flow run finished successfully" not in out:
            raise RuntimeError(f"{name}: {out[-3000:]}")
        [flow_run_id] = [line.split("UUID:")[1].strip() for line in out.splitlines() if "UUID:" in line][:1]
        return flow_run_id

    def wait_flow_run(self, flow_run_id: str, timeout_s: float = 600) -> dict:
        deadline = time.monotonic() + timeout_s
        while (run := self.api("GET", f"/flow_runs/{flow_run_id}"))["state"]["type"] not in (
                "COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"flow run {flow_run_id} still {run['state']['type']} after {timeout_s:.0f}s")
            time.sleep(1)
        return run

    def flow_run_logs(self, flow_run_id: str) -> list[str]:
        logs = self.api("POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})
        return [entry["message"] for entry in logs]

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            left = descendants(proc.pid) if proc.poll() is None else []
            stop(proc)
            for pid in left:  # a flow run still going, in a session of its own
                with _gone():
                    os.kill(pid, signal.SIGKILL)


def write_config(source: Path, urls: dict[str, str], overrides: list[str], local: Path | None = None) -> dict:
    """The config as a dict: the agents' (s3:// roots, the MLflow server, the Dask scheduler) or, with
    `local`, the same pipeline on local roots and the default runner (the reference run)."""
    from flows.config import apply_overrides

    raw = apply_overrides(yaml.safe_load(source.read_text()), overrides)
    if local is None:
        raw["run"].update(data_root=f"s3://{BUCKET}/data", models_root=f"s3://{BUCKET}/models",
                          mlflow_uri=urls["mlflow"], experiment="slmflow-agents", runner="dask",
                          dask_address=urls["dask"])
    else:
        raw["run"].update(data_root=str(local / "data"), models_root=str(local / "models"),
                          mlflow_uri=f"sqlite:///{local / 'mlflow.db'}", experiment="slmflow-local", runner="default")
    return raw


def manifests(config: dict) -> dict[str, dict]:
    """Every planned stage's manifest, read through the store API (None where missing)."""
    from flows.config import resolve_config
    from flows.pipeline import make_plan
    from tasks.core.store import Store

    cfg = resolve_config(config)
    plan = make_plan(cfg)
    stores = {"data": Store(cfg.run.data_root), "models": Store(cfg.run.models_root)}
    found = {}
    for name, planned in plan.stages.items():
        art = stores[planned.stage.store].get(planned.stage.name, planned.key)
        found[name] = art.manifest if art else None
    return found


def same_outputs(a: dict[str, dict], b: dict[str, dict]) -> list[str]:
    """Stages whose key or file digests differ between two sets of manifests (or that one lacks)."""
    return sorted(n for n in a.keys() | b.keys()
                  if not a.get(n) or not b.get(n) or (a[n]["key"], a[n]["files"]) != (b[n]["key"], b[n]["files"]))


def dask_tasks_per_worker(address: str) -> dict[str, int]:
    """How many task transitions each Dask worker went through (more than 0: it ran shard tasks)."""
    from distributed import Client

    with Client(address, timeout=30) as client:
        counts = client.run(lambda dask_worker: dask_worker.state.transition_counter)
        names = {addr: info["name"] for addr, info in client.scheduler_info()["workers"].items()}
    return {str(names.get(addr, addr)): n for addr, n in counts.items()}


def seed(reference_config: str | None, config: dict, instances: list[str]) -> None:
    """Copy the reference store's outputs of `instances` into the config's (object) store, manifest last."""
    if not instances:
        return
    from flows.config import load_config, resolve_config
    from flows.pipeline import make_plan

    local, remote = load_config(reference_config), resolve_config(config)
    plan = make_plan(remote)
    for name in instances:
        planned = plan.stages[name]
        roots = [(c.run.models_root if planned.stage.store == "models" else c.run.data_root) for c in (local, remote)]
        source, target = (f"{r.rstrip('/')}/{planned.stage.name}/{planned.key}" for r in roots)
        files = sorted(p for p in Path(source).rglob("*") if p.is_file())
        for path in sorted(files, key=lambda p: p.name == "manifest.json"):  # the manifest commits it
            fsspec.filesystem("s3").put_file(str(path), f"{target}/{path.relative_to(source).as_posix()}")


def check_pipeline(top: Topology, config_url: str, config: dict, reference: dict[str, dict], seeded: list[str]) -> dict:
    """The pipeline through its deployment, on the agents; compared with the reference run."""
    flow_run_id = top.deployment_run("slmflow-pipeline/pipeline", {"config": config_url})
    on_agents = manifests(config)
    deployments = {d["id"]: d["name"] for d in top.api("POST", "/deployments/filter", json={})}
    pools, subflows = {}, {}
    for name, m in on_agents.items():
        if m and m["stage"] in ("pretrain", "sft", "rl") and name not in seeded:
            run = top.api("GET", f"/flow_runs/{m['prefect']['prefect.flow_run_id']}")
            pools[name] = run["work_pool_name"]
            # a subflow of the pipeline run (the Prefect UI nests it), of slmflow-stage/<its family>
            subflows[name] = bool(run["parent_task_run_id"]) and deployments[run["deployment_id"]] == m["stage"]
    return {"flow_run_id": flow_run_id, "different": same_outputs(on_agents, reference),
            "training_pools": pools, "training_subflows": subflows, "dask_tasks": dask_tasks_per_worker(top.urls["dask"]), "manifests": on_agents}


def check_mlflow(top: Topology, config: dict) -> dict:
    """Stage runs, datasets, logged models and the registered model on the tracking server; links absolute."""
    from mlflow import MlflowClient

    client = MlflowClient(top.urls["mlflow"])
    exp = client.get_experiment_by_name(config["run"]["experiment"])
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    stage_runs = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.info.status == "FINISHED"]
    training = [r for r in stage_runs if r.data.tags.get("instance") in TRAINING and r.data.tags.get("cached") == "false"
                and parents and r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id]
    with_datasets = [r for r in stage_runs if r.inputs and r.inputs.dataset_inputs]
    models = client.search_logged_models(experiment_ids=[exp.experiment_id])
    registered = [v for m in client.search_registered_models() for v in (m.latest_versions or [])]
    descriptions = [r.data.tags.get("mlflow.note.content", "") for r in stage_runs]
    linked = [d for d in descriptions if f"{top.urls['mlflow']}/#/experiments/" in d]
    import boto3

    listed = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="mlflow/")
    return {"parents": len(parents), "training_under_parent": len(training), "stage_runs": len(stage_runs), "with_datasets": len(with_datasets), "logged_models": len(models),
            "registered_versions": len(registered), "absolute_links": len(linked),
            "artifacts_in_store": listed.get("KeyCount", 0)}


def check_registered(top: Topology, config_url: str) -> dict:
    """What `slmflow deploy` registered (the pools, each deployment's pool, the paused nightly schedule
    that the README's commands turn on and off again) and `slmflow serve` refusing to take over the names.
    Reads and writes nothing a run uses (the schedule is paused again at once): it goes beside the pipeline."""
    prefect, name = str(BIN / "prefect"), "slmflow-pipeline/pipeline"
    pools = {p["name"]: p for p in top.api("POST", "/work_pools/filter", json={})}
    by_name = {d["name"]: d for d in top.api("POST", "/deployments/filter", json={})}
    [schedule] = by_name["pipeline"]["schedules"]
    listed = schedule["id"] in top.run(prefect, "deployment", "schedule", "ls", name)
    try:
        top.run(prefect, "deployment", "schedule", "resume", name, schedule["id"])
        resumed = top.api("GET", f"/deployments/{by_name['pipeline']['id']}")["schedules"][0]["active"]
    finally:  # no 03:00 run during a benchmark
        top.run(prefect, "deployment", "schedule", "pause", name, schedule["id"])
    paused = not top.api("GET", f"/deployments/{by_name['pipeline']['id']}")["schedules"][0]["active"]
    served = subprocess.run([str(BIN / "slmflow"), "serve", "-c", config_url], cwd=top.home("operator"),
                            env=top.operator_env(), capture_output=True, text=True, timeout=300)
    return {
        "pools": {n: {"type": p["type"], "concurrency_limit": p["concurrency_limit"]} for n, p in pools.items()},
        "deployment_pools": {n: d["work_pool_name"] for n, d in by_name.items()},
        "sft_env": by_name["sft"]["job_variables"].get("env", {}),
        "pipeline_overrides": by_name["pipeline"]["parameters"].get("overrides"),
        "schedule": {"cron": schedule["schedule"]["cron"], "active": schedule["active"], "listed": listed,
                     "resumed": resumed, "paused_again": paused},
        "serve": {"exit": served.returncode, "said": served.stderr.strip().splitlines()[-3:]},
    }


def check_rerun(top: Topology, config_url: str, config: dict) -> dict:
    """A rerun of one stage through its stage deployment (`slmflow-stage/eval`, names=[eval_rl], force):
    the same key and files, a new MLflow run under a parent of its family, nothing else touched."""
    from mlflow import MlflowClient

    before = manifests(config)
    top.deployment_run("slmflow-stage/eval", {"config": config_url, "names": ["eval_rl"], "force": True})
    after = manifests(config)
    rerun = after["eval_rl"]
    client = MlflowClient(top.urls["mlflow"])
    parent = client.get_run(client.get_run(rerun["mlflow_run_id"]).data.tags["mlflow.parentRunId"])
    return {"same_key_and_files": (rerun["key"], rerun["files"]) == (before["eval_rl"]["key"], before["eval_rl"]["files"]),
            "new_mlflow_run": rerun["mlflow_run_id"] != before["eval_rl"]["mlflow_run_id"],
            "others_untouched": [n for n in before if n != "eval_rl" and after[n] != before[n]],
            "parent_family": parent.data.tags.get("family"), "parent_status": parent.info.status,
            "pool": top.api("GET", f"/flow_runs/{rerun['prefect']['prefect.flow_run_id']}")["work_pool_name"]}


def checkpoint_markers(prefix: str) -> list[str]:
    """Checkpoints committed to the object store under a stage key's work prefix (their marker objects)."""
    import boto3

    listed = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []) if "/ckpt-" in o["Key"] and o["Key"].endswith(".done"))


def mark_crashed(top: Topology, flow_run_id: str) -> None:
    """What Prefect cannot know: the flow run's machine is gone (it stays Running and holds the gpu pool's
    one slot otherwise). Prefect's API sets it Crashed; README, "Several machines", says how."""
    top.api("POST", f"/flow_runs/{flow_run_id}/set_state",
            json={"state": {"type": "CRASHED", "message": "its agent was lost"}, "force": True})


def check_resume(top: Topology, config_url: str, config: dict, reference: dict[str, dict]) -> dict:
    """Pretrain forced again on the gpu pool, its worker killed after a checkpoint reached the store, then
    resumed by a new gpu worker in a new directory: the same weights as the uninterrupted run."""
    key = reference["pretrain"]["key"]
    params = {"config": config_url, "names": ["pretrain"], "force": True}
    first = top.deployment_run("slmflow-stage/pretrain", params, watch=False)
    prefix = f"models/pretrain/.work-{key}/"
    deadline = time.monotonic() + 300
    while not checkpoint_markers(prefix):
        state = top.api("GET", f"/flow_runs/{first}")["state"]["type"]
        if state in ("COMPLETED", "FAILED", "CRASHED") or time.monotonic() > deadline:
            raise RuntimeError(f"no checkpoint reached the store before the run ended ({state})")
        time.sleep(0.1)
    killed_at = checkpoint_markers(prefix)
    killed = kill_machine(top.procs["gpu-1"])  # the machine is gone: worker, flow run and all
    mark_crashed(top, first)
    top.start_worker("gpu-2", "gpu")  # a new machine: a new, empty directory
    second = top.deployment_run("slmflow-stage/pretrain", params)
    after = manifests(config)["pretrain"]
    logs = top.flow_run_logs(second)
    resumed = [m for m in logs if "resum" in m.lower()]
    return {"killed_after": killed_at, "killed_processes": len(killed), "resume_lines": resumed,
            "took_over": [m for m in logs if "took over the lease" in m],
            "same_weights": after["files"] == reference["pretrain"]["files"],
            "work_left": checkpoint_markers(prefix)}


def check_computed_once(top: Topology, config_url: str, config: dict) -> dict:
    """Two flow runs on two cpu workers ask for one new key (dedup with another seed). This process holds
    the key's lease until both say they wait for it (however their start-up times differ), then lets
    go: one computes the key, the other waits on and takes the cache hit."""
    from mlflow import MlflowClient

    from flows.config import resolve_config
    from flows.pipeline import make_plan
    from tasks.core.store import Store

    top.start_worker("cpu-2", "cpu")
    overrides = ["dedup.seed=1234"]
    key = make_plan(resolve_config(config, overrides)).stages["dedup"].key
    gate = Store(config["run"]["data_root"]).lock("dedup", key)
    gate.acquire()
    try:
        params = {"config": config_url, "names": ["dedup"], "overrides": overrides}
        runs = [top.deployment_run("slmflow-stage/data", params, watch=False) for _ in range(2)]
        deadline = time.monotonic() + 300
        while (waited := sum(any("waiting for another run computing" in m for m in top.flow_run_logs(r))
                             for r in runs)) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("the two dedup runs did not both wait for the key's lease within 300 s")
            time.sleep(1)
    finally:
        gate.release()
    states = [top.wait_flow_run(r)["state"]["type"] for r in runs]
    client = MlflowClient(top.urls["mlflow"])
    exp = client.get_experiment_by_name(config["run"]["experiment"])
    dedup = [r for r in client.search_runs([exp.experiment_id], "tags.instance = 'dedup'", max_results=100)
             if r.data.tags.get("prefect.flow_run_id") in runs]
    return {"states": states, "computed": sum(r.data.tags.get("cached") == "false" for r in dedup),
            "hits": sum(r.data.tags.get("cached") == "true" for r in dedup), "waited": waited}


def reference_run(top: Topology, config: dict) -> dict[str, dict]:
    """The same pipeline on local roots, the default runner and a local MLflow file: `slmflow run`."""
    local = top.home("reference")
    path = local / "reference.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    done = subprocess.run([str(BIN / "slmflow"), "run", "-c", str(path)], cwd=local, env=top.operator_env(),
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"reference run exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    return manifests(config)


def main(argv: list[str] | None = None) -> dict:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped: stop the servers and agents too (finally)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="stage.field=value")
    parser.add_argument("--reference", help="a local run's config (YAML) whose store holds the same pipeline: skips the reference run")
    parser.add_argument("--seed", nargs="*", default=[], metavar="INSTANCE",
                        help="copy these outputs (e.g. ref_0 ref_1 ref_2) from --reference's store into the object "
                             "store first: the run takes them as cache hits (a shorter run for the tests)")
    parser.add_argument("--keep", help="work in this directory and keep it (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    base = Path(args.keep or tempfile.mkdtemp(prefix="slmflow-agents-"))
    base.mkdir(parents=True, exist_ok=True)
    checkout_before = files_under(ROOT, skip=CHECKOUT_SKIP)
    began = time.monotonic()
    top, seconds, checks = Topology(base), {}, {}

    @contextlib.contextmanager
    def timed(phase: str):
        start = time.monotonic()
        yield
        seconds[phase] = time.monotonic() - start

    try:
        with timed("servers"):
            top.start_servers()
        with timed("install"):
            top.install_package()
        with timed("deploy"):
            top.run(str(BIN / "slmflow"), "deploy", cwd=ROOT)  # pools and deployments, from the operator's checkout
        with timed("agents"):
            top.start_agents()
        config = write_config(Path(args.config), top.urls, args.overrides)
        config_url = f"s3://{BUCKET}/configs/agents.yaml"
        with fsspec.open(config_url, "w") as f:  # the workers read the config from the store
            f.write(yaml.safe_dump(config, sort_keys=False))
        with timed("reference"):
            if args.reference:
                from flows.config import load_config

                reference = manifests(load_config(args.reference).model_dump(mode="json"))
            else:
                reference = reference_run(top, write_config(Path(args.config), top.urls, args.overrides, base / "reference"))
            seed(args.reference, config, args.seed)
        with timed("pipeline"), ThreadPoolExecutor(1) as beside:
            registered = beside.submit(check_registered, top, config_url)
            checks["pipeline"] = check_pipeline(top, config_url, config, reference, args.seed)
            checks["deployments"] = registered.result()
        with timed("checks"):
            checks["mlflow"] = check_mlflow(top, config)
            checks["checkout_written"] = sorted(
                n for n, mtime in files_under(ROOT, skip=CHECKOUT_SKIP).items()
                if checkout_before.get(n) != mtime)
            checks["outside_agents"] = sorted(p.name for p in base.iterdir() if p.name not in (
                "agents", "logs", "operator", "package", "reference", "s3", "prefect-server", "mlflow-server",
                "dask-scheduler"))
            checks["isolation"] = "mount namespaces" if ISOLATION else "none (needs root or CAP_SYS_ADMIN)"
            checks["agents"] = {p.name: top.code_from(p.name) for p in top.agent_dirs()}
        with timed("rerun"):  # after check_mlflow: the rerun adds a parent run
            checks["deployments"]["rerun"] = check_rerun(top, config_url, config)
        with timed("resume_and_computed_once"), ThreadPoolExecutor(2) as pool:  # a gpu and a cpu matter: side by side
            resume = pool.submit(check_resume, top, config_url, config, reference)
            once = pool.submit(check_computed_once, top, config_url, config)
            checks["resume"], checks["computed_once"] = resume.result(), once.result()
    finally:
        with timed("stop"):
            top.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    p, r, c = checks["pipeline"], checks["resume"], checks["computed_once"]
    result = {
        "identical": not p["different"] and not checks["checkout_written"] and not checks["outside_agents"]
        and set(p["training_pools"]) == set(TRAINING) - set(args.seed)
        and set(p["training_pools"].values()) == {"gpu"} and all(p["training_subflows"].values()) and all(n > 0 for n in p["dask_tasks"].values())
        and len(p["dask_tasks"]) == 2
        and all(Path(a["code"]).is_relative_to(base / "package") for a in checks["agents"].values())
        # out of sight where agents can have a namespace of their own (`isolation` says which)
        and (not ISOLATION or not any(a["sees_checkout"] or a["sees_others"] for a in checks["agents"].values())),
        "resumed": r["same_weights"] and bool(r["resume_lines"]) and bool(r["took_over"]) and not r["work_left"],
        "computed_once": c["computed"] == 1 and c["hits"] == 1 and c["waited"] == 2 and c["states"] == ["COMPLETED"] * 2,
        "checks": checks,
        "seconds": {"total": round(time.monotonic() - began, 1), **{k: round(v, 1) for k, v in seconds.items()}},
    }
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2, default=str))
