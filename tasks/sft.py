"""SFT: the base model learns to answer, on chat-formatted training prompts (loss on the completion).

Each example is `prompt_ids + completion + <|end|>` (tasks.core.chat), with a loss mask that is 1
only on the completion and the closing <|end|>: prompt tokens give no loss and no gradient.
Examples are packed whole into rows (never split, so every completion sees its question; best fit
decreasing, so rows are nearly full); rows are padded at the end. Packed examples are kept apart, as
TRL's padding-free packing does: each attends only to itself, with positions from 0 (a block-diagonal
causal mask), so an example's loss is the same packed with others as alone. Prompts the base model
already masters (its pass rate in the difficulty table reaches `max_pass_rate`) are left out.
Training reuses the pretraining loop, with its own schedule, checkpoints, resume, metrics and
logged model.
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from tasks.core.chat import completion_text, example_ids
from tasks.core.configs import TrainConfig
from tasks.core.fit import run_training, save_array
from tasks.core.outputs import load_pass_rates, load_prompts, model_config
from tasks.core.settings import runtime
from tasks.core.stage import Stage, StageConfig, StageContext, StageError, log
from tasks.core.store import Artifact
from tasks.core.tokens import BOS, PAD, below_fraction, doc_hash, load_tokenizer, special_ids, tokenizer_path

VERSION = 2  # 2: packed examples kept apart (block-diagonal mask, positions per example), best-fit packing


class SFTConfig(StageConfig, TrainConfig):
    # SFT's own defaults: a lower LR with linear decay (small-LM SFT studies: larger batches with a lower LR tend to win)
    # (a field redeclared here must restate TrainConfig's bounds: pydantic replaces the whole field)
    batch_size: int = Field(32, gt=0, description="sequences per optimizer step (global, all processes)")
    max_steps: int = Field(400, gt=0)
    lr: float = Field(1e-3, gt=0)
    schedule: Literal["wsd", "cosine", "linear"] = "linear"
    warmup_steps: int = Field(10, ge=0)
    eval_every: int = runtime(50, "steps between validation losses", gt=0)
    seq_len: int | None = Field(96, gt=0, description="row length (None: the base model's max_seq_len); chat "
                                "examples are short: rows of 96 tokens pack 1-4 of them")
    val_fraction: float = Field(0.02, gt=0, lt=1, description="training prompts held out for SFT validation loss")
    use_solutions: bool = Field(True, description="train on the worked solution where the task has one")
    max_pass_rate: float | None = Field(0.9, gt=0, le=1, description="drop prompts the base model solves at least this often")
    # the default tasks' tokens per example differ 4x (addition 19, aiw 66, reversal 57); measured at 400 steps,
    # addition 3x and aiw 0.5x lift the held-out mean 0.430 -> 0.573 (aiw 0.96 -> 0.95, addition 0.14 -> 0.63)
    task_weights: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: {"basic_arithmetic": 3.0, "aiw": 0.5},
        description="task -> times each of its training examples is packed (a fraction: a hash-chosen share once "
                    "more; tasks not named: 1; names of absent tasks are ignored): the mixture of the step budget")


def pack_examples(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int):
    """Whole examples into rows of seq_len+1 tokens; returns tokens, mask, dropped (longer than a row).

    Best fit decreasing: longest first, each into the row with the least room that still holds it, so rows
    come out nearly full (in input order, one open row at a time, the default tasks filled 60% of each
    row). Order within a row does not matter: SFT keeps packed examples apart (segments).
    """
    width, dropped = seq_len + 1, 0
    rows: list[list[int]] = []  # example indices per row
    room: list[tuple[int, int]] = []  # (free tokens, row), sorted: the first that fits is the best fit
    for i in sorted(range(len(examples)), key=lambda i: -len(examples[i][0])):  # stable: ties in input order
        n = len(examples[i][0])
        if n > width:
            dropped += 1
            continue
        at = bisect.bisect_left(room, (n, -1))
        if at == len(room):
            rows.append([i])
            free, row = width - n, len(rows) - 1
        else:
            free, row = room.pop(at)
            rows[row].append(i)
            free -= n
        if free:
            bisect.insort(room, (free, row))
    tokens = np.full((len(rows), width), pad_id, np.int32)
    masks = np.zeros((len(rows), width), np.int8)
    for r, members in enumerate(rows):
        ids = [t for i in members for t in examples[i][0]]
        tokens[r, : len(ids)] = ids
        masks[r, : len(ids)] = [m for i in members for m in examples[i][1]]
    return tokens, masks, dropped


def mixed(rows: list[dict], weights: dict[str, float], seed: int) -> list[dict]:
    """Each row of a task of weight w int(w) times, plus once more for a hash-chosen share w - int(w) of them
    (data-mixture weights by repetition, as pretraining mixtures upsample small sources)."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        of_task = [r for r in rows if r["task"] == task]
        w = weights.get(task, 1.0)
        out += of_task * int(w)
        if w > int(w):
            once_more = below_fraction(doc_hash([r["id"] for r in of_task], seed + 1), w - int(w))
            out += [r for r, m in zip(of_task, once_more) if m]
    return out


def count_too_long(rows: list[dict], examples: list[tuple[list[int], list[int]]], seq_len: int, split: str,
                   max_seq_len: int) -> dict[str, int]:
    """Examples longer than a row, per task (`<split>_too_long.<task>`), each task's loss logged; a task
    losing more than half of its training examples stops the stage (it would silently score 0)."""
    totals = Counter(r["task"] for r in rows)
    lengths: dict[str, list[int]] = {}
    for r, (ids, _) in zip(rows, examples):
        if len(ids) > seq_len + 1:
            lengths.setdefault(r["task"], []).append(len(ids))
    for task, too_long in sorted(lengths.items()):
        message = (f"sft: {len(too_long):,} of {totals[task]:,} {split} examples of task {task} do not fit a row "
                   f"(sft.seq_len {seq_len} + 1 tokens; the longest has {max(too_long)})")
        if split == "train" and len(too_long) > totals[task] / 2:
            raise StageError(f"{message}: raise sft.seq_len (the base model allows {max_seq_len}) or shorten the "
                             f"task's prompts")
        log.warning("%s: dropped", message)
    return {f"{split}_too_long.{task}": len(v) for task, v in sorted(lengths.items())}


def sft(cfg: SFTConfig, inputs: dict[str, Artifact], ctx: StageContext) -> dict:
    base, tok_art = inputs["model"], inputs["tokenizer"]
    tok = load_tokenizer(tok_art)
    specials = special_ids(tok)
    pad_id = specials[PAD]
    model_cfg = model_config(base)
    seq_len = cfg.seq_len or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise StageError(f"sft.seq_len {seq_len} exceeds the base model's max_seq_len {model_cfg.max_seq_len}")

    rows = load_prompts(inputs["prompts"], "train")
    mastered = 0
    if "difficulty" in inputs and cfg.max_pass_rate is not None:
        rates = dict(load_pass_rates(inputs["difficulty"]).select("prompt_id", "pass_rate").iter_rows())
        keep = [r for r in rows if rates.get(r["id"], 0.0) < cfg.max_pass_rate]
        mastered, rows = len(rows) - len(keep), keep
    if not rows:
        raise StageError("sft: no training prompts left (check prompts sizes and sft.max_pass_rate)")
    is_val = below_fraction(doc_hash([r["id"] for r in rows], cfg.seed), cfg.val_fraction)

    arrays, metrics = {}, {"mastered_dropped": mastered}
    for split, select in (("train", ~is_val), ("val", is_val)):
        chosen = [r for r, c in zip(rows, select) if c]
        if split == "train":
            chosen = mixed(chosen, cfg.task_weights, cfg.seed)
        examples = [example_ids(tok, r["question"], completion_text(r["answer"], r.get("solution") if cfg.use_solutions
                                                                    else None)) for r in chosen]
        metrics.update(count_too_long(chosen, examples, seq_len, split, model_cfg.max_seq_len))
        tokens, mask, dropped = pack_examples(examples, seq_len, pad_id)
        arrays[split], arrays[f"{split}_mask"] = ctx.work_dir() / f"{split}.npy", ctx.work_dir() / f"{split}_mask.npy"
        save_array(arrays[split], tokens)
        save_array(arrays[f"{split}_mask"], mask)
        metrics.update({f"{split}_examples": len(examples) - dropped, f"{split}_rows": len(tokens),
                        f"{split}_too_long": dropped, f"{split}_target_tokens": int(mask[:, 1:].sum())})
    if metrics["train_rows"] < cfg.batch_size:
        raise StageError(f"sft.batch_size {cfg.batch_size} exceeds the {metrics['train_rows']} packed SFT rows")
    # examples packed into one row never see each other (each starts with <|bos|>): as if trained alone
    result = run_training(cfg, ctx, model_cfg, arrays, pad_id, tokenizer_path(tok_art), init_from=base,
                          segment_bos_id=specials[BOS])
    result["metrics"].update(metrics)
    result["metrics"]["epochs"] = result["metrics"]["steps"] * cfg.batch_size / metrics["train_rows"]
    return result


STAGE = Stage("sft", VERSION, SFTConfig, sft, store="models", family="sft",
              report_metrics=("val_loss", "train_examples", "epochs", "tokens_per_s"))
