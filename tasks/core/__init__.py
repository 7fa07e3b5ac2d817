"""What the stages share: store, stage contract, orchestration, and the methods' building blocks."""

import os

# No network at run time: MLflow (3.5+) otherwise sends usage telemetry from every process that
# imports it. A user who wants it sets MLFLOW_DISABLE_TELEMETRY=false.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
