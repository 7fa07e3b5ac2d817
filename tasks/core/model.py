"""The language model every stage trains, samples and scores: a Llama-style decoder-only transformer.

Layout = Hugging Face `LlamaForCausalLM` (pre-RMSNorm, rotary positions, SwiGLU MLP, no biases,
optional grouped-query attention), and the parameter names are HF's minus the "model." prefix,
so `flows.export` is a rename. Size is one dial, `depth` (nanochat): width = 64 * depth.

Init: normal(0, 0.02) for every matrix, out projections (o_proj, down_proj) scaled by
1/sqrt(2 * depth) (GPT-2), RMSNorm weights ones. Not nanochat's zero-init: with zero out
projections a fresh model ignores context, which would hide attention bugs from the tests.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tasks.core.configs import ModelConfig
from tasks.core.faults import on_file

WEIGHTS, CONFIG = "model.safetensors", "config.json"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32, scale in the input dtype: HF LlamaRMSNorm's exact order.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # HF Llama convention: the two halves of head_dim, not even/odd pairs
    return torch.cat((-x2, x1), dim=-1)


def rotary(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape [B or 1, 1, T, head_dim] for integer positions [B or 1, T]."""
    # Recomputed per forward (cheap) so a .to(bfloat16) of the model cannot degrade inv_freq.
    exponent = torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim
    freqs = positions[..., None].float() * (1.0 / theta**exponent)
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


class KVCache:
    """Preallocated keys/values per layer, [B, n_kv_heads, max_len, head_dim], plus which slots are real."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.width // cfg.n_heads)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.depth)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.depth)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0  # slots filled so far (the same for every row: padding is explicit)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.width // cfg.n_heads
        self.q_proj = nn.Linear(cfg.width, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.width, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.width, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.width, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def queries_keys(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, n_heads, T, head_dim] and k [B, n_kv_heads, T, head_dim], QK-normed and rotated."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int):
        B, T, _ = x.shape
        q, k = self.queries_keys(x, cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:  # write the new slots, attend over everything filled so far
            end = cache.length + T
            cache.keys[layer][:, :, cache.length : end] = k
            cache.values[layer][:, :, cache.length : end] = v
            k, v = cache.keys[layer][:, :, :end], cache.values[layer][:, :, :end]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.width, cfg.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.width, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.width, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.width, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.width, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config  # as given (what save_model writes); self.dims has every size filled in
        self.dims = cfg = config.resolved()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size is not set")
        self.head_dim = cfg.head_dim
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.width)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                out_proj = name.endswith(("o_proj.weight", "down_proj.weight"))
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.depth) if out_proj else 0.02)

    def forward(self, idx, targets=None, *, ignore_index=-100, loss_mask=None, reduction="mean",
                attn_mask=None, positions=None, segments=None, kv_cache: KVCache | None = None,
                last_only: bool = False):
        """idx [B, T] -> logits [B, T, V], or (logits, loss) when targets are given.

        loss: cross-entropy in fp32 over positions where targets != ignore_index (and loss_mask,
        if given, is true); reduction "mean" (over those positions), "sum", or "none" ([B, T],
        zero elsewhere). attn_mask [B, T] marks real tokens (False = padding, never attended to).
        positions default to each row's count of real tokens before it, so left-padded rows start
        at 0. segments [B, T] (training only): packed examples, numbered in row order; a token attends
        only within its own segment and positions restart at 0 in each, so an example's loss is the
        same packed with others as alone. kv_cache: append these tokens to the cache and attend over
        all its filled slots.
        last_only: logits [B, 1, V] for the final position only (sampling skips the big lm_head matmul).
        """
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        real = attn_mask if attn_mask is not None else torch.ones(B, T, dtype=torch.bool, device=idx.device)
        if kv_cache is not None:
            kv_cache.valid[:, start : start + T] = real
            real = kv_cache.valid[:, : start + T]
        plain = kv_cache is None and attn_mask is None and segments is None  # SDPA's is_causal fast path
        if segments is not None:
            if kv_cache is not None or attn_mask is not None:
                raise ValueError("segments are for packed training rows: no kv_cache or attn_mask with them")
            mask = segment_mask(segments)
            if positions is None:
                positions = segment_positions(segments)
        else:
            if positions is None:
                positions = (torch.arange(T, device=idx.device)[None] if plain
                             else (real.cumsum(-1) - 1).clamp(min=0)[:, start:])
            mask = None if plain else causal_mask(real, start)
        x = self.embed_tokens(idx)
        cos, sin = rotary(positions, self.head_dim, self.dims.rope_theta, x.dtype)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += T
        logits = self.lm_head(self.norm(x[:, -1:] if last_only else x))
        if targets is None:
            return logits
        return logits, token_loss(logits, targets, ignore_index, loss_mask, reduction)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        w = self.embed_tokens.weight
        return KVCache(self.dims, batch_size, max_len, w.device, w.dtype)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, eos_id: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True) -> list[list[int]]:
        """Sample up to max_new_tokens per prompt; returns only the new tokens (eos included, then stop).

        Prompts are left-padded into one batch and prefilled once; with use_cache each later step
        feeds one token per row through the KV cache, without it the whole sequence is re-run (the
        slow reference). Both make the same random draws, so a seeded generator gives the same tokens.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("need at least one prompt and no empty prompt")
        device, B, P = self.embed_tokens.weight.device, len(prompts), max(map(len, prompts))
        idx = torch.zeros(B, P, dtype=torch.long, device=device)
        real = torch.zeros(B, P, dtype=torch.bool, device=device)
        for row, p in enumerate(prompts):
            idx[row, P - len(p):] = torch.tensor(p, device=device)
            real[row, P - len(p):] = True
        new: list[list[int]] = [[] for _ in prompts]
        if max_new_tokens <= 0:
            return new
        cache = self.new_cache(B, P + max_new_tokens) if use_cache else None
        logits = self(idx, attn_mask=real, kv_cache=cache, last_only=True)[:, -1]
        done, ones = [False] * B, torch.ones(B, 1, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            token = sample(logits, temperature, top_k, generator)
            for row, t in enumerate(token.tolist()):
                if not done[row]:
                    new[row].append(t)
                    done[row] = t == eos_id
            if all(done) or step == max_new_tokens - 1:
                break
            if use_cache:  # finished rows keep decoding (their tokens are dropped): fixed batch shape
                logits = self(token[:, None], attn_mask=ones, kv_cache=cache, last_only=True)[:, -1]
            else:
                idx, real = torch.cat([idx, token[:, None]], 1), torch.cat([real, ones], 1)
                logits = self(idx, attn_mask=real, last_only=True)[:, -1]
        return new

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Unique parameters (a tied matrix counts once); exclude_embedding drops the input table."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if exclude_embedding else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), the PaLM / nanoGPT estimate used for MFU.

        6 * N for the weight matmuls (2 forward + 4 backward per weight), N = non-embedding params
        plus the lm_head matmul when it is tied (the lookup is free, the head matmul is not); plus
        12 * depth * width * seq_len for the attention scores and weighted sum (q@k and att@v).
        """
        d = self.dims
        n = self.num_params(exclude_embedding=True) + (d.vocab_size * d.width if d.tie_embeddings else 0)
        return 6 * n + 12 * d.depth * d.width * seq_len

    def configure_optimizer(self, lr: float, weight_decay: float, betas=(0.9, 0.95), fused: bool = False):
        """AdamW; weight decay only on matrices (2-D), never on the embedding (tied or not) or norms."""
        embedding = self.embed_tokens.weight
        decay = [p for p in self.parameters() if p.dim() >= 2 and p is not embedding]
        no_decay = [p for p in self.parameters() if p.dim() < 2 or p is embedding]
        groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


@torch.no_grad()
def activation_scale(model: GPT, idx: torch.Tensor) -> dict[str, float]:
    """Two signs that a model has lost its plasticity, on token rows idx [B, T] (plain causal rows).

    residual_growth: RMS of the residual stream after the last block over the RMS of the token
    embeddings (a fresh model: ~3); max_attention_logit: the largest q.k / sqrt(head_dim) of any head
    (fresh: ~4). The default 4.2M model pretrained at lr 3e-3 had 303 and 67 (with QK-norm: 312 and 9)
    and SFT from either did not learn two-digit addition; at 1e-3 it had 13 and 20, and SFT learned it.
    """
    T = idx.shape[1]
    x = model.embed_tokens(idx)
    embed_rms = x.pow(2).mean().sqrt()
    cos, sin = rotary(torch.arange(T, device=idx.device)[None], model.head_dim, model.dims.rope_theta, x.dtype)
    future = torch.ones(T, T, dtype=torch.bool, device=idx.device).triu(1)
    largest = 0.0
    for block in model.layers:
        a = block.self_attn
        q, k = a.queries_keys(block.input_layernorm(x), cos, sin)
        k = k.repeat_interleave(a.n_heads // a.n_kv_heads, dim=1)
        logits = (q @ k.transpose(-1, -2)).float() / math.sqrt(a.head_dim)
        largest = max(largest, float(logits.masked_fill(future, 0).abs().max()))
        x = block(x, cos, sin, None, None, 0)
    return {"residual_growth": float(x.pow(2).mean().sqrt() / embed_rms), "max_attention_logit": largest}


def causal_mask(real: torch.Tensor, start: int) -> torch.Tensor:
    """[B, 1, T, S] boolean (True = may attend) for queries at slots start.. over keys 0..S-1."""
    S = real.shape[1]
    q_slot = torch.arange(start, S, device=real.device)[:, None]
    k_slot = torch.arange(S, device=real.device)[None]
    # A query always sees itself, so a pad query never has an all-masked row (NaN that would leak).
    return ((k_slot <= q_slot) & (real[:, None, :] | (k_slot == q_slot)))[:, None]


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] boolean: causal, and only within the query's segment (a block-diagonal causal mask)."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return (causal & (segments[:, :, None] == segments[:, None, :]))[:, None]


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """[B, T] position of each token within its segment (0 at each segment's first token)."""
    T = segments.shape[1]
    index = torch.arange(T, device=segments.device).expand_as(segments)
    first = torch.ones_like(segments, dtype=torch.bool)
    first[:, 1:] = segments[:, 1:] != segments[:, :-1]
    starts = torch.where(first, index, 0).cummax(-1).values
    return index - starts


def token_loss(logits, targets, ignore_index=-100, loss_mask=None, reduction="mean"):
    """Cross-entropy in fp32 over kept positions (targets != ignore_index and loss_mask)."""
    keep = targets != ignore_index
    if loss_mask is not None:
        keep = keep & loss_mask.bool()
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.masked_fill(~keep, 0).flatten(), reduction="none")
    loss = torch.where(keep, loss.view_as(targets), 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / keep.sum().clamp(min=1)
    raise ValueError(f"reduction must be mean, sum or none, not {reduction!r}")


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator=None) -> torch.Tensor:
    """Next token per row from logits [B, V]; temperature 0 is greedy (no random draw)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # Inverse CDF with one uniform draw per row: exact, and ~15x cheaper on CPU than torch.multinomial
    # (which draws an exponential per vocabulary entry). right=True never picks a zero-probability token.
    cdf = logits.softmax(-1).cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1).squeeze(-1)


def save_model(model: GPT, directory: str | Path) -> Path:
    """`model.safetensors` (a tied matrix stored once, as the embedding) + `config.json`. No pickle."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.dims.tie_embeddings:
        del state["lm_head.weight"]
    with on_file(directory / WEIGHTS):
        save_file(state, directory / WEIGHTS, metadata={"format": "pt"})
    (directory / CONFIG).write_text(model.config.model_dump_json(indent=2) + "\n")
    return directory


def load_weights(model: GPT, directory: str | Path) -> GPT:
    """Load `model.safetensors` into an existing model (a tied lm_head is not in the file)."""
    path = Path(directory) / WEIGHTS
    with on_file(path):
        missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    if unexpected or set(missing) != ({"lm_head.weight"} if model.dims.tie_embeddings else set()):
        raise ValueError(f"{path} does not match its config: missing {missing}, unexpected {unexpected}")
    return model


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> GPT:
    directory = Path(directory)
    with on_file(directory / CONFIG):
        model = GPT(ModelConfig.model_validate_json((directory / CONFIG).read_text()))
    return load_weights(model, directory).to(device)
