"""The CUDA-only branches' logic, checked on CPU so that a GPU run can fail only for GPU reasons:
the peak-FLOPs table (whole-name matching, dense figures, a user's override), the FLOPs count MFU
divides (nanochat's 6N + attention formula, and torch's own FLOP counter), bf16 autocast, fused
AdamW, torch.compile of the model, and benchmarks/gpu_check.sh on a machine without CUDA."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tasks.core.hardware import autocast, lookup_peak, mfu, peak_flops, use_bf16
from tasks.core.model import GPT, ModelConfig
from tasks.core.train import TrainConfig, TrainSpec, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),     # SXM
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA H20", 148e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA L40S", 362e12),               # not the L40, not the L4
    ("NVIDIA L40", 181e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA A10", 125e12),
    ("NVIDIA B200", 2.25e15),
    ("NVIDIA GB200", 2.5e15),
    ("AMD Instinct MI300X", 1307e12),
    ("NVIDIA A10G", None),                  # no published tensor peak: no MFU rather than the A10's
    ("NVIDIA GeForce RTX 4090", None),
    ("NVIDIA RTX 6000 Ada Generation", None),
    ("Tesla T4", None),
])
def test_peak_flops_match_whole_names(name, peak):
    assert lookup_peak(name) == peak


def test_peak_flops_override_and_cpu():
    cpu = torch.device("cpu")
    assert peak_flops(cpu) is None
    assert peak_flops(cpu, 2e12) == 2e12
    assert mfu(1000.0, 6e9, 1e13) == pytest.approx(0.6)
    assert mfu(1000.0, 6e9, 1e13, world=2) == pytest.approx(0.3)
    assert TrainConfig(peak_flops=4e14).peak_flops == 4e14


@pytest.mark.parametrize("tie", [False, True])
def test_flops_per_token_is_nanochats_count(tie):
    """nanochat's estimate_flops: 6 x (parameters - input embedding) + 12 x layers x heads x head_dim x seq;
    with tied embeddings the lm_head matmul is still done once per token, so the count is the same."""
    cfg = ModelConfig(vocab_size=1000, depth=3, width=96, n_heads=4, max_seq_len=128, tie_embeddings=tie).resolved()
    model = GPT(cfg)
    seq = 128
    head_matmul = cfg.vocab_size * cfg.width if tie else 0  # a tied head shares the embedding's parameters
    nanochat = (6 * (sum(p.numel() for p in model.parameters()) - model.embed_tokens.weight.numel() + head_matmul)
                + 12 * cfg.depth * cfg.n_heads * (cfg.width // cfg.n_heads) * seq)
    assert model.flops_per_token(seq) == nanochat
    untied = GPT(cfg.model_copy(update={"tie_embeddings": False}))
    assert model.flops_per_token(seq) == untied.flops_per_token(seq)


def test_flops_per_token_matches_torch_flop_counter():
    """Forward + backward of one batch, counted by torch: the weight matmuls are exactly 6 x the matmul
    parameters per token. The formula's N also holds the norm weights (0.3% here, less in bigger models), and
    torch does not count CPU attention kernels, whose 12 x layers x width x seq term is nanochat's (above)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, depth=2, width=64, max_seq_len=64).resolved()
    model = GPT(cfg)
    tokens, seq = 128, 64
    x = torch.randint(0, 512, (2, seq + 1))
    with FlopCounterMode(display=False) as counter:
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
    counted = counter.get_flop_counts()["Global"]
    norms = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    attention = 12 * cfg.depth * cfg.width * seq
    weights = model.flops_per_token(seq) - attention
    assert counted[torch.ops.aten.mm] == (weights - 6 * norms) * tokens
    assert 6 * norms < 0.005 * weights


def test_bf16_autocast_on_cpu():
    cpu = torch.device("cpu")
    assert not use_bf16(cpu, "auto") and use_bf16(cpu, "bf16") and use_bf16(torch.device("cuda"), "auto")
    assert not use_bf16(torch.device("cuda"), "fp32")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=300, depth=1, width=32, max_seq_len=32))
    x = torch.randint(0, 300, (2, 17))
    with autocast(cpu, "bf16"):
        logits, loss = model(x[:, :-1], x[:, 1:])
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32  # the loss is taken in fp32
    with autocast(cpu, "auto"):
        assert model(x).dtype == torch.float32
    _, reference = model(x[:, :-1], x[:, 1:])
    assert float(loss) == pytest.approx(float(reference), abs=0.05)


def _spec(tmp_path: Path, **cfg) -> TrainSpec:
    rows = np.random.default_rng(0).integers(0, 300, (64, 33), dtype=np.int32)
    np.save(tmp_path / "train.npy", rows)
    np.save(tmp_path / "val.npy", rows[:8])
    return TrainSpec(cfg=TrainConfig(batch_size=8, max_steps=12, warmup_steps=2, eval_every=12, eval_rows=8,
                                     checkpoint_every=100, log_every=4, device="cpu", **cfg),
                     model=ModelConfig(vocab_size=300, depth=1, width=32, max_seq_len=32),
                     train_path=str(tmp_path / "train.npy"), val_path=str(tmp_path / "val.npy"), pad_id=-1,
                     out=str(tmp_path / "out"), work=str(tmp_path / "work"))


def test_training_loop_in_bf16_and_with_a_peak(tmp_path):
    """The loop's bf16 branch runs (on CPU here) and learns like fp32; a configured peak gives MFU rows."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    fp32 = train(_spec(tmp_path / "a"))
    bf16 = train(_spec(tmp_path / "b", precision="bf16", peak_flops=1e11))
    assert bf16["train_loss"] < bf16["history"][0]["loss"]
    assert bf16["val_loss"] == pytest.approx(fp32["val_loss"], abs=0.1)
    rows = [h for h in bf16["history"] if "tokens_per_s" in h]
    assert rows and all(h["mfu"] == pytest.approx(mfu(h["tokens_per_s"], GPT(_spec(tmp_path).model).flops_per_token(32),
                                                      1e11)) for h in rows)
    assert fp32["mfu"] is None and bf16["mfu"] > 0


def test_fused_adamw_matches_the_plain_one():
    """CUDA trains with fused AdamW: on CPU the fused kernel must give the same update."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, depth=1, width=32, max_seq_len=32)
    models = [GPT(cfg), GPT(cfg)]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randint(0, 300, (4, 17))
    for model, fused in zip(models, (False, True)):
        opt = model.configure_optimizer(1e-2, 0.1, fused=fused)
        for _ in range(3):
            _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_model_matches_eager():
    """torch.compile of the model (inductor on CPU): same loss and gradients as eager."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=300, depth=1, width=32, max_seq_len=32))
    x = torch.randint(0, 300, (2, 17))
    _, eager = model(x[:, :-1], x[:, 1:])
    eager.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    _, compiled = torch.compile(model)(x[:, :-1], x[:, 1:])
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_gpu_check_says_no_cuda_in_one_line():
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device here")


def test_gpu_config_is_the_dag_sized_for_one_gpu():
    """configs/gpu.yaml loads, and sizes a GPT-2-small class model on CUDA with compile and batched RL."""
    from flows.config import load_config
    from tasks.rl.grpo import kept_counts
    from tasks.core.settings import identity

    cfg = load_config(ROOT / "configs" / "gpu.yaml")
    dims = cfg.pretrain.model.model_copy(update={"vocab_size": cfg.tokenizer.vocab_size}).resolved()
    model = GPT(dims)
    assert (dims.depth, dims.width, dims.n_heads) == (12, 768, 12)
    assert 80e6 < model.num_params(exclude_embedding=True) < 90e6  # GPT-2 small: 85M in the blocks
    assert cfg.pack.seq_len == dims.max_seq_len == 1024
    assert cfg.pretrain.device == cfg.sft.device == cfg.rl.device == "cuda" and cfg.pretrain.compile
    assert kept_counts(cfg.rl.band, cfg.rl.num_generations) == list(range(4, 13))
    assert cfg.rl.batch_size >= cfg.rl.batch_prompts * cfg.rl.num_generations  # one generation call per round
    # how it runs is not what it computes: a CPU copy of a GPU stage has the same key
    assert identity(cfg.pretrain) == identity(cfg.pretrain.model_copy(update={"device": "cpu", "compile": False,
                                                                             "precision": "fp32", "nproc": 8}))
