"""Data selection: pretraining on PreSelect's top fraction against the quality filter and a random
fraction, at the same token budget, scored downstream.

For each method (`select.method` preselect, quality, random; the config's fraction for preselect
and random, the quality filter's own share for quality) the select stage picks documents from the
quality output; a tokenizer and packing follow as in the pipeline; then, per seed
(`pretrain.seed`), pretraining with the same steps x batch x seq_len for every method, a fixed
short SFT (`sft` settings, same for all) and two downstream scores:

- `eval_pass_at_1`: greedy pass@1 on the held-out eval prompts after SFT (the report card's number);
- `target_bpc`: the pretrained model's bits per character on the held-out eval prompts rendered as
  question + "\\nAnswer: " + answer (`tasks.preselect.target_text`; never used to select, which
  reads the train split), lower = better; per character, so models with different tokenizers compare.

Every stage goes through the config's store (content-addressed: a rerun reuses what exists), so
`select`, `tokenizer` and `pack` of the preselect arm are the pipeline's own outputs when the
settings match. The pretraining size defaults to a reduced one (`--pretrain` overrides, below):
six pretraining + SFT + eval runs took 29 minutes on 2 CPU cores shared with other jobs. Arms
can run side by side (`--methods random` in a second process); a last run then prints all from the store.

Prints ONE JSON object:
  {"settings": {...}, "preselect": {heldout_auc, benchmark per reference, ...},
   "runs": {method: [{"seed", "eval_pass_at_1", "eval_pass_at_1_by_task", "target_bpc", "pretrain_val_loss"}, ...]},
   "selection": {method: {docs_kept, chars_kept, kept_char_fraction, share of chars per source}},
   "summary": {method: {"eval_pass_at_1": mean, "target_bpc": mean}}}

  python benchmarks/selection.py                           # default config, seeds 0 1
  python benchmarks/selection.py --config configs/tiny.yaml --seeds 0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flows.config import load_config  # noqa: E402
from flows.pipeline import Plan, make_plan  # noqa: E402
from tasks import eval as eval_stage  # noqa: E402
from tasks import pack, pretrain, select, sft, tokenizer  # noqa: E402
from tasks.core.rollout import load_policy  # noqa: E402
from tasks.core.stage import Stage, StageConfig, run_stage  # noqa: E402
from tasks.core.store import Artifact, Store  # noqa: E402
from tasks.preselect import PreselectConfig, corpus_bpc, target_texts  # noqa: E402

METHODS = ("preselect", "quality", "random")
# The reduced pretraining of every arm (same token budget for all): depth 2 instead of 4.
PRETRAIN = ["pretrain.model.depth=2", "pretrain.max_steps=200", "pretrain.eval_every=100", "pretrain.checkpoint_every=200"]


class Runner:
    """Runs stages through the config's stores (cache hits where they already hold the output)."""

    def __init__(self, cfg):
        self.stores = {"data": Store(cfg.run.data_root), "models": Store(cfg.run.models_root)}

    def __call__(self, stage: Stage, cfg: StageConfig, **inputs: Artifact) -> Artifact:
        return run_stage(stage, cfg, inputs, self.stores[stage.store]).artifact

    def upstream(self, plan: Plan, names: list[str]) -> dict[str, Artifact]:
        """The plan's stages needed for `names`, in DAG order."""
        out: dict[str, Artifact] = {}
        for name in plan.needed(names):
            p = plan.stages[name]
            out[name] = self(p.stage, p.cfg, **{k: out[v] for k, v in p.inputs.items()})
        return out


def source_shares(selected: Artifact) -> dict[str, float]:
    df = pl.concat([pl.read_parquet(f, columns=["text", "source"]) for f in selected.files("documents")])
    per = df.group_by("source").agg(pl.col("text").str.len_chars().sum().alias("chars")).sort("source")
    total = per["chars"].sum()
    return {s: round(c / total, 4) for s, c in per.iter_rows()}


def run_method(cfg, run: Runner, up: dict, method: str, seeds: list[int], target: list[str]) -> tuple[dict, list[dict]]:
    inputs = {"documents": up["quality"], **({"scores": up["preselect"]} if method == "preselect" else {})}
    selected = run(select.STAGE, cfg.select.model_copy(update={"method": method}), **inputs)
    bpe = run(tokenizer.STAGE, cfg.tokenizer, documents=selected)
    packed = run(pack.STAGE, cfg.pack, documents=selected, tokenizer=bpe)
    m = selected.manifest["metrics"]
    info = {"docs_kept": m["docs_kept"], "chars_kept": m["chars_kept"], "kept_char_fraction": round(m["kept_char_fraction"], 4),
            "chars_per_source": source_shares(selected), "train_tokens": packed.manifest["metrics"]["train_tokens"]}
    runs = []
    for seed in seeds:
        start = time.monotonic()
        base = run(pretrain.STAGE, cfg.pretrain.model_copy(update={"seed": seed}), packed=packed, tokenizer=bpe)
        tuned = run(sft.STAGE, cfg.sft.model_copy(update={"seed": seed}), model=base, prompts=up["prompts"], tokenizer=bpe)
        ev = run(eval_stage.STAGE, cfg.eval, model=tuned, prompts=up["prompts"]).manifest["metrics"]
        model, tok = load_policy(base)
        tok.encode_special_tokens = True
        runs.append({
            "seed": seed, "eval_pass_at_1": ev["pass_at_1"],
            "eval_pass_at_1_by_task": {k.split(".", 1)[1]: v for k, v in ev.items() if k.startswith("pass_at_1.")},
            "target_bpc": round(corpus_bpc(model, tok, target, 32, method), 4),
            "pretrain_val_loss": base.manifest["metrics"]["val_loss"],
        })
        print(f"{method} seed {seed}: eval pass@1 {ev['pass_at_1']:.3f}, target bpc {runs[-1]['target_bpc']:.4f} "
              f"({time.monotonic() - start:.0f}s)", file=sys.stderr)
    return info, runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--set", action="append", default=[], help="stage.field=value override (repeatable), after --pretrain")
    p.add_argument("--pretrain", nargs="*", default=PRETRAIN, help="overrides of every arm's pretraining (same for all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = p.parse_args()
    start = time.monotonic()
    cfg = load_config(args.config, [*args.pretrain, "select.method=preselect", *args.set])
    run = Runner(cfg)
    up = run.upstream(make_plan(cfg), ["preselect", "prompts"])
    # held-out: the eval prompts (selection only ever saw the train split)
    target = target_texts(PreselectConfig(target_prompts=10**9), {"target": up["prompts"]}, split="eval")
    selection, runs = {}, {}
    for method in args.methods:
        selection[method], runs[method] = run_method(cfg, run, up, method, args.seeds, target)
    ps = up["preselect"].manifest["metrics"]
    summary = {m: {"eval_pass_at_1": round(float(np.mean([r["eval_pass_at_1"] for r in rs])), 4),
                   "target_bpc": round(float(np.mean([r["target_bpc"] for r in rs])), 4)} for m, rs in runs.items()}
    pre = cfg.pretrain
    print(json.dumps({
        "settings": {"config": args.config, "overrides": [*args.pretrain, *args.set], "seeds": args.seeds,
                     "fraction": cfg.select.fraction, "token_budget": pre.max_steps * pre.batch_size * cfg.pack.seq_len,
                     "target_prompts": len(target), "sft_steps": cfg.sft.max_steps, "seconds": round(time.monotonic() - start)},
        "preselect": {k: v for k, v in ps.items() if k.split(".")[0] in (
            "heldout_auc", "label_gap", "positives", "sample_docs", "target_bpc", "benchmark", "mean_strength")},
        "selection": selection, "runs": runs, "summary": summary,
    }, indent=1))


if __name__ == "__main__":
    main()
