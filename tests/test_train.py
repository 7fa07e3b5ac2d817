"""The training loop: schedules, exact resume after a kill, DDP equivalence, divergence."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.core.model import ModelConfig
from tasks.core.train import BatchOrder, DivergedError, TrainConfig, TrainSpec, checkpoints, launch, lr_at, train

VOCAB, SEQ = 64, 32


def markov_rows(n: int, seed: int = 0) -> np.ndarray:
    """Token rows from a sparse random Markov chain: learnable, with entropy well below unigram."""
    nxt = np.random.default_rng(1234).integers(0, VOCAB, (VOCAB, 3))  # one chain for train and val
    rng = np.random.default_rng(seed)
    rows = np.empty((n, SEQ + 1), np.int32)
    tok = rng.integers(0, VOCAB, n)
    for t in range(SEQ + 1):
        rows[:, t] = tok
        tok = nxt[tok, rng.integers(0, 3, n)]
    return rows


def make_spec(tmp: Path, name: str, **overrides) -> TrainSpec:
    data = tmp / "data"
    if not data.exists():
        data.mkdir()
        np.save(data / "train.npy", markov_rows(256))
        np.save(data / "val.npy", markov_rows(32, seed=1))
    cfg = dict(batch_size=8, max_steps=30, lr=3e-3, warmup_steps=3, eval_every=10, eval_rows=16,
               checkpoint_every=10, log_every=5, seed=0, device="cpu")
    cfg.update(overrides)
    (tmp / name).mkdir(exist_ok=True)
    return TrainSpec(cfg=TrainConfig(**cfg), model=ModelConfig(vocab_size=VOCAB, depth=2, width=64, max_seq_len=SEQ),
                     train_path=str(data / "train.npy"), val_path=str(data / "val.npy"), pad_id=-1,
                     tokens_per_byte=0.5, out=str(tmp / name / "out"), work=str(tmp / name / "work"))


def test_schedules():
    wsd = TrainConfig(max_steps=100, warmup_steps=10, decay_frac=0.2, lr=1.0, min_lr_frac=0.1)
    assert lr_at(wsd, 0) == pytest.approx(0.1) and lr_at(wsd, 9) == pytest.approx(1.0)
    assert lr_at(wsd, 50) == 1.0 and lr_at(wsd, 79) == 1.0
    assert lr_at(wsd, 90) == pytest.approx(0.55) and lr_at(wsd, 100) == pytest.approx(0.1)
    cos = wsd.model_copy(update={"schedule": "cosine"})
    assert lr_at(cos, 10) == pytest.approx(1.0) and lr_at(cos, 55) == pytest.approx(0.55) and lr_at(cos, 100) == pytest.approx(0.1)
    lin = wsd.model_copy(update={"schedule": "linear"})
    assert lr_at(lin, 55) == pytest.approx(0.55)


def test_batch_order_is_a_function_of_seed_and_step():
    order = BatchOrder(10, 4, seed=3)
    first_epoch = np.concatenate([order.rows(0), order.rows(1), order.rows(2)[:2]])
    assert sorted(first_epoch) == list(range(10))  # every row once per epoch
    assert np.array_equal(BatchOrder(10, 4, seed=3).rows(7), order.rows(7))
    assert not np.array_equal(BatchOrder(10, 4, seed=4).rows(0), order.rows(0))


def test_training_learns_and_checkpoints_hold_everything(tmp_path):
    spec = make_spec(tmp_path, "a", max_steps=60, checkpoint_every=20)
    result = train(spec)
    entropy = 1.0986  # ln 3: each token has 3 equally likely successors
    assert result["val_loss"] < entropy + 0.35 < np.log(VOCAB)  # learned the chain, far below unigram (~4.1)
    assert result["val_bpb"] == pytest.approx(result["val_loss"] / np.log(2) * 0.5)
    kept = checkpoints(Path(spec.work))
    assert [p.name for p in kept] == ["ckpt-20", "ckpt-40"]  # the last two
    files = {p.name for p in kept[-1].iterdir()}
    assert files == {"model.safetensors", "config.json", "train_state.pt", "state.json"}
    state = torch.load(kept[-1] / "train_state.pt", weights_only=True)
    assert state["optimizer"]["state"] and state["cpu_rng"].dtype == torch.uint8
    assert json.loads((kept[-1] / "state.json").read_text())["step"] == 40
    assert (Path(spec.out) / "model.safetensors").exists()


def test_resume_after_kill_matches_straight_run(tmp_path):
    straight = train(make_spec(tmp_path, "straight", max_steps=40))
    spec = make_spec(tmp_path, "killed", max_steps=40, checkpoint_every=10)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(spec.model_dump_json())
    # a process that trains slowly enough to be killed after its first checkpoint
    script = (
        "import sys, time, torch\n"
        "from tasks.core.train import TrainSpec, train\n"
        "import tasks.core.train as t\n"
        "orig = t.save_checkpoint\n"
        "def slow(*a, **k):\n"
        "    orig(*a, **k); time.sleep(30)\n"
        "t.save_checkpoint = slow\n"
        f"train(TrainSpec.model_validate_json(open({str(spec_path)!r}).read()))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120
    while not checkpoints(Path(spec.work)) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert [p.name for p in checkpoints(Path(spec.work))] == ["ckpt-10"]
    assert not (Path(spec.out) / "model.safetensors").exists()
    resumed = train(spec)
    assert resumed["resumed_from_step"] == 10 and resumed["steps"] == 40
    assert abs(resumed["train_loss"] - straight["train_loss"]) < 1e-6
    assert abs(resumed["val_loss"] - straight["val_loss"]) < 1e-6
    losses = lambda r: [h["loss"] for h in r["history"] if "loss" in h]  # noqa: E731
    assert np.allclose(losses(resumed), losses(straight), atol=1e-6, rtol=0)


def test_ddp_two_processes_match_one(tmp_path):
    one = launch(make_spec(tmp_path, "one", max_steps=20, grad_accum=2))
    two = launch(make_spec(tmp_path, "two", max_steps=20, nproc=2))
    assert two["steps"] == 20 and (Path(tmp_path / "two" / "out") / "model.safetensors").exists()
    assert abs(two["train_loss"] - one["train_loss"]) < 2e-3
    assert abs(two["val_loss"] - one["val_loss"]) < 2e-3


def test_divergence_stops_with_clear_error_and_keeps_checkpoint(tmp_path, monkeypatch):
    import tasks.core.train as t

    normal = t.lr_at
    monkeypatch.setattr(t, "lr_at", lambda cfg, step: normal(cfg, step) if step < 12 else 1e30)  # blow up late
    spec = make_spec(tmp_path, "nan", max_steps=30, checkpoint_every=10, grad_clip=0)
    with pytest.raises(DivergedError, match=r"(loss|gradient norm) became (nan|inf) at step 1\d at lr 1e\+30 \(a lower lr.*\); last good checkpoint: .*ckpt-10 \(kept\)"):
        train(spec)
    assert [p.name for p in checkpoints(Path(spec.work))] == ["ckpt-10"]
    assert not (Path(spec.out) / "model.safetensors").exists()


def test_batch_must_split_across_processes(tmp_path):
    with pytest.raises(ValueError, match="must divide"):
        train(make_spec(tmp_path, "odd", batch_size=7, grad_accum=2))
