"""How long `slmflow --help` and the read commands take, against what they used to import.

Each command runs as a fresh process (this checkout's `flows.cli`), median of --repeats runs. The
baseline, measured in the same run, is the import every command paid before imports were deferred:
the stage modules with torch, mlflow and prefect (`import flows.config, flows.pipeline`). Read
commands run in --project, a directory whose data/runs/last-run.json records a run (the tiny
pipeline's, say); without one, only --help and the baseline are timed.

Prints ONE JSON object: {"help_s", "status_s", "lineage_s", "status_with_config_s", "baseline_import_s"}.

  python benchmarks/cli.py --project /path/with/a/run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def seconds(args: list[str], cwd: Path, repeats: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return round(statistics.median(times), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--project", type=Path, default=ROOT, help="a directory with data/runs/last-run.json")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    # this checkout's CLI even when --project is itself a checkout (`-m` would import the cwd's flows/)
    cli = ["-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); from flows.cli import app; app()"]
    result = {"help_s": seconds([*cli, "--help"], args.project, args.repeats),
              "baseline_import_s": seconds(["-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import flows.config, "
                                                  "flows.pipeline"], args.project, args.repeats)}
    record = args.project / "data" / "runs" / "last-run.json"
    if record.exists():
        config = json.loads(record.read_text())["config_file"]
        result["status_s"] = seconds([*cli, "status"], args.project, args.repeats)
        result["lineage_s"] = seconds([*cli, "lineage", "rl"], args.project, args.repeats)
        result["status_with_config_s"] = seconds([*cli, "status", "-c", config], args.project, args.repeats)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
