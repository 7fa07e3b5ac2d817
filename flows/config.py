"""Pipeline config: a YAML file of per-stage sections, plus `--set stage.field=value` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.decontaminate import DecontaminateConfig
from tasks.dedup import DedupConfig
from tasks.difficulty import DifficultyConfig
from tasks.eval import EvalConfig
from tasks.ingest import IngestConfig
from tasks.pack import PackConfig
from tasks.pretrain import PretrainConfig
from tasks.prompts import PromptsConfig
from tasks.rl import RLConfig
from tasks.sft import SFTConfig
from tasks.tokenizer import TokenizerConfig


class ConfigError(ValueError):
    """A config problem, as one line naming the file and setting."""


class RunSettings(BaseModel):
    """Where outputs and tracking go. Not part of any stage key: moving a store keeps its keys."""

    model_config = ConfigDict(extra="forbid")
    data_root: str = Field("data", description="store root for data stages (path or fsspec URI)")
    models_root: str = Field("models", description="store root for weights")
    mlflow_uri: str | None = Field(None, description="tracking URI; default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    experiment: str = "slmflow"


class PipelineConfig(BaseModel):
    """One section per stage, in DAG order; later issues add sections here."""

    model_config = ConfigDict(extra="forbid")
    run: RunSettings = RunSettings()
    ingest: IngestConfig
    dedup: DedupConfig = DedupConfig()
    prompts: PromptsConfig = PromptsConfig()
    decontaminate: DecontaminateConfig = DecontaminateConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    pack: PackConfig = PackConfig()
    pretrain: PretrainConfig = PretrainConfig()
    difficulty: DifficultyConfig = DifficultyConfig()
    sft: SFTConfig = SFTConfig()
    rl: RLConfig = RLConfig()
    eval: EvalConfig = EvalConfig()  # one config for every evaluated model, so their numbers compare


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


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected stage.field=value")
        dotted, text = item.split("=", 1)
        _set(raw, dotted.strip(), yaml.safe_load(text) if text else "", f"--set {item!r}")
    return raw


def validation_message(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{origin}: {where}: {first['msg']}{more}"


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of stage sections")
    raw = apply_overrides(raw, overrides or [])
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(validation_message(e, str(path))) from None
