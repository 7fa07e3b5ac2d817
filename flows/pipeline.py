"""The slmflow pipeline as a Prefect flow: `dag` below reads top to bottom, raw data to model.

`dag` is written once and interpreted twice: `make_plan` walks it to compute every stage key
without running anything (for `status`, `lineage` and `--only`), and `pipeline` walks it
with a runner that submits each stage as a Prefect task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import yaml
from prefect import flow
from prefect.runtime import flow_run

from flows.config import ConfigError, PipelineConfig
from flows.report import report_card, write_report
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
from tasks.core.lineage import Tracker, tracking_uri
from tasks.core.orchestration import RunContext, stage_task
from tasks.core.stage import Outcome, Stage, StageConfig
from tasks.core.store import stage_key


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


def make_plan(cfg: PipelineConfig) -> Plan:
    plan = Plan()
    dag(cfg, plan)
    return plan


@dataclass
class PrefectRunner:
    """Runs each needed stage as its Prefect task; records outcomes for the report card."""

    plan: Plan
    run: RunContext
    tracker: Tracker
    needed: list[str]
    force: set[str]
    outcomes: list[tuple[str, Outcome]] = field(default_factory=list)

    def __call__(self, stage: Stage, cfg: StageConfig, name: str | None = None, **inputs: Any):
        name = name or stage.name
        if name not in self.needed:
            return None
        key = self.plan.stages[name].key
        forced = name in self.force
        # The store is the truth: Prefect may serve its cache only when the store has the output.
        refresh = forced or self.run.store(stage).get(stage.name, key) is None
        task = stage_task(stage).with_options(refresh_cache=refresh, task_run_name=f"{name}-{key[:8]}")
        state = task(self.run, cfg, inputs, forced, name, return_state=True)
        outcome: Outcome = state.result()
        if state.name == "Cached":  # the task body did not run: log the cache hit here
            outcome = outcome.model_copy(update={"cached": True, "seconds": 0.0})
            self.tracker.log_cached(self.run.parent_run_id, outcome.artifact, inputs, {"prefect.cached": "true"}, label=name)
        self.outcomes.append((name, outcome))
        return outcome.artifact


@flow(name="slmflow-pipeline")
def pipeline(config: dict, only: list[str] | None = None, force: list[str] | None = None) -> dict:
    cfg = PipelineConfig.model_validate(config)
    plan = make_plan(cfg)
    plan.check_names(force or [], "--force")
    needed = plan.needed(only)
    tracker = Tracker(tracking_uri(cfg.run.mlflow_uri), cfg.run.experiment)
    parent = tracker.start_parent(
        f"pipeline-{flow_run.name or 'local'}",
        {"prefect.flow_run_id": str(flow_run.id or ""), "only": ",".join(only or []), "force": ",".join(force or [])},
    )
    tracker.log_text(parent, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config.yaml")
    run = RunContext(
        data_root=cfg.run.data_root, models_root=cfg.run.models_root, mlflow_uri=cfg.run.mlflow_uri,
        experiment=cfg.run.experiment, parent_run_id=parent,
    )
    runner = PrefectRunner(plan, run, tracker, needed, set(force or []))
    try:
        dag(cfg, runner)
    except BaseException:
        tracker.end(parent, "FAILED")
        raise
    card = report_card(runner.outcomes, plan)
    path = write_report(card, cfg.run.data_root, parent)
    tracker.log_text(parent, path.read_text(), "report.md")
    tracker.end(parent, "FINISHED")
    return {"report": card, "report_path": str(path), "mlflow_run_id": parent}
