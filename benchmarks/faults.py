"""Faults a user meets, against the tiny pipeline: what each run says, and whether the next plain run recovers.

A reference run of configs/tiny.yaml (plus a small `.jsonl.gz` source of its own) fills a store; each
case then starts from a copy of that finished store (or, for the checkpoint case, from a run killed
mid-training), does one harmful thing, runs `slmflow run` as a user would, undoes what a user would
undo (frees the space, restores the source file, moves the broken MLflow database aside: exactly what
the one line told them) and runs plain `slmflow run` again. Nothing in the store is ever removed by
hand.

Per case: the exit code of the fault run, `lines` (its output lines that are not INFO progress or the
report card: warnings, errors, traceback lines), whether the file at fault was named, `traceback`
(any "Traceback" line), the exit code of the next plain run, and whether every stage's files then
match the reference byte for byte (manifest sha256 digests). Ctrl-C in pretraining also reports
`exit_seconds` (signal to exit, at most 10), and `gc --yes` `kept_everything` (the tiny run's outputs). Cases that need root (a small tmpfs for
disk full, a read-only mount) are reported as skipped, never as passed, when not run as root.

Prints ONE JSON object: {"cases": {name: {...}}, "summary": {"cases", "skipped", "ok", "failed": [...]}}.
A case is ok when lines <= 3, no traceback, the file named (where there is one) and the next run exits
0 with identical outputs.

  python benchmarks/faults.py                   # every case, ~10 minutes on 2 cores
  python benchmarks/faults.py --cases manifest_empty truncated_source
  python benchmarks/faults.py --set pretrain.max_steps=60   # settings over tiny.yaml's, every run alike
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from flows.config import apply_overrides, load_config  # noqa: E402
from flows.pipeline import make_plan  # noqa: E402
from tasks.core.store import MANIFEST, Store  # noqa: E402

SLMFLOW = str(Path(sys.executable).with_name("slmflow"))
OVERRIDES: list[str] = []  # --set: settings over tiny.yaml's, in every config this benchmark writes
_PROGRESS = re.compile(r"^\d\d:\d\d:\d\d\.\d+ \| (INFO|DEBUG) ")


def source_lines(n: int = 300) -> bytes:
    """n distinct notes (dedup keeps them), the same bytes every time."""
    rng = random.Random(0)
    return "".join(json.dumps({"text": f"note {i}: " + " ".join(f"w{rng.randrange(5000)}" for _ in range(40))}) + "\n"
                   for i in range(n)).encode()


@dataclass
class Store2:
    """A copy of the pipeline's stores and config under one directory."""

    root: Path
    config: Path
    env: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # what a case measures besides the common fields

    @property
    def cfg(self):
        return load_config(self.config)

    def run(self, *args: str, timeout_s: float = 900) -> tuple[int, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **self.env}
        proc = subprocess.run([SLMFLOW, "run", "-c", str(self.config), *args], cwd=self.root, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout_s)
        return proc.returncode, proc.stdout  # one stream, in the order a terminal shows it

    def outputs(self) -> dict[str, dict | None]:
        cfg = self.cfg
        stores = {"data": Store(cfg.run.data_root), "models": Store(cfg.run.models_root)}
        return {name: (art.manifest["files"] if (art := stores[p.stage.store].get(p.stage.name, p.key)) else None)
                for name, p in make_plan(cfg).stages.items()}

    def output_dir(self, name: str) -> Path:
        cfg = self.cfg
        planned = make_plan(cfg).stages[name]
        root = cfg.run.models_root if planned.stage.store == "models" else cfg.run.data_root
        return Path(root) / planned.stage.name / planned.key


def make_config(root: Path, data_root: Path | None = None, models_root: Path | None = None) -> Path:
    """tiny.yaml with its stores and MLflow under `root`, and one more source: the notes beside `root` (one
    path for every case: the path is in ingest's key)."""
    raw = apply_overrides(yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text()), OVERRIDES)
    raw["run"].update(data_root=str(data_root or root / "data"), models_root=str(models_root or root / "models"),
                      mlflow_uri=f"sqlite:///{root / 'mlflow.db'}", experiment="slmflow-faults")
    raw["ingest"]["sources"].append({"kind": "jsonl", "path": str(notes(root)), "name": "notes"})
    root.mkdir(parents=True, exist_ok=True)
    (root / "tiny.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root / "tiny.yaml"


def notes(root: Path) -> Path:
    return root.parent / "notes.jsonl.gz"


def write_notes(root: Path) -> None:
    notes(root).write_bytes(gzip.compress(source_lines(), mtime=0))


def fault_lines(output: str) -> list[str]:
    """What a run said besides its progress: every line before the report card (printed last, on success)
    that is not an INFO record, nor the one line that says Prefect's temporary server is starting."""
    lines = output.splitlines()
    card = next((i for i, ln in enumerate(lines) if "slmflow report card" in ln), len(lines))
    return [ln for ln in lines[:card] if ln.strip() and not _PROGRESS.match(ln)
            and not ln.startswith("Waiting for Prefect's temporary server")]


@dataclass
class Case:
    name: str
    harm: Callable[[Store2], str | None]  # does the harm; returns the file a good message names (None: no file)
    undo: Callable[[Store2], None] = lambda s: None  # what the one line told the user to do
    args: tuple[str, ...] = ()  # of the fault run
    needs_root: bool = False
    expect_fail: bool = True  # the fault run exits non-zero (else: it recovers by itself, exit 0)
    fault: Callable[[Store2], tuple[int, str]] | None = None  # the fault run, when not a plain `slmflow run`


def _truncate(path: Path, keep: float = 0.5) -> str:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return str(path)


def _flip(path: Path) -> str:
    """Flip the bytes of the Parquet footer's magic: same size (only the digests can tell), never decodes.
    (A flip inside the column data may decode, silently wrong: that is what `slmflow verify` is for.)"""
    data = bytearray(path.read_bytes())
    data[-4:] = bytes(b ^ 0xFF for b in data[-4:])
    path.write_bytes(bytes(data))
    return str(path)


def _tmpfs(s: Store2, size: str, options: str = "") -> Path:
    mount = s.root / "small"
    mount.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(mount)], check=True)
    return mount


def _move_store(s: Store2, models_dir: Path) -> None:
    """The models store onto another directory (a mount), the config pointing there."""
    shutil.copytree(s.root / "models", models_dir, dirs_exist_ok=True)
    make_config(s.root, models_root=models_dir)


def harm_disk_full(s: Store2) -> str | None:
    """The models store on a mount with room for what it holds, less RL's output: the run must write RL."""
    shutil.rmtree(s.root / "models" / "rl")
    held = sum(p.stat().st_size for p in (s.root / "models").rglob("*") if p.is_file())
    mount = _tmpfs(s, f"{(held // 4096 + 64) * 4}k")  # a block per file and some: a few KB free
    _move_store(s, mount / "models")
    return str(mount)


def undo_disk_full(s: Store2) -> None:
    subprocess.run(["mount", "-o", "remount,size=512m", str(s.root / "small")], check=True)


def harm_read_only(s: Store2) -> str | None:
    shutil.rmtree(s.root / "models" / "rl")
    mount = _tmpfs(s, "512m")
    _move_store(s, mount / "models")
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    return str(mount)


def undo_read_only(s: Store2) -> None:
    subprocess.run(["mount", "-o", "remount,rw", str(s.root / "small")], check=True)


def drop_training(s: Store2) -> Path:
    """Pretraining and everything after it out of the store copy: the next run trains again. Its work dir."""
    for name in ("pretrain", "sft", "rl", "eval_pretrain", "eval_sft", "eval_rl", "difficulty_pretrain"):
        shutil.rmtree(s.output_dir(name), ignore_errors=True)
    out = s.output_dir("pretrain")
    return out.parent / f".work-{out.name}"


def signal_at_checkpoint(s: Store2, sig: int, checkpoints: int) -> tuple[int, str, float]:
    """Start a run, send `sig` to its process group (as a terminal's Ctrl-C does) once pretraining has
    written `checkpoints` checkpoints; (exit code, output, seconds from the signal to the exit)."""
    work = drop_training(s)
    log = s.root / f"signal-{sig}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([SLMFLOW, "run", "-c", str(s.config), "--set", "pretrain.checkpoint_every=10"],
                                cwd=s.root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        while len(list(work.glob("ckpt-*"))) < checkpoints and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        sent = time.monotonic()
        os.killpg(proc.pid, sig)
        code = proc.wait()
    return code, log.read_text(errors="replace"), time.monotonic() - sent


def harm_checkpoint(s: Store2) -> str | None:
    """A run killed in pretraining after its second checkpoint; the newest checkpoint then torn."""
    signal_at_checkpoint(s, signal.SIGKILL, 2)
    found = sorted(drop_training(s).glob("ckpt-*"), key=lambda p: int(p.name.split("-")[1]))
    if not found:
        raise RuntimeError("the pretrain stage wrote no checkpoint before the run ended")
    return _truncate(found[-1] / "model.safetensors")


def fault_interrupt(s: Store2) -> tuple[int, str]:
    code, output, seconds = signal_at_checkpoint(s, signal.SIGINT, 1)
    s.extra["exit_seconds"] = round(seconds, 2)
    return code, output


def fault_gc(s: Store2) -> tuple[int, str]:
    """`slmflow gc --yes` as a user types it after a tiny run (no --config): it must keep that run's outputs."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.run([SLMFLOW, "gc", "--yes"], cwd=s.root, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    s.extra["kept_everything"] = s.outputs() == s.extra["expected"]
    return proc.returncode, proc.stdout


def harm_mlflow_db(s: Store2) -> str | None:
    db = s.root / "mlflow.db"
    db.write_bytes(b"\0not a database\0" * 4096)
    return str(db)


def undo_mlflow_db(s: Store2) -> None:
    os.replace(s.root / "mlflow.db", s.root / "mlflow-broken.db")


def harm_cached_parquet(s: Store2) -> str | None:
    return _flip(sorted((s.output_dir("prompts") / "train").glob("*.parquet"))[0])


CASES = [
    Case("manifest_truncated", lambda s: _truncate(s.output_dir("dedup") / MANIFEST), expect_fail=False),
    Case("manifest_empty", lambda s: (s.output_dir("tokenizer") / MANIFEST).write_text("{}") and
         str(s.output_dir("tokenizer") / MANIFEST), expect_fail=False),
    Case("cached_parquet_flipped", harm_cached_parquet, args=("--force", "sft"), expect_fail=False),
    Case("checkpoint_truncated", harm_checkpoint, expect_fail=False),
    Case("source_gzip_truncated", lambda s: _truncate(notes(s.root)), undo=lambda s: write_notes(s.root),
         args=("--force", "ingest")),
    Case("mlflow_db_not_a_database", harm_mlflow_db, undo=undo_mlflow_db),
    Case("interrupt_in_pretrain", lambda s: None, fault=fault_interrupt),
    Case("gc_yes_after_a_tiny_run", lambda s: None, fault=fault_gc, expect_fail=False),
    Case("disk_full", harm_disk_full, undo=undo_disk_full, needs_root=True),
    Case("read_only_store", harm_read_only, undo=undo_read_only, needs_root=True),
]


def run_case(case: Case, reference: Path, expected: dict, workdir: Path) -> dict:
    if case.needs_root and os.geteuid() != 0:
        return {"skipped": "needs root (a tmpfs mount)"}
    root = workdir / case.name
    shutil.copytree(reference, root, symlinks=True)
    s = Store2(root, make_config(root), extra={"expected": expected})
    try:
        named = case.harm(s)
        code, output = case.fault(s) if case.fault else s.run(*case.args)
        lines = fault_lines(output)
        case.undo(s)
        again, again_output = s.run()
        result = {
            "exit": code, "lines": len(lines), "said": lines[:4],
            "file_named": None if named is None else any(named in ln or Path(named).name in ln for ln in lines),
            "traceback": "Traceback" in output, "next_run_exit": again, "identical": s.outputs() == expected,
        }
        if again != 0:
            result["next_run_said"] = fault_lines(again_output)[:6]
        result.update({k: v for k, v in s.extra.items() if k != "expected"})
    finally:
        write_notes(root)  # whatever a case did to the shared source
        if (root / "small").is_dir():
            subprocess.run(["umount", "-l", str(root / "small")], check=False)
    result["ok"] = (result["lines"] <= 3 and not result["traceback"] and result["file_named"] is not False
                    and result["next_run_exit"] == 0 and result["identical"]
                    and (result["exit"] != 0) == case.expect_fail and result.get("exit_seconds", 0) <= 10
                    and result.get("kept_everything", True))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="*", default=[c.name for c in CASES])
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="stage.field=value")
    args = parser.parse_args()
    OVERRIDES.extend(args.overrides)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="slmflow-faults-"))
    reference = workdir / "reference"
    workdir.mkdir(parents=True, exist_ok=True)
    write_notes(reference)
    ref = Store2(reference, make_config(reference))
    code, output = ref.run()
    if code != 0:
        raise SystemExit(f"the reference run failed:\n{output[-3000:]}")
    expected = ref.outputs()
    cases = {}
    for case in (c for c in CASES if c.name in args.cases):
        t0 = time.monotonic()
        cases[case.name] = {**run_case(case, reference, expected, workdir), "seconds": round(time.monotonic() - t0, 1)}
        print(f"{case.name}: {json.dumps(cases[case.name])}", file=sys.stderr)
    ran = {k: v for k, v in cases.items() if "skipped" not in v}
    summary = {"cases": len(cases), "skipped": sorted(set(cases) - set(ran)), "ok": sum(v["ok"] for v in ran.values()),
               "failed": sorted(k for k, v in ran.items() if not v["ok"])}
    print(json.dumps({"cases": cases, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
