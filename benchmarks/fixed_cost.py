"""The fixed cost of `slmflow run`: what a data-only run spends before its first stage and after its last.

Runs `slmflow run -c configs/tiny.yaml --only ingest --force ingest` (this checkout's CLI) as a fresh
process, --repeats times, in a scratch directory with its own store, mlflow.db and PREFECT_HOME, after
one warm-up run that creates those databases (a first run on a machine pays that once). Each run is
timed from process start: to the first stage's start (`before_first_stage_s`), the stages (`stages_s`),
from the last stage's end to the exit (`after_last_stage_s`) and in all (`wall_s`); inside the first
phase, the wait for Prefect's API (`prefect_api_s`: what is left of the temporary server's start once
the run is planned and MLflow set up, or a health check of PREFECT_API_URL when that is set). Baselines in the same run, each a fresh interpreter: `pass`,
`import torch`, `import mlflow`, `import prefect`. Medians.

Prints ONE JSON object. Measure on an idle machine.

  python benchmarks/fixed_cost.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMAND = ["run", "-c", str(ROOT / "configs" / "tiny.yaml"), "--only", "ingest", "--force", "ingest"]

# The child: `slmflow run` with wall-clock marks at each stage's start and end and around the wait for
# Prefect's API, written as JSON at exit. The hooks go in before flows.cli imports what they wrap.
DRIVER = """
import atexit, json, os, sys, time
sys.path.insert(0, {root!r})
marks = {{"main": time.time(), "stages": []}}

@atexit.register
def _dump():
    marks["torch_imported"] = "torch" in sys.modules
    marks["mlflow_imported"] = "mlflow" in sys.modules
    with open(os.environ["FIXED_COST_MARKS"], "w") as f:
        json.dump(marks, f)

import flows.prefect_server as server
import tasks.core.stage as stage

run_stage, url = stage.run_stage, server.PrefectAPI.url

def timed_stage(*args, **kwargs):
    start = time.time()
    try:
        return run_stage(*args, **kwargs)
    finally:
        marks["stages"].append((start, time.time()))

def timed_url(self):
    start = time.time()
    try:
        return url(self)
    finally:
        marks.setdefault("prefect_api", (start, time.time()))

stage.run_stage, server.PrefectAPI.url = timed_stage, timed_url
from flows.cli import app
sys.argv = ["slmflow", *{command!r}]
app()
"""


def run_once(cwd: Path, env: dict[str, str]) -> dict:
    marks_file = cwd / "marks.json"
    marks_file.unlink(missing_ok=True)
    start = time.time()
    done = subprocess.run([sys.executable, "-c", DRIVER.format(root=str(ROOT), command=COMMAND)], cwd=cwd,
                          env={**env, "FIXED_COST_MARKS": str(marks_file)}, capture_output=True, text=True)
    end = time.time()
    if done.returncode != 0:
        raise SystemExit(f"slmflow {' '.join(COMMAND)} failed:\n{done.stderr[-3000:]}")
    marks = json.loads(marks_file.read_text())
    first, last = marks["stages"][0][0], marks["stages"][-1][1]
    api = marks.get("prefect_api", (first, first))
    return {"before_first_stage_s": first - start, "interpreter_s": marks["main"] - start,
            "prefect_api_s": api[1] - api[0], "stages_s": last - first, "after_last_stage_s": end - last,
            "wall_s": end - start, "torch_imported": marks["torch_imported"],
            "mlflow_imported": marks["mlflow_imported"]}


def python_seconds(code: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="slmflow-fixed-cost-") as scratch:
        cwd = Path(scratch)
        env = {**os.environ, "SLMFLOW_DATA_ROOT": str(cwd / "data"), "SLMFLOW_MODELS_ROOT": str(cwd / "models"),
               "PREFECT_HOME": str(cwd / "prefect"), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
        warm_up = run_once(cwd, env)
        runs = [run_once(cwd, env) for _ in range(args.repeats)]
    result: dict = {"command": f"slmflow {' '.join(COMMAND)}", "repeats": args.repeats,
                    "warm_up_wall_s": round(warm_up["wall_s"], 3)}
    for name, value in runs[0].items():
        if isinstance(value, bool):
            result[name] = any(r[name] for r in runs)
        else:
            result[name] = round(statistics.median(r[name] for r in runs), 3)
    result["baseline"] = {f"python_{name}_s": python_seconds(code, args.repeats) for name, code in
                          (("pass", "pass"), ("import_torch", "import torch"), ("import_mlflow", "import mlflow"),
                           ("import_prefect", "import prefect"))}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
