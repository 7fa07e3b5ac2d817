"""Chaos benchmark: SIGKILL `slmflow run` of the tiny pipeline at random moments, rerun, compare.

Each trial runs `slmflow run` on configs/tiny.yaml in a fresh store, as a user would (its own
process group, Prefect's temporary server included), and kills the whole group with SIGKILL at a
random moment inside one stage kind, taken in turn so that every kind is hit:

  data      a random data stage while it writes its output (ingest ... pack, the PreSelect scorer)
  pretrain, sft, rl   the training stage mid-run, after its first checkpoint
  eval      a random eval or difficulty stage while it writes
  report    after the last stage committed, while the report card is made

Then it reruns the same command to completion and compares with a clean reference run: every
stage's files (manifest sha256 digests, weights included) must be identical, a training stage
killed mid-run must have resumed from its checkpoint, and nothing may be left behind (hidden
scratch, work or lock entries in the store, or a process of the killed group).

Prints ONE JSON object: {"trials", "survived", "kinds_hit", "stages_hit", "resumed", "identical",
"leftovers", "missed", "seconds", "failures"}.

  python benchmarks/chaos.py --trials 20            # about a minute per trial on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from flows.config import load_config  # noqa: E402
from flows.pipeline import Plan, make_plan  # noqa: E402
from tasks.core.store import MANIFEST, Store  # noqa: E402

KINDS = ("data", "pretrain", "sft", "rl", "eval", "report")
SLMFLOW = str(Path(sys.executable).with_name("slmflow"))


def tiny_config(root: Path, experiment: str = "slmflow-chaos") -> Path:
    """configs/tiny.yaml with its store and MLflow database under `root`."""
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["run"].update(data_root=str(root / "data"), models_root=str(root / "models"),
                      mlflow_uri=f"sqlite:///{root / 'mlflow.db'}", experiment=experiment)
    root.mkdir(parents=True, exist_ok=True)
    (root / "tiny.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root / "tiny.yaml"


@dataclass
class Kill:
    """Where one kill landed: the target, what was running at that moment, and whether a training
    target had a checkpoint to resume from."""

    kind: str
    target: str
    hit: list[str] = field(default_factory=list)
    checkpointed: bool = False
    missed: bool = False  # the run finished before the moment came
    survivors: list[int] = field(default_factory=list)  # live processes of the killed group


class ChaosRun:
    """One store and config: start `slmflow run`, kill it at a chosen moment, finish it, compare."""

    def __init__(self, root: Path, env: dict[str, str] | None = None, config: Path | None = None):
        self.root = root
        self.config = config or tiny_config(root)  # `config`: an existing store's, e.g. a reference
        cfg = load_config(self.config)
        self.plan: Plan = make_plan(cfg)
        self.stores = {"data": Store(cfg.run.data_root), "models": Store(cfg.run.models_root)}
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.runs = 0

    def _dir(self, name: str) -> Path:
        planned = self.plan.stages[name]
        return self.stores[planned.stage.store].local_path / planned.stage.name

    def _writing(self, name: str) -> bool:
        return any(self._dir(name).glob(f".tmp-{self.plan.stages[name].key}-*"))

    def _checkpointed(self, name: str) -> bool:
        return any((self._dir(name) / f".work-{self.plan.stages[name].key}").glob("ckpt-*"))

    def done(self, name: str) -> bool:
        return (self._dir(name) / self.plan.stages[name].key / MANIFEST).exists()

    def running(self) -> list[str]:
        return [n for n in self.plan.stages if self._writing(n)]

    def start(self) -> subprocess.Popen:
        self.runs += 1
        log = open(self.root / f"run-{self.runs}.log", "wb")
        return subprocess.Popen([SLMFLOW, "run", "-c", str(self.config)], cwd=self.root, env=self.env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def moment(self, kind: str, target: str):
        """The condition that opens the kill window for a target."""
        if kind == "report":
            return lambda: self.done(target)
        if kind in ("pretrain", "sft", "rl"):
            return lambda: self._checkpointed(target)
        return lambda: self._writing(target)

    def kill_during(self, kind: str, target: str, delay_s: float, timeout_s: float = 600) -> Kill:
        """Start a run, wait for the target's moment, wait `delay_s` more, SIGKILL the whole group."""
        kill = Kill(kind, target)
        proc = self.start()
        ready, deadline = self.moment(kind, target), time.monotonic() + timeout_s
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                kill.missed = True
                break
            time.sleep(0.01)
        if not kill.missed:
            time.sleep(delay_s)
            # nothing writing at that moment: the report, or the gap between two stages
            kill.hit = self.running() or ([kind if kind == "report" else "between stages"] if proc.poll() is None else [])
            kill.checkpointed = kind in ("pretrain", "sft", "rl") and target in kill.hit
        with_group(proc.pid, signal.SIGKILL)
        proc.wait()
        kill.survivors = group_members(proc.pid)
        return kill

    def finish(self, timeout_s: float = 900) -> int:
        proc = self.start()
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with_group(proc.pid, signal.SIGKILL)
            return -1

    def files(self) -> dict[str, dict]:
        """Every instance's manifest digests (None where the store has no intact output)."""
        out = {}
        for name, planned in self.plan.stages.items():
            art = self.stores[planned.stage.store].get(planned.stage.name, planned.key)
            out[name] = art.manifest["files"] if art else None
        return out

    def resumed(self, name: str) -> bool:
        art = self.stores[self.plan.stages[name].stage.store].get(self.plan.stages[name].stage.name,
                                                                   self.plan.stages[name].key)
        return bool(art and art.manifest["metrics"].get("resumed_from_step", 0) > 0)

    def leftovers(self) -> list[str]:
        found = [f"{store.root}/{stage}/{name}" for store in self.stores.values() for stage, name in store.hidden()]
        runs = self.stores["data"].local_path / "runs"
        return found + [str(p) for p in runs.glob(".tmp-*")] if runs.exists() else found


def with_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def group_members(pgid: int, wait_s: float = 5.0) -> list[int]:
    """Live (not zombie) processes of a process group, after giving a killed group `wait_s` to go."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(stat.parent.name))
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def targets(plan: Plan, kind: str) -> list[str]:
    if kind == "data":
        return [n for n, p in plan.stages.items() if p.stage.family == "data"]
    if kind == "eval":
        return [n for n, p in plan.stages.items() if p.stage.family == "eval"]
    if kind == "report":
        return [list(plan.stages)[-1]]
    return [kind]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="slmflow-chaos-"))
    env = {"PREFECT_HOME": str(work / "prefect-home")}
    start = time.monotonic()

    reference = ChaosRun(work / "reference", env)
    if reference.finish() != 0:
        raise SystemExit(f"the clean reference run failed: see {reference.root}/run-1.log")
    expected = reference.files()

    schedule: list[str] = []
    while len(schedule) < args.trials:
        schedule += rng.sample(KINDS, len(KINDS))  # every kind once per round, in random order
    result = {"trials": args.trials, "survived": 0, "kinds_hit": {}, "stages_hit": {}, "resumed": 0,
              "resumable": 0, "identical": 0, "leftovers": 0, "missed": 0, "failures": []}
    for trial, kind in enumerate(schedule[: args.trials]):
        run = ChaosRun(work / f"trial-{trial:02d}", env)
        target = rng.choice(targets(run.plan, kind))
        delay = 0.0 if kind == "report" else rng.uniform(0, 0.3)
        kill = run.kill_during(kind, target, delay)
        rc = run.finish()
        problems = []
        if kill.missed:
            result["missed"] += 1
        for name in kill.hit:
            result["stages_hit"][name] = result["stages_hit"].get(name, 0) + 1
        if kill.hit:
            result["kinds_hit"][kind] = result["kinds_hit"].get(kind, 0) + 1
        if rc != 0:
            problems.append(f"rerun exited {rc} (see {run.root}/run-2.log)")
        got = run.files()
        differ = [n for n in expected if got.get(n) != expected[n]]
        if differ:
            problems.append(f"outputs differ from the reference: {', '.join(differ)}")
        else:
            result["identical"] += 1
        if kill.checkpointed:
            result["resumable"] += 1
            if run.resumed(target):
                result["resumed"] += 1
            else:
                problems.append(f"{target} did not resume from its checkpoint")
        left = run.leftovers()
        if left or kill.survivors:
            result["leftovers"] += 1
            problems.append(f"left behind: {left[:3]} processes {kill.survivors}")
        if problems:
            result["failures"].append({"trial": trial, "kind": kind, "target": target, "problems": problems})
        else:
            result["survived"] += 1
        elapsed = time.monotonic() - start
        eta = elapsed / (trial + 1) * (args.trials - trial - 1)
        print(f"trial {trial + 1}/{args.trials} ({elapsed:.0f} s, ETA {eta:.0f} s): kill in {kind} ({target}) "
              f"hit {kill.hit or 'nothing'}: {'ok' if not problems else '; '.join(problems)}",
              file=sys.stderr, flush=True)
    result["seconds"] = round(time.monotonic() - start, 1)
    result["workdir"] = str(work)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
