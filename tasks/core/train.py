"""The training loop shared by the training stages: one process, or DDP under torchrun.

Everything needed to resume exactly lives in a checkpoint: weights (safetensors), optimizer
state and RNG states (`torch.save`, loaded with `weights_only=True`), and `state.json` (step,
history). The data order and the LR are pure functions of (seed, step), so a resumed run sees
the same batches and learning rates as an uninterrupted one. A checkpoint that does not load (a
file missing, cut short or unparseable) is set aside as `.bad-ckpt-<step>-<time>` in the work dir
and the run resumes from the one before it, or from step 0 (`resume`, which RL shares).

On a remote models root the work dir is a local working copy and `mirror` the store's work prefix: each
checkpoint is uploaded there as it is saved (`tasks.core.checkpoint_mirror`), and the stage downloads
the complete ones before it runs, so a run on another machine resumes where a preempted one stopped.

Run as `python -m torch.distributed.run ... -m tasks.core.train SPEC.json` for DDP: the stage
writes the spec and launches it (see `launch`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel
from safetensors import safe_open

from tasks.core.base import log
from tasks.core.checkpoint_mirror import upload_checkpoint
from tasks.core.configs import ModelConfig, TrainConfig
from tasks.core.faults import first_line
from tasks.core.hardware import autocast, mfu, peak_flops, use_bf16
from tasks.core.model import CONFIG, GPT, WEIGHTS, activation_scale, load_model, load_weights, save_model
from tasks.core.store import fsync_file, fsync_tree

IGNORE = -100
TRAIN_STATE, STATE = "train_state.pt", "state.json"


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Warmup, then WSD (constant, linear decay over the last decay_frac) or cosine or linear."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_frac
    if cfg.schedule == "wsd":
        decay_start = cfg.max_steps * (1 - cfg.decay_frac)
        if step < decay_start:
            return cfg.lr
        frac = (step - decay_start) / max(1.0, cfg.max_steps - decay_start)
        return cfg.lr - (cfg.lr - floor) * min(1.0, frac)
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * frac))
    return cfg.lr - (cfg.lr - floor) * frac


class BatchOrder:
    """Row indices of each step's global batch: a fresh permutation per epoch, from (seed, epoch)."""

    def __init__(self, n_rows: int, batch_size: int, seed: int):
        self.n, self.batch, self.seed, self._perms = n_rows, batch_size, seed, {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def take(self, start: int, count: int) -> np.ndarray:
        """Row indices at positions start .. start+count-1 of the endless epoch-by-epoch order."""
        flat = np.arange(start, start + count)
        return np.array([self._perm(int(g // self.n))[g % self.n] for g in flat], dtype=np.int64)

    def rows(self, step: int) -> np.ndarray:
        return self.take(step * self.batch, self.batch)


class TrainSpec(BaseModel):
    """Everything a training process needs (JSON, so torchrun workers can read it)."""

    cfg: TrainConfig
    model: ModelConfig
    init_from: str | None = None  # a model directory to start from (SFT, RL); None = random init
    train_path: str  # .npy of token rows [n, seq_len+1]
    val_path: str | None = None
    # .npy of 0/1 rows like the token rows: 1 where the token is a target to learn (SFT: the
    # completion); None = every non-pad token
    train_mask_path: str | None = None
    val_mask_path: str | None = None
    pad_id: int
    # Packed examples kept apart: each <|bos|> starts a segment that attends only to itself, positions
    # restarting at 0 (SFT); None = plain causal rows (pretraining: documents see earlier documents)
    segment_bos_id: int | None = None
    tokens_per_byte: float | None = None  # val tokens / val bytes, for bits-per-byte
    out: str  # where the final model goes
    work: str  # checkpoints
    mirror: str | None = None  # where rank 0 uploads each checkpoint (a remote root's work prefix); None: local only
    mlflow_uri: str | None = None
    mlflow_experiment: str | None = None
    mlflow_run_id: str | None = None


def targets_of(rows: torch.Tensor, pad_id: int, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = rows[:, :-1], rows[:, 1:].clone()
    targets[targets == pad_id] = IGNORE  # padding only fills the last packed row
    if mask is not None:
        targets[mask[:, 1:] == 0] = IGNORE  # e.g. prompt tokens in SFT: no loss, no gradient
    return inputs, targets


def segments_of(inputs: torch.Tensor, bos_id: int | None) -> torch.Tensor | None:
    """Segment ids [B, T] for packed rows: the count of <|bos|> tokens so far (None: no segments)."""
    return None if bos_id is None else (inputs == bos_id).cumsum(-1)


def checkpoints(work: Path) -> list[Path]:
    return sorted(work.glob("ckpt-*"), key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(work: Path, step: int, model: GPT, opt, history: list[dict], keep: int = 2,
                    extra: dict | None = None, mirror: str | None = None, beside: tuple[Path, ...] = ()) -> None:
    """extra: more JSON state for the caller (e.g. RL's prompt cursor), saved in the same atomic step.
    mirror: a store's work prefix to upload the checkpoint to (with the `beside` files of `work` that
    nothing recomputes, e.g. RL's samples), once it is saved here."""
    tmp = work / f".ckpt-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, tmp)
    torch.save({"optimizer": opt.state_dict(), "cpu_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
               tmp / TRAIN_STATE)
    (tmp / STATE).write_text(json.dumps({**(extra or {}), "step": step, "history": history}))
    fsync_tree(tmp)  # on disk before it is named a checkpoint: a power cut cannot leave a torn one
    os.replace(tmp, work / f"ckpt-{step}")  # atomic: a checkpoint directory is always complete
    fsync_file(work)
    for old in checkpoints(work)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    if mirror:
        _upload(work / f"ckpt-{step}", mirror, beside)


def _upload(ckpt: Path, mirror: str, beside: tuple[Path, ...]) -> None:
    """Mirror a saved checkpoint to the store. A failure warns and training goes on: the checkpoint is safe
    here, and a run elsewhere would resume from an earlier one (the next upload tries again)."""
    oldest_kept = int(checkpoints(ckpt.parent)[0].name.split("-")[1])
    try:
        upload_checkpoint(ckpt, mirror, oldest_kept, beside)
    except Exception as e:  # noqa: BLE001 - any store's error (network, credentials, quota)
        log.warning("%s not uploaded to %s (%s); training goes on", ckpt.name, mirror, first_line(e))


def checkpoint_state(path: Path) -> dict:
    """The JSON state of a checkpoint: step, history and any extra fields."""
    return json.loads((path / STATE).read_text())


class CheckpointError(ValueError):
    """A checkpoint that does not load: one of its files is missing, cut short or unparseable (one line)."""


def _read(path: Path, read):
    try:
        return read(path)
    except Exception as e:  # a pure read, and torch.load of garbage raises nearly anything (IndexError, ...)
        raise CheckpointError(f"{path.name} does not load ({first_line(e)})") from None


def _safetensors_keys(path: Path) -> list[str]:
    with safe_open(path, "pt") as f:  # parses the header, which must cover the whole file: a cut is caught
        return list(f.keys())


def read_checkpoint(path: Path, fields: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """(train_state.pt, state.json) of a checkpoint whose every file loads, or CheckpointError; it
    touches no model. state.json must hold step, history and the caller's `fields`."""
    _read(path / WEIGHTS, _safetensors_keys)
    _read(path / CONFIG, lambda p: json.loads(p.read_bytes()))
    # weights_only: never unpickle arbitrary objects. On the CPU: `slmflow verify` may run where there is no GPU,
    # and the optimizer's load_state_dict moves its state to its parameters' device
    state = _read(path / TRAIN_STATE, lambda p: torch.load(p, map_location="cpu", weights_only=True))
    meta = _read(path / STATE, lambda p: json.loads(p.read_bytes()))
    if not isinstance(state, dict) or {"optimizer", "cpu_rng", "cuda_rng"} - set(state):
        raise CheckpointError(f"{TRAIN_STATE} lacks the optimizer or RNG states")
    meta = meta if isinstance(meta, dict) else {}
    missing = [f for f, kind in (("step", int), ("history", list)) if not isinstance(meta.get(f), kind)]
    missing += [f for f in fields if f not in meta]
    if missing:
        raise CheckpointError(f"{STATE} lacks {', '.join(missing)}")
    return state, meta


def load_checkpoint(path: Path, model: GPT, opt, fields: tuple[str, ...] = ()) -> dict:
    """Restore weights, optimizer and RNG states from a checkpoint; returns its state.json. Every file is
    read before anything is restored, so CheckpointError leaves the model, optimizer and RNG as they were."""
    state, meta = read_checkpoint(path, fields)
    load_weights(model, path)
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["cpu_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return meta


def set_aside_checkpoint(path: Path) -> Path | None:
    """Rename a checkpoint that does not load to `.bad-ckpt-<step>-<time>` in its work dir: no longer a
    checkpoint, but kept (like a damaged output) so what broke it can be looked at; `slmflow gc` removes
    it. None when it is gone already (another DDP rank, or `slmflow verify`, moved it first)."""
    aside = path.with_name(f".bad-{path.name}-{time.strftime('%Y%m%dT%H%M%S')}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return None
    return aside


def resume(work: Path, model: GPT, opt, fields: tuple[str, ...] = ()) -> tuple[Path, dict] | None:
    """Load the newest checkpoint in `work` that loads (pretraining, SFT and RL alike): (it, its state.json),
    or None to start from step 0. Each newer one that does not load is set aside, with one warning line."""
    for path in reversed(checkpoints(work)):
        try:
            return path, load_checkpoint(path, model, opt, fields)
        except CheckpointError as e:
            aside = set_aside_checkpoint(path)
            log.warning("checkpoint %s does not load: %s; set aside as %s, resuming from the one before it "
                        "(or step 0)", path, e, aside.name if aside else "(moved already)")
    return None


class DivergedError(RuntimeError):
    pass


def _rows(array: np.ndarray | None, index, device) -> torch.Tensor | None:
    return None if array is None else torch.from_numpy(np.asarray(array[index])).to(device).long()


@torch.no_grad()
def evaluate(model, val: np.ndarray, val_mask: np.ndarray | None, spec: TrainSpec, device, amp) -> float:
    model.eval()
    rows = _rows(val, slice(0, spec.cfg.eval_rows), device)
    masks = _rows(val_mask, slice(0, spec.cfg.eval_rows), device)
    total, count = 0.0, 0
    for i in range(0, len(rows), spec.cfg.batch_size):
        part = slice(i, i + spec.cfg.batch_size)
        inputs, targets = targets_of(rows[part], spec.pad_id, None if masks is None else masks[part])
        with amp:
            _, loss = model(inputs, targets, reduction="none", segments=segments_of(inputs, spec.segment_bos_id))
        mask = targets != IGNORE
        total += float(loss[mask].sum())
        count += int(mask.sum())
    model.train()
    return total / max(1, count)


def train(spec: TrainSpec, mlflow_log=None) -> dict:
    """Train to cfg.max_steps, resuming from the latest checkpoint in spec.work; rank 0 writes."""
    cfg = spec.cfg
    ddp = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    amp = autocast(device, cfg.precision)
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"batch_size {cfg.batch_size} must divide by nproc x grad_accum = {world * cfg.grad_accum}")
    micro = cfg.batch_size // (world * cfg.grad_accum)

    torch.manual_seed(cfg.seed)
    model = load_model(spec.init_from) if spec.init_from else GPT(spec.model)
    model.to(device)
    opt = model.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), fused=use_cuda)
    work = Path(spec.work)
    step, history = 0, []
    if resumed := resume(work, model, opt):
        found, meta = resumed
        step, history = meta["step"], meta["history"]
        if rank == 0:
            log.info("resuming from %s (step %d)", found.name, step)
    resumed_from = step
    net = model
    if ddp:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    if cfg.compile:
        net = torch.compile(net)

    train_rows = np.load(spec.train_path, mmap_mode="r")
    train_mask = np.load(spec.train_mask_path, mmap_mode="r") if spec.train_mask_path else None
    val_rows = np.load(spec.val_path) if spec.val_path else None
    val_mask = np.load(spec.val_mask_path) if spec.val_mask_path else None
    order = BatchOrder(len(train_rows), cfg.batch_size, cfg.seed)
    seq_len = train_rows.shape[1] - 1
    flops_tok = model.flops_per_token(seq_len)
    peak = peak_flops(device, cfg.peak_flops)
    if rank == 0:
        log.info("train on %s%s: %s%s, %d process%s", device, f" ({torch.cuda.get_device_name(device)})" if use_cuda else "",
                 "bf16 autocast" if use_bf16(device, cfg.precision) else "fp32", ", compiled" if cfg.compile else "",
                 world, "es" if world > 1 else "")
    if device.type == "cuda" and not peak and rank == 0:
        log.info("no MFU: %s is not in the peak-FLOPs table (set peak_flops)", torch.cuda.get_device_name(device))
    pending, t_last, tokens_last = [], time.perf_counter(), 0
    start_time = time.perf_counter()

    def flush():
        if mlflow_log and pending:
            mlflow_log(list(pending))
        pending.clear()

    while step < cfg.max_steps:
        lr = lr_at(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        rows = order.rows(step)[rank::world]  # this process's share of the global batch
        loss_sum = torch.zeros((), device=device)
        for m in range(cfg.grad_accum):
            index = np.sort(rows[m * micro : (m + 1) * micro])
            inputs, targets = targets_of(_rows(train_rows, index, device), spec.pad_id, _rows(train_mask, index, device))
            sync = nullcontext() if (not ddp or m == cfg.grad_accum - 1) else net.no_sync()
            with sync, amp:
                _, loss = net(inputs, targets, segments=segments_of(inputs, spec.segment_bos_id))
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach() / cfg.grad_accum
        if ddp:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        train_loss = float(loss_sum)
        if not math.isfinite(train_loss) or not math.isfinite(float(grad_norm)):
            what = f"loss became {train_loss}" if not math.isfinite(train_loss) else f"gradient norm became {float(grad_norm)}"
            last = checkpoints(work)
            raise DivergedError(f"{what} at step {step} at lr {lr:.3g} (a lower lr, or more warmup_steps, "
                                f"usually cures it); last good checkpoint: {last[-1] if last else 'none'} (kept)")
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_last += cfg.batch_size * seq_len

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            if use_cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            row = {"step": step, "loss": train_loss, "lr": lr, "grad_norm": float(grad_norm),
                   "tokens_per_s": tokens_last / (now - t_last)}
            if peak:
                row["mfu"] = mfu(row["tokens_per_s"], flops_tok, peak, world)
            t_last, tokens_last = now, 0
            if rank == 0:
                eta = (now - start_time) / (step - resumed_from) * (cfg.max_steps - step)
                log.info("train step %d/%d loss %.4f lr %.2e %.0f tok/s ETA %.0fs",
                         step, cfg.max_steps, train_loss, lr, row["tokens_per_s"], eta)
            history.append(row)
            pending.append((step, {k: v for k, v in row.items() if k != "step"}))
        if val_rows is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            val_loss = evaluate(model, val_rows, val_mask, spec, device, amp)
            evals = {"val_loss": val_loss}
            if spec.tokens_per_byte:
                evals["val_bpb"] = val_loss / math.log(2) * spec.tokens_per_byte
            history.append({"step": step, **evals})
            pending.append((step, evals))
            flush()
        if rank == 0 and (step % cfg.checkpoint_every == 0) and step < cfg.max_steps:
            save_checkpoint(work, step, model, opt, history, mirror=spec.mirror)
            flush()
    flush()
    scale = {}
    if rank == 0:
        save_model(model, Path(spec.out))
        if val_rows is not None:  # the health of what the next stage starts from (model.activation_scale)
            model.eval()
            scale = activation_scale(model, _rows(val_rows, slice(0, 8), device)[:, :-1])
    evals = [h for h in history if "val_loss" in h]
    trains = [h for h in history if "loss" in h]
    return {
        "steps": step, "resumed_from_step": resumed_from, "train_loss": trains[-1]["loss"] if trains else None,
        "val_loss": evals[-1]["val_loss"] if evals else None, "val_bpb": evals[-1].get("val_bpb") if evals else None,
        "tokens_per_s": float(np.median([h["tokens_per_s"] for h in trains])) if trains else None,
        "mfu": float(np.median([h["mfu"] for h in trains])) if trains and "mfu" in trains[0] else None,
        "params": model.num_params(), **scale, "history": history,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: TrainSpec) -> dict:
    """Run `train` in-process, or under torchrun with DDP when cfg.nproc > 1; returns its result."""
    work = Path(spec.work)
    work.mkdir(parents=True, exist_ok=True)
    if spec.cfg.nproc == 1:
        return train(spec, _mlflow_logger(spec))
    spec_path, result_path = work / "spec.json", work / "result.json"
    spec_path.write_text(spec.model_dump_json())
    result_path.unlink(missing_ok=True)
    threads = max(1, (os.cpu_count() or 1) // spec.cfg.nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={spec.cfg.nproc}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "-m", "tasks.core.train", str(spec_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["(no output)"]
        raise RuntimeError(f"torchrun with {spec.cfg.nproc} processes failed: {tail[0]}")
    return json.loads(result_path.read_text())


def _mlflow_logger(spec: TrainSpec):
    if not (spec.mlflow_run_id and spec.mlflow_experiment):
        return None
    from tasks.core.lineage import Tracker, tracking_uri

    tracker = Tracker(tracking_uri(spec.mlflow_uri), spec.mlflow_experiment)
    return lambda rows: tracker.log_history(spec.mlflow_run_id, rows)


def _worker(spec_path: str) -> None:
    """torchrun entry point: one DDP process."""
    spec = TrainSpec.model_validate_json(Path(spec_path).read_text())
    use_cuda = spec.cfg.device == "cuda" or (spec.cfg.device == "auto" and torch.cuda.is_available())
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        rank0 = dist.get_rank() == 0
        result = train(spec, _mlflow_logger(spec) if rank0 else None)
        if rank0:
            (Path(spec.work) / "result.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])
