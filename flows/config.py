"""Pipeline config: a YAML file of per-stage sections, plus `--set stage.field=value` overrides."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.core.lineage import tracking_uri
from tasks.core.configs import ModelConfig
from tasks.decontaminate import DecontaminateConfig
from tasks.dedup import DedupConfig
from tasks.difficulty import DifficultyConfig
from tasks.eval import EvalConfig
from tasks.ingest import IngestConfig
from tasks.pack import PackConfig
from tasks.preselect import PreselectConfig
from tasks.pretrain import PretrainConfig
from tasks.prompts import PromptsConfig
from tasks.quality import QualityConfig
from tasks.rl import RLConfig
from tasks.select import SelectConfig
from tasks.sft import SFTConfig
from tasks.tokenizer import TokenizerConfig


class ConfigError(ValueError):
    """A config problem, as one line naming the file and setting."""


FAMILIES = ("data", "pretrain", "sft", "rl", "eval")  # one deployment each (deployments/prefect.yaml)


def _env(name: str, default: str) -> Callable[[], str]:
    return lambda: os.environ.get(name, default)


class RunSettings(BaseModel):
    """Where outputs and tracking go, and how stages are executed. Not part of any stage key:
    moving a store, or running a stage on another machine, keeps its keys."""

    model_config = ConfigDict(extra="forbid")
    data_root: str = Field(default_factory=_env("SLMFLOW_DATA_ROOT", "data"),
                           description="store root for data stages (path or fsspec URI); default $SLMFLOW_DATA_ROOT or data")
    models_root: str = Field(default_factory=_env("SLMFLOW_MODELS_ROOT", "models"),
                             description="store root for weights; default $SLMFLOW_MODELS_ROOT or models")
    mlflow_uri: str | None = Field(None, description="tracking URI; default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    experiment: str = "slmflow"
    execution: Literal["local", "deployments"] = Field(
        "local", description="local: every stage in this process; deployments: stages of remote_families "
                             "run as flow runs of their deployments (slmflow-stage/<family>, e.g. on the gpu pool)")
    remote_families: list[Literal[FAMILIES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["pretrain", "sft", "rl"], description="which stage families execution deployments sends out")
    runner: Literal["default", "dask"] = Field(
        "default", description="where data stages map their shards: Prefect's default task runner or a Dask cluster")
    dask_address: str | None = Field(None, description="Dask scheduler (tcp://host:8786); none: a local cluster per run")
    dask_workers: int = Field(2, ge=1, description="worker processes of the local Dask cluster")
    schedule: str | None = Field(None, description="cron of the pipeline deployment that `slmflow serve` serves")
    timezone: str = "UTC"

    def shared(self) -> RunSettings:
        """The same locations, spelled so that a flow run in another working directory finds them:
        local store roots and a SQLite tracking file become absolute paths (URIs stay as they are)."""

        def absolute(root: str) -> str:
            return root if "://" in root else str(Path(root).resolve())

        uri = tracking_uri(self.mlflow_uri)
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = "sqlite:///" + absolute(uri.removeprefix("sqlite:///"))
        return self.model_copy(update={"data_root": absolute(self.data_root), "models_root": absolute(self.models_root),
                                       "mlflow_uri": uri})


class ReferenceModel(BaseModel):
    """One PreSelect reference model: its training documents (a select of the quality output,
    e.g. a source mixture) and its pretraining settings. Instances `data_ref_<i>`, `pack_ref_<i>`, `ref_<i>`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    data: SelectConfig = Field(default_factory=lambda: SelectConfig(method="none"),
                               description="which quality-filtered documents it trains on (method none: all)")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="its size, steps and optimizer")


def _reference(drop: list[str]) -> ReferenceModel:
    """The default references: one tiny model and step budget, trained on different source mixtures."""
    return ReferenceModel(data=SelectConfig(method="none", drop_sources=drop), pretrain=PretrainConfig(
        model=ModelConfig(depth=1, width=128), batch_size=16, max_steps=150, lr=0.01, warmup_steps=10,
        eval_every=150, eval_rows=32, checkpoint_every=150))


class ReferencesConfig(BaseModel):
    """PreSelect's reference models (README, "Data selection"): one tokenizer (`tokenizer_ref`,
    trained on the quality output) and one packing setting for K models of different ability."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    tokenizer: TokenizerConfig = Field(default_factory=lambda: TokenizerConfig(vocab_size=1024, max_train_chars=2_000_000),
                                       description="the references' tokenizer (small: the references are)")
    pack: PackConfig = Field(default_factory=lambda: PackConfig(seq_len=128), description="the references' token rows")
    models: list[ReferenceModel] = Field(
        default_factory=lambda: [_reference(d) for d in ([], ["reasoning_gym"], ["stdlib"], ["reasoning_gym", "stdlib"])],
        description="K >= 2 reference models of different ability on the target")


class PipelineConfig(BaseModel):
    """One section per stage, in DAG order; later issues add sections here."""

    model_config = ConfigDict(extra="forbid")
    run: RunSettings = RunSettings()
    ingest: IngestConfig = IngestConfig()
    dedup: DedupConfig = DedupConfig()
    prompts: PromptsConfig = PromptsConfig()
    decontaminate: DecontaminateConfig = DecontaminateConfig()
    quality: QualityConfig = QualityConfig()
    references: ReferencesConfig = ReferencesConfig()  # PreSelect's reference models (select.method preselect only)
    preselect: PreselectConfig = PreselectConfig()
    select: SelectConfig = SelectConfig()  # what the tokenizer and pretraining read
    tokenizer: TokenizerConfig = TokenizerConfig()
    pack: PackConfig = PackConfig()
    pretrain: PretrainConfig = PretrainConfig()
    difficulty: DifficultyConfig = DifficultyConfig()
    sft: SFTConfig = SFTConfig()
    rl: RLConfig = RLConfig()
    eval: EvalConfig = EvalConfig()  # one config for every evaluated model, so their numbers compare

    @model_validator(mode="after")
    def _cross_stage_rules(self) -> PipelineConfig:
        """Rules between sections; each failure is one line naming the settings."""
        if self.select.method == "preselect":
            if len(self.references.models) < 2:
                raise ValueError(f"select.method preselect needs references.models with K >= 2 entries "
                                 f"(got {len(self.references.models)})")
            if self.preselect.benchmark == "eval_pass_at_1":  # the DAG evaluates no reference model
                raise ValueError("preselect.benchmark eval_pass_at_1 needs an eval stage per reference, which this "
                                 "pipeline does not build: use target_bpc, val_loss or val_bpb")
        for where, tok, pack in (("", self.tokenizer, self.pack), ("references.", self.references.tokenizer,
                                                                  self.references.pack)):
            # pack's val documents must be ones the tokenizer held out (the same hash rule and seed)
            # (pack.val_fraction <= tokenizer.heldout_fraction keeps every val document unseen; the pack
            # stage reports it as val_unseen_by_tokenizer rather than refusing a small corpus a bigger val set)
            if pack.seed != tok.seed:
                raise ValueError(f"{where}pack.seed {pack.seed} must equal {where}tokenizer.seed {tok.seed}: "
                                 f"otherwise the tokenizer trains on pack's validation documents")
        return self


def _set(tree: dict, dotted: str, value: Any, origin: str) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{origin}: cannot set '{dotted}': '{'.'.join(parts[: i + 1])}' is not a section")
        node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{origin}: cannot set '{dotted}'")


def _unshared(node: Any) -> Any:
    """A copy in which no two places share an object: YAML anchors (`*ref`) load as one shared
    dict, and `--set references.models.0...` must change that item only."""
    if isinstance(node, dict):
        return {k: _unshared(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unshared(v) for v in node]
    return node


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = _unshared(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected stage.field=value")
        dotted, text = item.split("=", 1)
        _set(raw, dotted.strip(), _value(text), f"--set {item!r}")
    return raw


def _value(text: str) -> Any:
    """A --set value is YAML (numbers, lists, true); text YAML cannot read (a cron line) is a string."""
    try:
        return yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return text


def validation_message(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    where = "".join(f"{p}: " for p in [".".join(str(p) for p in first["loc"])] if p)  # none for a cross-section rule
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{origin}: {where}{first['msg'].removeprefix('Value error, ')}{more}"


def validate(raw: dict, origin: str) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(validation_message(e, origin)) from None


def resolve_config(config: str | Path | dict, overrides: list[str] | None = None) -> PipelineConfig:
    """What flows take (the CLI's config and --set): a YAML path, or a config as a dict."""
    if isinstance(config, dict):
        return validate(apply_overrides(config, overrides or []), "config")
    return load_config(config, overrides)


def read_config_text(path: str | Path) -> str:
    """A config file's text, from a path or an fsspec URL (`s3://bucket/configs/x.yaml`: what workers on
    other machines read, since they have no checkout of the project)."""
    import fsspec

    where = str(path)
    try:
        with fsspec.open(where, "r", encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        hint = "" if "://" in where or Path(where).is_absolute() else (
            " (a relative path is read from the working directory: on a worker give an absolute path or a URL "
            "it can read, e.g. s3://bucket/configs/x.yaml)")
        raise ConfigError(f"config file not found: {where}{hint}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """A pipeline config from a YAML file (a path or an fsspec URL), with --set overrides applied."""
    where = str(path)
    text = read_config_text(path)
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of stage sections")
    return validate(apply_overrides(raw, overrides or []), where)
