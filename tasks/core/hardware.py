"""What the accelerator can do: its dense bf16 peak (for MFU), the training FLOPs count, and the
precision a device trains in.

MFU = achieved FLOPs / peak FLOPs, with achieved = tokens/s x FLOPs per token (`GPT.flops_per_token`:
6 x the matmul parameters plus the attention scores, nanochat's and PaLM's count) and the peak the
GPU's DENSE bf16 tensor-core figure from its datasheet, never the "with sparsity" figure (twice as
large, and what most spec sheets print first).

GPU names are matched as whole words against `torch.cuda.get_device_name()`, variant first: "NVIDIA
L40S" is not an L40 nor an L4, "H100 PCIe" and "H100 NVL" are not the SXM part, and a GPU missing
from the table gets no MFU (with a log line) rather than another card's peak. A user sets the peak
of any other device with the training stage's `peak_flops` setting.
"""

from __future__ import annotations

import re
from contextlib import nullcontext

import torch

from tasks.core.settings import Precision

# (whole-word pattern, dense bf16 FLOP/s per GPU), most specific first; the datasheet's sparse figure / 2
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    (r"GB200", 2.5e15),
    (r"B200", 2.25e15),
    (r"B100", 1.75e15),
    (r"H200 NVL", 835e12),
    (r"H200|GH200", 989e12),            # H200 SXM; GH200's Hopper GPU is the SXM part
    (r"H100 (PCIe|PCIE)", 756e12),
    (r"H100 NVL", 835e12),
    (r"H100", 989e12),                 # "H100 80GB HBM3", "H100 SXM5 ...": the SXM part
    (r"H800 (PCIe|PCIE)", 756e12),
    (r"H800", 989e12),
    (r"H20", 148e12),
    (r"A100|A800", 312e12),            # SXM and PCIe share the peak
    (r"A30", 165e12),
    (r"L40S", 362e12),
    (r"L40", 181e12),
    (r"L4", 121e12),
    (r"A10", 125e12),                  # not A10G (AWS's variant publishes no tensor peak): none
    (r"MI325X|MI300X", 1307e12),       # AMD Instinct under ROCm reports these names
    (r"MI250X", 383e12),
]


def lookup_peak(name: str) -> float | None:
    """The dense bf16 peak of a GPU by its device name (whole-word match, first hit), or None."""
    for pattern, peak in PEAK_BF16_FLOPS:
        if re.search(rf"(?<![A-Za-z0-9])(?:{pattern})(?![A-Za-z0-9])", name):
            return peak
    return None


def peak_flops(device: torch.device, override: float | None = None) -> float | None:
    """The peak MFU is measured against: `override` when set (any device), else the table's for a
    CUDA device, else None (no MFU on CPU: its peak depends on the SIMD units and clocks in use)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    return lookup_peak(torch.cuda.get_device_name(device))


def mfu(tokens_per_s: float, flops_per_token: float, peak: float, world: int = 1) -> float:
    """Model FLOPs utilisation of `world` devices of `peak` FLOP/s each."""
    return tokens_per_s * flops_per_token / (peak * world)


def use_bf16(device: torch.device, precision: Precision) -> bool:
    """auto: bf16 autocast on CUDA, fp32 elsewhere (CPU bf16 matmuls are slower than fp32 on most CPUs)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: Precision = "auto"):
    """The forward pass's context: bf16 autocast (weights and optimizer stay fp32) or nothing."""
    if use_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
