"""The stage contract (stage, store, settings, locks), the runner (orchestration, lineage) and what two or
more stages share (the model and its training loop, rollouts, chat format, tokens, filters, outputs).
A stage's private helpers live in its own package (tasks/dedup/, tasks/ingest/, tasks/preselect/, tasks/rl/)."""

import os

# No network at run time: MLflow (3.5+) otherwise sends usage telemetry from every process that
# imports it. A user who wants it sets MLFLOW_DISABLE_TELEMETRY=false.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
