"""Identity versus runtime: which settings of a stage config go into its key.

A stage's key hashes what changes its output (its identity). How it is run (device, process count,
gradient accumulation, logging, checkpoint and eval cadence) is a `runtime` field: recorded in the
manifest and MLflow, never hashed, so changing it reruns nothing. A setting that changes the result
(a learning rate, a seed, the generation batch size, which decides each sample's random draws) stays
in the identity. Runtime settings leave the result the same in meaning; on CPU its bytes can still
differ with the process count or gradient accumulation (float sums run in another order).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field
from pydantic.fields import FieldInfo

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "bf16", "fp32"]  # what a training device computes in (tasks.core.hardware)


def _valid_band(band: tuple[float, float]) -> tuple[float, float]:
    low, high = band
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"need 0 <= low < high <= 1, got {list(band)}")
    return band


Band = Annotated[tuple[float, float], AfterValidator(_valid_band)]  # a pass-rate band: low < p < high


def runtime(default: Any, description: str = "", **constraints: Any) -> Any:
    """A config field that says how a stage runs, not what it computes (module docstring)."""
    return Field(default, description=description, json_schema_extra={"runtime": True}, **constraints)


def _is_runtime(field: FieldInfo) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("runtime"))


def _drop_runtime(model: BaseModel, dumped: dict) -> dict:
    out = {}
    for name, field in type(model).model_fields.items():
        if _is_runtime(field):
            continue
        value, data = getattr(model, name), dumped[name]
        if isinstance(value, BaseModel):
            data = _drop_runtime(value, data)
        elif isinstance(value, (list, tuple)):
            data = [_drop_runtime(v, d) if isinstance(v, BaseModel) else d for v, d in zip(value, data)]
        out[name] = data
    return out


def identity(config: BaseModel) -> dict:
    """The settings that change a stage's output: the config as JSON minus its `runtime` fields."""
    return _drop_runtime(config, config.model_dump(mode="json"))


def runtime_settings(config: BaseModel, prefix: str = "") -> dict[str, Any]:
    """The `runtime` fields of a config (nested ones under dotted names), as JSON values."""
    dumped = config.model_dump(mode="json")
    out = {}
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        if _is_runtime(field):
            out[prefix + name] = dumped[name]
        elif isinstance(value, BaseModel):
            out.update(runtime_settings(value, f"{prefix}{name}."))
    return out


def device_setting() -> Any:
    """The `device` field of a stage that runs a model: auto is cuda when available, else cpu."""
    return runtime("auto", description="auto: cuda when available, else cpu")
