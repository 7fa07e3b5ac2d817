"""Registering slmflow with a Prefect server: work pools and deployments (`slmflow deploy`), or
serving every deployment from one process with no workers at all (`slmflow serve`).

The deployments are written down once, in `deployments/prefect.yaml`; `deploy` hands that file to
`prefect deploy`. `serve` builds the same names (slmflow-pipeline/pipeline, slmflow-stage/<family>)
from the flows, with the pipeline's schedule from the config (`run.schedule`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from flows.config import FAMILIES, RunSettings
from flows.pipeline import PIPELINE_FLOW, STAGES_FLOW, pipeline
from flows.stages import stages

PREFECT_FILE = Path("deployments/prefect.yaml")
# Process work pools (the worker runs each flow run as a subprocess of its own Python). One
# training stage per GPU at a time: the gpu pool runs one flow run at a time unless raised.
POOLS = {"cpu": None, "gpu": 1}


def create_pools() -> list[str]:
    """Create the work pools the server lacks; return the names created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    created = []
    with get_client(sync_client=True) as client:
        for name, limit in POOLS.items():
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(
                    name=name, type="process", concurrency_limit=limit,
                    base_job_template=ProcessWorker.get_default_base_job_template()))
                created.append(name)
    return created


def deploy(project: Path) -> None:
    """`prefect deploy --all` on deployments/prefect.yaml, from the project root: workers run the
    flows from this directory (Prefect's default pull step), so it must exist on their machines."""
    command = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_FILE)]
    subprocess.run(command, cwd=project, check=True)


def deployed_to_pools() -> list[str]:
    """slmflow deployments on the server that run on work pools (registered by `slmflow deploy`)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    ours = FlowFilter(name=FlowFilterName(any_=[PIPELINE_FLOW, STAGES_FLOW]))
    with get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows(flow_filter=ours)}
        found = client.read_deployments(flow_filter=ours)
    return sorted(f"{flows.get(d.flow_id, '?')}/{d.name}" for d in found if d.work_pool_name)


def serve(config: str, overrides: list[str], run: RunSettings) -> None:
    """Serve the pipeline and stage-family deployments from this process until it is stopped."""
    from prefect import serve as prefect_serve
    from prefect.schedules import Cron

    # A served deployment cannot take over one registered on a work pool (Prefect would keep its pool
    # and lose its code location): the two ways are one or the other on a server.
    if taken := deployed_to_pools():
        raise RuntimeError(f"the Prefect server already has {', '.join(taken)} on work pools (slmflow deploy): "
                           f"use those workers, or delete them first (prefect deployment delete NAME)")

    params = {"config": config, "overrides": overrides}
    schedules = [Cron(run.schedule, timezone=run.timezone)] if run.schedule else []
    deployments = [pipeline.to_deployment("pipeline", parameters=params, schedules=schedules)]
    deployments += [stages.to_deployment(family, parameters={"family": family, **params}) for family in FAMILIES]
    prefect_serve(*deployments)
