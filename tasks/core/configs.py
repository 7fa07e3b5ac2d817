"""The settings of the model and of its training loop (`tasks.core.train`, shared by pretrain and SFT),
apart from their code: pydantic only, no torch. The stage configs extend them and the pipeline config
collects those, so planning a run, or running only data stages, never imports torch (seconds per command).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.core.settings import Device, Precision, device_setting, runtime


class ModelConfig(BaseModel):
    """What `GPT` builds. Unset sizes follow from `depth`; `resolved()` fills them in."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int | None = Field(None, gt=0)  # left unset in stage configs: training stages take it from the tokenizer
    depth: int = Field(4, gt=0)
    width: int | None = Field(None, gt=0)  # default 64 * depth
    n_heads: int | None = Field(None, gt=0)  # default width // 64 (at least 1)
    n_kv_heads: int | None = Field(None, gt=0)  # grouped-query attention; default n_heads
    mlp_hidden: int | None = Field(None, gt=0)  # default 8/3 * width rounded up to a multiple of 64 (SwiGLU)
    max_seq_len: int = Field(512, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = True
    qk_norm: bool = False  # RMSNorm on q and k per head (small-scale stability); not exportable

    def resolved(self) -> ModelConfig:
        """A copy with every derived size filled in: the dims the model actually has."""
        width = self.width if self.width is not None else 64 * self.depth
        n_heads = self.n_heads if self.n_heads is not None else max(1, width // 64)
        n_kv = self.n_kv_heads if self.n_kv_heads is not None else n_heads
        hidden = self.mlp_hidden if self.mlp_hidden is not None else 64 * math.ceil(8 * width / 3 / 64)
        return self.model_copy(update=dict(width=width, n_heads=n_heads, n_kv_heads=n_kv, mlp_hidden=hidden))

    @property
    def head_dim(self) -> int:
        r = self.resolved()
        return r.width // r.n_heads

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        r = self.resolved()
        if min(r.vocab_size or 1, r.depth, r.width, r.n_heads, r.n_kv_heads, r.mlp_hidden, r.max_seq_len) < 1:
            raise ValueError(f"all sizes must be positive: {r}")
        if r.width % r.n_heads or r.n_heads % r.n_kv_heads or (r.width // r.n_heads) % 2:
            raise ValueError(f"need width % n_heads == 0, n_heads % n_kv_heads == 0 and an even head_dim: {r}")
        return self


class TrainConfig(BaseModel):
    """Optimization settings (the pretrain and SFT stage configs extend this)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    batch_size: int = Field(16, gt=0, description="sequences per optimizer step (global, all processes)")
    grad_accum: int = runtime(1, "micro-batches per optimizer step (the same global batch: memory, not math)", gt=0)
    max_steps: int = Field(200, gt=0)
    # 3e-3 (the old default) left a 4.2M base whose first MLP wrote a residual stream ~300x the embedding
    # scale, attention logits up to ~70: SFT from it could not learn (README, "Why the defaults")
    lr: float = Field(1e-3, gt=0, description="peak AdamW learning rate")
    schedule: Literal["wsd", "cosine", "linear"] = "wsd"
    warmup_steps: int = Field(20, ge=0)
    decay_frac: float = Field(0.3, ge=0, le=1, description="WSD: final fraction of steps that decays linearly")
    min_lr_frac: float = Field(0.1, ge=0, le=1, description="LR at the end, as a fraction of lr")
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 = off")
    eval_every: int = runtime(50, "steps between validation losses", gt=0)
    eval_rows: int = Field(64, gt=0, description="validation rows per evaluation")
    checkpoint_every: int = runtime(100, "steps between checkpoints (what a rerun resumes from)", gt=0)
    log_every: int = runtime(10, "steps between logged training losses", gt=0)
    seed: int = 0
    device: Device = device_setting()
    compile: bool = runtime(False, "torch.compile the model")
    nproc: int = runtime(1, "processes; > 1 runs DDP under torchrun (gloo on CPU, nccl on GPU)", gt=0)
    precision: Precision = runtime("auto", "auto: bf16 autocast on CUDA, fp32 on CPU; bf16 or fp32 on any device")
    peak_flops: float | None = runtime(None, "dense bf16 FLOP/s of one device for MFU (default: the GPU's "
                                       "datasheet figure when its name is known)", gt=0)
