"""The stage-family flow: the deployments `slmflow-stage/<family>` (data, pretrain, sft, rl, eval).

It runs the named stages of one family (default: all of them in the configured DAG) with their
inputs read from the store, on whichever worker picked it up. The pipeline flow sends training
stages here in `execution: deployments`, passing its resolved config and its MLflow parent run, so
keys, store and lineage are those of a local run; a person triggers it to rerun one stage
(`prefect deployment run slmflow-stage/sft -p force=true`).
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run
from prefect.states import Failed

from flows.config import FAMILIES, ConfigError, resolve_config
from flows.pipeline import STAGES_FLOW, PrefectRunner, dag, make_plan, parent_run, run_context
from tasks.core.orchestration import dask_scheduler
from tasks.core.stage import StageError


@flow(name=STAGES_FLOW)
def stages(family: str, config: str | dict = "configs/default.yaml", overrides: list[str] | None = None,
           names: list[str] | None = None, force: bool = False, parent_run_id: str | None = None) -> dict:
    """Run `names` (stages of `family`; default all of them) with inputs from the store; `force`
    recomputes them even if stored. `parent_run_id`: the pipeline's MLflow run to log under."""
    try:
        return _stages(family, config, overrides, names, force, parent_run_id)
    except (ConfigError, StageError) as e:  # bad input or settings: a one-line Failed state, not a traceback
        return Failed(message=str(e), data=e)


def _stages(family: str, config: str | dict, overrides: list[str] | None, names: list[str] | None, force: bool,
            parent_run_id: str | None) -> dict:
    if family not in FAMILIES:
        raise ConfigError(f"family {family!r}: expected one of {', '.join(FAMILIES)}")
    cfg = resolve_config(config, overrides)
    plan = make_plan(cfg)
    members = [n for n, p in plan.stages.items() if p.stage.family == family]
    names = names or members
    plan.check_names(names, "names")
    for name in names:
        if name not in members:  # e.g. a training stage sent to the cpu pool
            other = plan.stages[name].stage.family
            raise ConfigError(f"names: {name} is a stage of family {other}, not {family} (deployment {STAGES_FLOW}/{other})")
    plan.check(names)
    tags = {"prefect.flow_run_id": str(flow_run.id or ""), "family": family, "only": ",".join(names)}
    with (parent_run(cfg, f"{family}-{flow_run.name or 'local'}", tags, parent_run_id) as (tracker, parent),
          dask_scheduler(cfg.run.runner, cfg.run.dask_address, cfg.run.dask_workers) as dask_address):
        runner = PrefectRunner(plan, run_context(cfg, parent, dask_address), tracker, names, set(names) if force else set())
        dag(cfg, runner)
    return {"stages": [{"stage": n, "key": o.artifact.key, "cached": o.cached, "seconds": round(o.seconds, 3)}
                       for n, o in runner.outcomes], "mlflow_run_id": parent}
