"""The slmflow pipeline as a Prefect flow: `dag` below reads top to bottom, raw data to model.

`dag` is written once and interpreted twice: `make_plan` walks it to compute every stage key
without running anything (for `status`, `lineage` and `--only`), and `pipeline` walks it
with a runner that submits each stage as a Prefect task, or, with `run.execution: deployments`,
sends training stages to their deployments (flows/stages.py) and reads their outputs from the store.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import yaml
from prefect import flow
from prefect.runtime import flow_run
from prefect.states import Failed

from flows.config import ConfigError, PipelineConfig, resolve_config
from flows.record import RunRecord, lineage
from flows.report import baseline_of, headline, headline_metrics, report_card, write_report
from tasks import (
    decontaminate,
    dedup,
    difficulty,
    eval,
    ingest,
    pack,
    preselect,
    pretrain,
    prompts,
    quality,
    rl,
    select,
    sft,
    tokenizer,
)
from tasks.core.fingerprint import stale_modules
from tasks.core.lineage import Tracker, tracking_uri
from tasks.core.orchestration import RunContext, dask_scheduler, stage_task
from tasks.core.stage import DamagedInput, Outcome, Stage, StageConfig, StageError, code_of, log
from tasks.core.store import Artifact, Store, stage_key


class StageCall(Protocol):
    """`stage(STAGE, cfg, name=..., **inputs)`: name an instance when a stage appears more than once."""

    def __call__(self, stage: Stage, cfg: StageConfig, name: str | None = None, **inputs: Any) -> Any: ...


def dag(cfg: PipelineConfig, stage: StageCall) -> None:
    """Each line: one stage, its config section, and the upstream outputs it reads."""
    documents = stage(ingest.STAGE, cfg.ingest)
    deduped = stage(dedup.STAGE, cfg.dedup, documents=documents)
    tasks = stage(prompts.STAGE, cfg.prompts)  # reasoning tasks: train and held-out eval prompts
    clean = stage(decontaminate.STAGE, cfg.decontaminate, documents=deduped, prompts=tasks)
    filtered = stage(quality.STAGE, cfg.quality, documents=clean)  # Gopher/C4 heuristics; `scores` says who dropped what
    ranked = {}
    if cfg.select.method == "preselect":
        # PreSelect: K small reference models of different ability on the target (one shared tokenizer,
        # each its own data mixture), then a classifier of the documents whose losses predict that ability
        ref_bpe = stage(tokenizer.STAGE, cfg.references.tokenizer, name="tokenizer_ref", documents=filtered)
        refs = {}
        for i, ref in enumerate(cfg.references.models):
            mixture = stage(select.STAGE, ref.data, name=f"data_ref_{i}", documents=filtered)
            ref_packed = stage(pack.STAGE, cfg.references.pack, name=f"pack_ref_{i}", documents=mixture, tokenizer=ref_bpe)
            refs[f"ref_{i}"] = stage(pretrain.STAGE, ref.pretrain, name=f"ref_{i}", packed=ref_packed, tokenizer=ref_bpe)
        ranked["scores"] = stage(preselect.STAGE, cfg.preselect, documents=filtered, tokenizer=ref_bpe, target=tasks, **refs)
    selected = stage(select.STAGE, cfg.select, documents=filtered, **ranked)  # what the model is trained on
    bpe = stage(tokenizer.STAGE, cfg.tokenizer, documents=selected)
    packed = stage(pack.STAGE, cfg.pack, documents=selected, tokenizer=bpe)
    base = stage(pretrain.STAGE, cfg.pretrain, packed=packed, tokenizer=bpe)
    # offline difficulty: the base model's pass rate per training prompt; SFT skips mastered ones
    base_difficulty = stage(difficulty.STAGE, cfg.difficulty, name="difficulty_pretrain", model=base, prompts=tasks)
    tuned = stage(sft.STAGE, cfg.sft, model=base, prompts=tasks, tokenizer=bpe, difficulty=base_difficulty)
    # RL with online difficulty filtering; optionally pre-filtered by the SFT model's pass rates
    pre_filter = {}
    if cfg.rl.use_difficulty:
        pre_filter["difficulty"] = stage(difficulty.STAGE, cfg.difficulty, name="difficulty_sft", model=tuned, prompts=tasks)
    final = stage(rl.STAGE, cfg.rl, model=tuned, prompts=tasks, **pre_filter)
    # the same held-out evaluation for every model
    stage(eval.STAGE, cfg.eval, name="eval_pretrain", model=base, prompts=tasks)
    stage(eval.STAGE, cfg.eval, name="eval_sft", model=tuned, prompts=tasks)
    stage(eval.STAGE, cfg.eval, name="eval_rl", model=final, prompts=tasks)


@dataclass
class PlannedStage:
    name: str  # the instance name in this DAG (the stage's name unless given)
    stage: Stage
    cfg: StageConfig
    key: str
    inputs: dict[str, str]  # input name -> upstream instance name


@dataclass
class Plan:
    stages: dict[str, PlannedStage] = field(default_factory=dict)

    def __call__(self, stage: Stage, cfg: StageConfig, name: str | None = None, **inputs: PlannedStage) -> PlannedStage:
        name = name or stage.name
        if name in self.stages:
            raise ValueError(f"the DAG names two stages {name!r}: give one a name=")
        key = stage_key(stage.name, stage.version, cfg, {k: p.key for k, p in inputs.items()})
        planned = PlannedStage(name, stage, cfg, key, {k: p.name for k, p in inputs.items()})
        self.stages[name] = planned
        return planned

    def store_of(self, stage_name: str) -> str:
        """"data" or "models": where outputs of a stage (by its stage name) live."""
        return next((p.stage.store for p in self.stages.values() if p.stage.name == stage_name), "data")

    def check_names(self, names: list[str], option: str) -> None:
        for name in names:
            if name not in self.stages:
                raise ConfigError(f"{option} {name}: no such stage (stages: {', '.join(self.stages)})")

    def check(self, names: list[str]) -> None:
        """Every named stage's `check` (StageError on bad settings or paths), before any of them runs: a
        bad RL setting fails the run before pretraining starts. The CLI, the pipeline flow and the stage
        flow (deployments, serve) all call this; `run_stage` checks again just before it computes."""
        for name in names:
            planned = self.stages[name]
            if planned.stage.check:
                planned.stage.check(planned.cfg)

    def needed(self, only: list[str] | None) -> list[str]:
        """`--only X`: X and everything upstream of it (cache hits where the store has them)."""
        if not only:
            return list(self.stages)
        self.check_names(only, "--only")
        todo, seen = list(only), set()
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(self.stages[name].inputs.values())
        return [n for n in self.stages if n in seen]

    def downstream(self, names: Iterable[str]) -> list[str]:
        """`names` and every stage whose inputs reach one of them, transitively, in plan order."""
        reached = set(names)
        for name, planned in self.stages.items():  # the DAG adds a stage after its inputs
            if any(up in reached for up in planned.inputs.values()):
                reached.add(name)
        return [n for n in self.stages if n in reached]

    def stale(self, names: list[str], store_of: Callable[[Stage], Store]) -> dict[str, list[str]]:
        """The named stages whose stored output was made by other code than the current (its manifest's
        fingerprint differs): name -> the modules that changed. Missing outputs and outputs from before
        fingerprints are not stale."""
        found = {}
        for name in names:
            planned = self.stages[name]
            manifest = store_of(planned.stage).read_manifest(planned.stage.name, planned.key)
            if changed := stale_modules(manifest.get("code") if manifest else None, code_of(planned.stage)):
                found[name] = changed
        return found

    def rerun_stale(self, needed: list[str], store_of: Callable[[Stage], Store]) -> list[str]:
        """`--rerun-stale`: the needed stages to force, each stale one and what is downstream of it (logged)."""
        stale = self.stale(needed, store_of)
        if not stale:
            log.info("--rerun-stale: no stored output of this run is stale")
            return []
        rerun = [n for n in self.downstream(stale) if n in needed]
        log.info("--rerun-stale: %s stale; recomputing %s", "; ".join(f"{n} ({', '.join(m)})" for n, m in stale.items()),
                 ", ".join(rerun))
        return rerun


def make_plan(cfg: PipelineConfig) -> Plan:
    plan = Plan()
    dag(cfg, plan)
    return plan


PIPELINE_FLOW = "slmflow-pipeline"
STAGES_FLOW = "slmflow-stage"  # flows/stages.py; its deployments are named by family: slmflow-stage/pretrain, ...


@dataclass
class PrefectRunner:
    """Runs each needed stage as its Prefect task, or, for the families in `remote`, as a flow run of
    the family's deployment (execution: deployments). Records outcomes for the report card."""

    plan: Plan
    run: RunContext
    tracker: Tracker
    needed: list[str]
    force: set[str]
    config: dict = field(default_factory=dict)  # the resolved pipeline config, sent to remote stages
    remote: set[str] = field(default_factory=set)  # stage families sent to their deployments
    outcomes: list[tuple[str, Outcome]] = field(default_factory=list)
    calls: dict[str, tuple] = field(default_factory=dict)  # instance -> (stage, cfg, inputs) as called
    recovered: set[str] = field(default_factory=set)  # instances rerun after a damaged input (once each)

    def __call__(self, stage: Stage, cfg: StageConfig, name: str | None = None, **inputs: Any):
        name = name or stage.name
        planned = self.plan.stages[name]
        if name not in self.needed:
            return planned  # not run here: a needed stage downstream reads its output from the store
        self.calls[name] = (stage, cfg, inputs)
        inputs = {k: self.stored(v) if isinstance(v, PlannedStage) else v for k, v in inputs.items()}
        forced = name in self.force
        if stage.family in self.remote and (forced or self.run.store(stage).get(stage.name, planned.key) is None):
            outcome = self.dispatch(planned, forced)
        else:  # the task asks the store: a hit ends as a `Cached` state, with its MLflow child run
            task = stage_task(stage).with_options(task_run_name=f"{name}-{planned.key[:8]}")
            try:
                outcome = task(self.run, cfg, inputs, forced, name, planned.key, return_state=True).result()
            except DamagedInput as e:  # a cached input did not decode and was set aside: make it again, once
                upstream = self.producer(inputs[e.input_name])
                if upstream is None or name in self.recovered:
                    raise
                self.recovered.add(name)
                self.outcomes = [(n, o) for n, o in self.outcomes if n != upstream]
                up_stage, up_cfg, up_inputs = self.calls[upstream]
                fresh = self(up_stage, up_cfg, upstream, **up_inputs)
                again = {k: fresh if k == e.input_name else v for k, v in self.calls[name][2].items()}
                return self(stage, cfg, name, **again)
        self.outcomes.append((name, outcome))
        return outcome.artifact

    def producer(self, artifact: Artifact) -> str | None:
        """The instance of this run that made `artifact` (None: it was read from the store, not run here)."""
        return next((n for n, o in self.outcomes if (o.artifact.stage, o.artifact.key) == (artifact.stage, artifact.key)
                     and n in self.calls), None)

    def stored(self, planned: PlannedStage) -> Artifact:
        hit = self.run.store(planned.stage).get(planned.stage.name, planned.key)
        if hit is None:
            raise StageError(f"{planned.name} {planned.key} is not in the store {self.run.store(planned.stage).root}: "
                             f"run it first (slmflow run --only {planned.name})")
        return hit

    def dispatch(self, planned: PlannedStage, forced: bool) -> Outcome:
        """Run a stage as a flow run of its family's deployment (a worker on the gpu pool, say), wait
        for it, and read its output from the store both sides share."""
        from prefect.deployments import run_deployment
        from prefect.exceptions import ObjectNotFound

        deployment = f"{STAGES_FLOW}/{planned.stage.family}"
        params = {"family": planned.stage.family, "config": self.config, "names": [planned.name], "force": forced,
                  "parent_run_id": self.run.parent_run_id}
        try:
            remote = run_deployment(deployment, parameters=params, flow_run_name=f"{planned.name}-{planned.key[:8]}",
                                    poll_interval=2)
        except ObjectNotFound:
            raise StageError(f"{planned.name}: the Prefect server has no deployment {deployment} "
                             f"(run `slmflow deploy` or `slmflow serve`)") from None
        state = remote.state
        if state is None or not state.is_completed():
            ended = f"{state.name}: {state.message}" if state else "without a state"
            raise StageError(f"{planned.name}: flow run {remote.name} of {deployment} ended {ended}")
        art = self.run.store(planned.stage).get(planned.stage.name, planned.key)
        if art is None:
            raise StageError(f"{planned.name}: {deployment} finished but {self.run.store(planned.stage).root} has no "
                             f"{planned.stage.name} {planned.key}: do the pipeline and the worker share run.data_root "
                             f"and run.models_root?")
        ran = art.manifest.get("prefect", {}).get("prefect.flow_run_id") == str(remote.id)
        stale = [] if ran else stale_modules(art.manifest.get("code"), code_of(planned.stage))  # as run_stage's hit
        return Outcome(artifact=art, cached=not ran, seconds=float(art.manifest.get("seconds", 0.0)) if ran else 0.0,
                       stale=stale)


@contextlib.contextmanager
def parent_run(cfg: PipelineConfig, name: str, tags: dict[str, str], existing: str | None = None,
               overrides: list[str] | None = None):
    """The MLflow run that groups one pipeline run's stage runs (`existing`: join that one instead).
    It logs the resolved config as params (`dedup.bands`, ...) and the overrides, so two pipeline
    runs compare side by side in the MLflow UI."""
    tracker = Tracker.shared(tracking_uri(cfg.run.mlflow_uri), cfg.run.experiment)
    if existing:
        yield tracker, existing
        return
    tracker.close_dead_runs()
    parent = tracker.start_parent(name, {**tags, "overrides": " ".join(overrides or [])})
    resolved = cfg.model_dump(mode="json")
    tracker.log_params(parent, resolved)
    tracker.log_text(parent, yaml.safe_dump(resolved, sort_keys=False), "config.yaml")
    try:
        yield tracker, parent
    except BaseException:
        tracker.end(parent, "FAILED")
        raise
    tracker.end(parent, "FINISHED")


def run_context(cfg: PipelineConfig, parent_run_id: str, dask_address: str | None,
                config_file: str | None = None) -> RunContext:
    return RunContext(data_root=cfg.run.data_root, models_root=cfg.run.models_root, mlflow_uri=cfg.run.mlflow_uri,
                      experiment=cfg.run.experiment, parent_run_id=parent_run_id, dask_address=dask_address,
                      config_file=config_file)


def describe_final_model(tracker: Tracker, record: RunRecord, outcomes: dict[str, Outcome]) -> None:
    """The registered RL model version: a description with its lineage, tags (key, store path, the
    run of every upstream output) and its held-out scores, so the registry page says what it is."""
    if "rl" not in outcomes or not outcomes["rl"].artifact.manifest.get("info", {}).get("registered_version"):
        return
    final = outcomes["rl"].artifact
    info = final.manifest["info"]
    if not tracker.has_model_version(rl.REGISTERED_MODEL, info["registered_version"], final.manifest.get("mlflow_run_id")):
        log.warning("the RL model (a cache hit) is registered as %s version %s in another MLflow store, not in %s: "
                    "`slmflow run --force rl` registers it here", rl.REGISTERED_MODEL, info["registered_version"],
                    tracker.uri)
        return
    scores = outcomes["eval_rl"].artifact.manifest.get("metrics", {}) if "eval_rl" in outcomes else {}
    held_out = {k: float(v) for k, v in scores.items() if k.startswith(("pass_at_1", "sampled_pass_at_1", "pass_at_k"))}
    graph = lineage(record, ["rl"])
    nodes = graph.main_chain(f"rl:{final.key}")
    chain = " <- ".join(f"{n.name} {n.key}" for n in nodes)
    links = " <- ".join(f"{n.name} {tracker.run_link(n.mlflow_run_id) if n.mlflow_run_id else n.key}" for n in nodes)
    score = f"Held-out greedy pass@1 {held_out['pass_at_1']:.3f}. " if "pass_at_1" in held_out else ""
    producer = final.manifest.get("mlflow_run_id")
    description = (f"GRPO policy trained by slmflow (instance rl, key {final.key}).\n\n{score}Lineage (each a link to "
                   f"the run that made it): {links}. Store: {final.path}. Producing MLflow run: "
                   f"{tracker.run_link(producer) if producer else None}.")
    tags = {"stage_key": final.key, "store_path": final.path, "lineage": chain[:5000],
            **{f"run.{n.name}": n.mlflow_run_id for n in graph.nodes.values() if n.mlflow_run_id}}
    tracker.describe_model_version(rl.REGISTERED_MODEL, info["registered_version"], description, tags,
                                   info.get("mlflow_model_id"), final.manifest.get("mlflow_run_id"), held_out)


@flow(name=PIPELINE_FLOW)
def pipeline(config: str | dict = "configs/default.yaml", only: list[str] | None = None, force: list[str] | None = None,
             overrides: list[str] | None = None, config_file: str | None = None, rerun_stale: bool = False) -> dict:
    """The whole DAG (or `only` some stages and what they need), like `slmflow run`.
    config_file: where a config given as a dict came from (recorded for `slmflow ls` and the read commands).
    rerun_stale: also recompute every needed stage whose stored output was made by other code, and what is
    downstream of it (`slmflow run --rerun-stale`)."""
    if isinstance(config, str):
        config_file = config_file or config
    try:
        return _pipeline(config, only, force, overrides, config_file, rerun_stale)
    except (ConfigError, StageError) as e:  # bad input or settings: a one-line Failed state, not a traceback
        return Failed(message=str(e), data=e)


def _pipeline(config: str | dict, only: list[str] | None, force: list[str] | None, overrides: list[str] | None,
              config_file: str | None, rerun_stale: bool = False) -> dict:
    cfg = resolve_config(config, overrides)
    if cfg.run.execution == "deployments":  # remote stages must find the same store and tracking server
        cfg = cfg.model_copy(update={"run": cfg.run.shared()})
    plan = make_plan(cfg)
    plan.check_names(force or [], "--force")
    needed = plan.needed(only)
    plan.check(needed)
    stale = plan.rerun_stale(needed, run_context(cfg, "", None).store) if rerun_stale else []
    tags = {"prefect.flow_run_id": str(flow_run.id or ""), "only": ",".join(only or []), "force": ",".join(force or [])}
    remote = set(cfg.run.remote_families) if cfg.run.execution == "deployments" else set()
    with (parent_run(cfg, f"pipeline-{flow_run.name or 'local'}", tags, overrides=overrides) as (tracker, parent),
          dask_scheduler(cfg.run.runner, cfg.run.dask_address, cfg.run.dask_workers) as dask_address):
        # recorded first: `slmflow gc` keeps what a run in progress will read, and the read commands follow it
        record = RunRecord.from_plan(cfg, plan, config_file, overrides, parent)
        record.save()
        runner = PrefectRunner(plan, run_context(cfg, parent, dask_address, config_file), tracker, needed,
                               set(force or []) | set(stale), cfg.model_dump(mode="json"), remote)
        dag(cfg, runner)
        card = report_card(runner.outcomes, plan)
        baseline = baseline_of(runner.outcomes, plan)
        path = write_report(card, record.run_dir(), parent, baseline)
        tracker.log_text(parent, path.read_text(), "report.md")
        tracker.log_metrics(parent, headline_metrics(card, baseline))
        tracker.describe(parent, headline(card, baseline))
        tracker.log_text(parent, lineage(record, needed).to_mermaid(), "lineage.mmd")
        describe_final_model(tracker, record, dict(runner.outcomes))
    return {"report": card, "baseline": baseline, "report_path": str(path), "mlflow_run_id": parent}
