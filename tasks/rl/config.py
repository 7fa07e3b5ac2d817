"""GRPO's settings apart from its code: pydantic only, no torch, so planning a run never imports torch."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from tasks.core.rollout import Sampling
from tasks.core.settings import Band, Device, device_setting, runtime
from tasks.rl.grpo import DEFAULT_BAND, kept_counts


class GRPOConfig(Sampling):
    """GRPO settings under TRL's GRPOConfig names where TRL has the concept (the RL stage extends this); the
    rollouts' sampling settings (temperature, top_k, max_completion_length, batch_size, seed) are `Sampling`'s."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_steps: int = Field(16, gt=0, description="optimizer steps, one batch of groups each")
    max_generated_samples: int | None = Field(None, gt=0, description="generation budget: stop once this many "
                                              "completions were sampled (compare filters at equal cost)")
    batch_prompts: int = Field(16, gt=0, description="groups (prompts) per optimizer step")
    num_generations: int = Field(8, ge=2, description="G, completions per prompt (TRL default 8; DAPO uses 16)")
    lr: float = Field(2e-5, gt=0, description="AdamW learning rate (5e-4 collapsed a model that had learned its "
                      "tasks within 20 steps; from the default SFT model, 16 steps at 5e-5 cost 0.07 held-out, "
                      "at 2e-5 0.03)")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 = off")
    epsilon: float = Field(0.2, ge=0, description="lower clip of the ratio, 1 - epsilon (PPO, GRPO: 0.2)")
    epsilon_high: float = Field(0.28, ge=0, description="upper clip, 1 + epsilon_high; DAPO's clip-higher recommends "
                                "0.28 (TRL defaults it to epsilon)")
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = Field(
        "dapo", description="grpo: mean per sequence, then over sequences (DeepSeekMath; biased to short answers); "
                            "dr_grpo: sum / (sequences x max_completion_length) (Dr. GRPO, removes that bias); dapo: "
                            "mean over all tokens of the batch (DAPO's token-level loss, TRL's default)")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="divide advantages by the group's std (GRPO), the batch's, or nothing (Dr. GRPO "
                             "recommends none: the std favours too easy and too hard prompts)")
    beta: float = Field(0.0, ge=0, description="k3 KL penalty to the frozen start model; 0 (no reference model) as "
                        "DAPO and Dr. GRPO recommend, TRL's default")
    num_iterations: int = Field(1, gt=0, description="updates per batch (GRPO's mu); 1 = fully on-policy, the ratio "
                                "is exactly 1 (TRL default)")
    mask_truncated_completions: bool = Field(True, description="no loss on completions cut at max_completion_length "
                                             "(DAPO's overlong filtering recommends it)")
    format_reward: float = Field(0.0, ge=0, description="training-reward bonus for a completion that contains "
                                 "'Answer:' (in the advantages only: pass rates and the filter use the verifier alone)")
    filter: Literal["none", "mixed", "balanced", "variance"] = Field(
        "balanced", description="none: plain GRPO; mixed: 0 < pass rate < 1 (DAPO's dynamic sampling); balanced: "
                                "band[0] < pass rate < band[1] (Online Difficulty Filtering); variance: the group's "
                                "verifier rewards are not all equal (verl's filter_groups on the reward: keeps "
                                "partial-credit signal that full-credit pass rates miss)")
    band: Band = Field(DEFAULT_BAND, description="the balanced filter's pass-rate band, both ends excluded; at G = 8 "
                       "(0.2, 0.8) keeps k = 2..6 correct of 8 (pass rates 0.25..0.75), where (0.1, 0.9) would keep "
                       "k = 1..7, the mixed filter's groups")
    allow_mixed_band: bool = Field(False, description="accept a balanced band that keeps every k of 1..G-1, i.e. "
                                   "the same groups as filter mixed")
    oversample: float = Field(2.0, ge=1, description="prompts drawn per round = ceil(groups still missing x "
                              "oversample)")
    max_generation_rounds: int = Field(4, gt=0, description="rounds of drawing per step at most (verl: "
                                       "max_num_gen_batches; DAPO caps it too)")
    eval_every: int = runtime(10, "steps between held-out greedy pass@1 checks", gt=0)
    checkpoint_every: int = runtime(10, "steps between checkpoints (what a rerun resumes from)", gt=0)
    history_samples: int = Field(2, ge=0, description="completions per group stored in the history table")
    device: Device = device_setting()

    @model_validator(mode="after")
    def _band_is_intermediate(self) -> GRPOConfig:
        """A balanced band must keep some k of G, and not exactly the k that filter mixed keeps."""
        if self.filter != "balanced":
            return self
        G, band = self.num_generations, list(self.band)
        kept = kept_counts(self.band, G)
        if not kept:
            raise ValueError(f"rl.band {band} keeps no pass rate k/{G} at G={G}: widen it")
        if kept == list(range(1, G)) and not self.allow_mixed_band:
            x = 1.5 / G  # halfway between k = 1 and k = 2: drops k = 1 and k = G-1
            narrower = f"narrow it (e.g. rl.band=[{x:.3g}, {1 - x:.3g}] keeps {_counts(2, G - 2)}), " if G >= 4 else ""
            raise ValueError(f"rl.band {band} keeps {_counts(1, G - 1)} of G={G}, exactly what filter mixed keeps: "
                             f"{narrower}use rl.filter=mixed, or set rl.allow_mixed_band=true")
        return self


def _counts(first: int, last: int) -> str:
    return f"k={first}" if first == last else f"k={first}..{last}"
