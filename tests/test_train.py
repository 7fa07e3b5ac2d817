"""The training loop: schedules, exact resume after a kill or past a damaged checkpoint, DDP equivalence,
divergence."""

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

from tasks.core.model import GPT, ModelConfig
from tasks.core.train import (
    BatchOrder,
    CheckpointError,
    DivergedError,
    TrainConfig,
    TrainSpec,
    checkpoints,
    launch,
    lr_at,
    read_checkpoint,
    save_checkpoint,
    train,
)

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


# --- A checkpoint that does not load: set aside, and the one before it resumed --------------------------------

def trained_with_checkpoints(tmp_path: Path, name: str) -> tuple[TrainSpec, bytes]:
    """A straight 9-step run, which leaves checkpoints at steps 3 and 6 (what a run killed after step 6
    leaves) and its final weights; the weights are removed for a resumed run to write again."""
    spec = make_spec(tmp_path, name, max_steps=9, checkpoint_every=3, log_every=3)
    train(spec)
    weights = Path(spec.out) / "model.safetensors"
    straight = weights.read_bytes()
    weights.unlink()
    return spec, straight


def cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def test_a_checkpoint_that_does_not_load_is_set_aside_and_the_one_before_it_resumed(tmp_path, caplog, one_thread):
    spec, straight = trained_with_checkpoints(tmp_path, "a")
    work = Path(spec.work)
    cut_short(work / "ckpt-6" / "train_state.pt")  # e.g. a full disk under a copy of the store
    resumed = train(spec)
    assert resumed["resumed_from_step"] == 3 and resumed["steps"] == 9
    assert (Path(spec.out) / "model.safetensors").read_bytes() == straight  # byte-identical to the straight run
    [warning] = warnings_of(caplog)
    assert warning.startswith(f"checkpoint {work / 'ckpt-6'} does not load: train_state.pt does not load (")
    assert "set aside as .bad-ckpt-6-" in warning
    assert len(list(work.glob(".bad-ckpt-6-*"))) == 1
    assert [p.name for p in checkpoints(work)] == ["ckpt-3", "ckpt-6"]  # step 6 saved again by the resumed run


def test_when_no_checkpoint_loads_training_starts_from_step_0(tmp_path, caplog, one_thread):
    spec, straight = trained_with_checkpoints(tmp_path, "b")
    work = Path(spec.work)
    (work / "ckpt-6" / "state.json").write_text('{"step": 6')  # cut short
    cut_short(work / "ckpt-3" / "model.safetensors")
    resumed = train(spec)
    assert resumed["resumed_from_step"] == 0 and resumed["steps"] == 9
    # a checkpoint is read whole before anything is restored: the failed ones left the fresh model as it was
    assert (Path(spec.out) / "model.safetensors").read_bytes() == straight
    assert [w.split(" does not load: ")[1].split(" (")[0] for w in warnings_of(caplog)] == [
        "state.json does not load", "model.safetensors does not load"]
    assert sorted(p.name[: len(".bad-ckpt-3")] for p in work.glob(".bad-*")) == [".bad-ckpt-3", ".bad-ckpt-6"]


@pytest.mark.parametrize("damage, why", [
    (lambda c: (c / "model.safetensors").unlink(), "model.safetensors does not load (No such file"),
    (lambda c: cut_short(c / "model.safetensors"), "model.safetensors does not load (Error while deserializing"),
    (lambda c: (c / "config.json").write_text("{"), "config.json does not load (Expecting"),
    (lambda c: (c / "train_state.pt").write_bytes(b""), "train_state.pt does not load (EOFError)"),
    (lambda c: (c / "train_state.pt").write_bytes(b"not a checkpoint"), "train_state.pt does not load (Weights only"),
    (lambda c: torch.save({"optimizer": {}}, c / "train_state.pt"), "train_state.pt lacks the optimizer or RNG"),
    (lambda c: (c / "state.json").write_text("{}"), "state.json lacks step, history"),
])
def test_read_checkpoint_names_the_file_that_does_not_load(tmp_path, damage, why):
    model = GPT(ModelConfig(vocab_size=VOCAB, depth=1, width=32, max_seq_len=SEQ))
    save_checkpoint(tmp_path, 5, model, model.configure_optimizer(1e-3, 0.0), [])
    ckpt = tmp_path / "ckpt-5"
    assert read_checkpoint(ckpt)[1]["step"] == 5
    damage(ckpt)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(ckpt)
    assert str(e.value).startswith(why) and "\n" not in str(e.value)


def test_verify_sets_aside_a_checkpoint_that_does_not_load_and_gc_lists_it(project):
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.housekeeping import find_garbage
    from tasks.core.store import Store

    key = "0123456789abcdef"
    work = project / "models" / "pretrain" / f".work-{key}"
    work.mkdir(parents=True)
    model = GPT(ModelConfig(vocab_size=VOCAB, depth=1, width=32, max_seq_len=SEQ))
    opt = model.configure_optimizer(1e-3, 0.0)
    save_checkpoint(work, 10, model, opt, [])
    save_checkpoint(work, 20, model, opt, [])
    cut_short(work / "ckpt-20" / "train_state.pt")
    result = CliRunner().invoke(app, ["verify", "-c", str(project / "tiny.yaml")])
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert f"damaged: {work / 'ckpt-20'}: train_state.pt does not load (" in text
    assert "verified 0 outputs (0.0 MB) and 2 checkpoints: 1 damaged" in text
    assert [p.name for p in checkpoints(work)] == ["ckpt-10"] and len(list(work.glob(".bad-ckpt-20-*"))) == 1
    again = CliRunner().invoke(app, ["verify", "-c", str(project / "tiny.yaml")])
    assert again.exit_code == 0 and "and 1 checkpoints: 0 damaged" in again.output
    # a live work dir (its key still wanted) stays; only the checkpoint set aside in it is garbage
    [garbage] = find_garbage(Store(project / "models"), {("pretrain", key)})
    assert garbage.path.name.startswith(".bad-ckpt-20-") and garbage.why == "checkpoint that did not load, set aside"
