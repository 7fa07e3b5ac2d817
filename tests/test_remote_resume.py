"""Training checkpoints in an object store (tasks.core.checkpoint_mirror): a pretrain stage on an `s3://`
models root (moto's S3 server), killed after some checkpoints, resumes in a new process with an empty temp
dir (as on another machine) from the store's newest complete checkpoint, and ends with the weights of an
uninterrupted run; the store's work prefix is gone after the commit."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pytest
import torch
from test_object_store import s3_server
from test_rl_loop import Killed, new_model, planted, rows, tok  # noqa: F401  (rows, tok: fixtures)

from tasks.core.checkpoint_mirror import pull_checkpoints, upload_checkpoint
from tasks.core.configs import ModelConfig
from tasks.core.stage import run_stage
from tasks.core.store import Store, write_parquet
from tasks.pretrain import STAGE, PretrainConfig
from tasks.rl import loop
from tasks.rl.loop import GRPOConfig, grpo, history_table

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ, PAD = 64, 32, 63
PACK_KEY, TOKENIZER_KEY = "0000000000000001", "0000000000000002"
CFG = PretrainConfig(model=ModelConfig(depth=1, width=64), batch_size=8, max_steps=50, warmup_steps=2,
                     checkpoint_every=10, eval_every=50, eval_rows=16, log_every=10, lr=3e-3, device="cpu")
STALL_STEP = 30  # the killed run stops here, after uploading ckpt-30 (ckpt-20 kept, ckpt-10 dropped)


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server for the module (s3fs instances are cached: one endpoint for all the tests)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    with s3_server() as env:
        yield env
    s3fs.S3FileSystem.clear_instance_cache()


def token_rows(n: int, seed: int) -> np.ndarray:
    """Learnable rows: each token mostly follows from the one before it."""
    rng = np.random.default_rng(seed)
    tokens = np.empty((n, SEQ + 1), np.int32)
    tokens[:, 0] = rng.integers(0, PAD, n)
    for t in range(1, SEQ + 1):
        tokens[:, t] = (tokens[:, t - 1] * 7 + rng.integers(0, 2, n)) % PAD
    tokens[-1, -4:] = PAD  # as pack pads its last row
    return tokens


def commit_inputs(data_root: Path) -> None:
    """A tiny pack output and a tokenizer output in a local data store (what pretrain reads)."""
    store = Store(data_root)
    scratch = store.scratch("pack", PACK_KEY)
    for split, n, seed in (("train", 64, 0), ("val", 16, 1)):
        tokens = pa.FixedSizeListArray.from_arrays(pa.array(token_rows(n, seed).ravel()), SEQ + 1)
        write_parquet(pa.table({"tokens": tokens}), scratch / split / "part-00000.parquet")
    metrics = {"vocab_size": VOCAB, "seq_len": SEQ, "pad_id": PAD, "val_targets": 16 * SEQ, "val_bytes": 4 * 16 * SEQ}
    store.commit(scratch, "pack", PACK_KEY, {"metrics": metrics})
    scratch = store.scratch("tokenizer", TOKENIZER_KEY)
    (scratch / "tokenizer.json").write_text("{}")  # only copied beside the weights
    store.commit(scratch, "tokenizer", TOKENIZER_KEY, {})


def inputs_of(data_root: Path) -> dict:
    data = Store(data_root)
    return {"packed": data.get("pack", PACK_KEY), "tokenizer": data.get("tokenizer", TOKENIZER_KEY)}


RUN = """
import logging, sys, time
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
import tasks.core.train as train
stall = {stall}
if stall:  # hold still after uploading checkpoint `stall`, to be killed there
    save = train.save_checkpoint
    def stalling(work, step, *a, **k):
        save(work, step, *a, **k)
        if step == stall:
            print("STALLED", flush=True)
            time.sleep(600)
    train.save_checkpoint = stalling
from tasks.core.stage import run_stage
from tasks.core.store import Store
from tasks.pretrain import STAGE, PretrainConfig
data = Store({data!r})
inputs = {{"packed": data.get("pack", {pack!r}), "tokenizer": data.get("tokenizer", {tok!r})}}
out = run_stage(STAGE, PretrainConfig.model_validate_json({cfg!r}), inputs, Store({models!r}))
print("DONE", out.artifact.manifest["files"]["model/model.safetensors"], out.artifact.manifest["metrics"]["resumed_from_step"])
"""


def start_run(place: Path, data_root: Path, models_root: str, stall: int = 0) -> tuple[subprocess.Popen, Path]:
    """The pretrain stage in a process group of its own, with its own empty temp dir and cwd (another
    machine, as far as the local work dir goes); its output to `place/out.txt`."""
    (place / "tmp").mkdir(parents=True)
    env = {**os.environ, "TMPDIR": str(place / "tmp"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "SLMFLOW_LEASE_TIMEOUT_S": "2"}  # the killed run's lease, if the store keeps one, expires at once
    code = RUN.format(stall=stall, data=str(data_root), pack=PACK_KEY, tok=TOKENIZER_KEY, cfg=CFG.model_dump_json(),
                      models=models_root)
    log = place / "out.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=place, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, log


def wait_for(proc: subprocess.Popen, log: Path, text: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text():
        assert proc.poll() is None, f"exit {proc.returncode} before {text!r}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout_s} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def stored_names(prefix: str) -> set[str]:
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    path = prefix.removeprefix("s3://")
    return {p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)} if fs.exists(path) else set()


def test_a_killed_pretrain_resumes_on_another_machine_from_the_store(s3, tmp_path, one_thread):
    data_root = tmp_path / "data"
    commit_inputs(data_root)
    straight = run_stage(STAGE, CFG, inputs_of(data_root), Store(tmp_path / "straight"))  # uninterrupted, local
    key, models = straight.artifact.key, "s3://slmflow/remote-resume/models"
    prefix = Store(models).work_mirror("pretrain", key)
    assert prefix == f"{models}/pretrain/.work-{key}"

    proc, log = start_run(tmp_path / "killed", data_root, models, stall=STALL_STEP)
    try:
        wait_for(proc, log, "STALLED")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    # the store holds the newest two complete checkpoints (the older one deleted after the upload)
    assert stored_names(prefix) == {"ckpt-20", "ckpt-20.done", "ckpt-30", "ckpt-30.done"}
    assert Store(models).get("pretrain", key) is None
    fs, base = fsspec.filesystem("s3"), prefix.removeprefix("s3://")
    for path in fs.find(f"{base}/ckpt-30"):  # an upload of ckpt-40 cut short before its marker: never used
        fs.copy(path, path.replace("/ckpt-30/", "/ckpt-40/"))

    proc, log = start_run(tmp_path / "elsewhere", data_root, models)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    out = log.read_text()
    assert f"pretrain: resuming from step 30 (checkpoint from {prefix}/ckpt-30)" in out, out[-3000:]
    digest, resumed_from = out.split("DONE ")[1].split()
    assert int(resumed_from) == 30
    assert digest == straight.artifact.manifest["files"]["model/model.safetensors"]
    assert Store(models).get("pretrain", key).manifest["files"] == straight.artifact.manifest["files"]
    assert stored_names(prefix) == set()  # the work prefix goes with the commit


def fake_checkpoint(work: Path, step: int) -> Path:
    ckpt = work / f"ckpt-{step}"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"step": step}))
    (ckpt / "sub" / "weights.bin").write_bytes(bytes(range(256)) * step)
    return ckpt


def test_upload_keeps_the_newest_and_download_takes_only_complete_ones(s3, tmp_path, caplog):
    mirror, here = "s3://slmflow/unit/pretrain/.work-00000000000000aa", tmp_path / "here"
    samples = here / "samples-000020.parquet"
    for step in (10, 20, 30):
        fake_checkpoint(here, step)
    samples.write_bytes(b"rows")
    upload_checkpoint(here / "ckpt-10", mirror, oldest_kept=10)
    upload_checkpoint(here / "ckpt-20", mirror, oldest_kept=10, beside=(samples,))
    upload_checkpoint(here / "ckpt-30", mirror, oldest_kept=20)
    assert stored_names(mirror) == {"ckpt-20", "ckpt-20.done", "ckpt-30", "ckpt-30.done", samples.name}
    fs = fsspec.filesystem("s3")
    fs.pipe_file(f"{mirror.removeprefix('s3://')}/ckpt-40/state.json", b'{"step": 40}')  # no marker: incomplete

    there = tmp_path / "there"
    there.mkdir()
    with caplog.at_level(logging.INFO, logger="slmflow"):
        assert pull_checkpoints(mirror, there, "pretrain") == ["ckpt-20", "ckpt-30"]
    assert sorted(p.name for p in there.iterdir()) == ["ckpt-20", "ckpt-30", samples.name]
    for step in (20, 30):
        for name in ("state.json", "sub/weights.bin"):
            assert (there / f"ckpt-{step}" / name).read_bytes() == (here / f"ckpt-{step}" / name).read_bytes()
    assert (there / samples.name).read_bytes() == b"rows"
    assert f"pretrain: resuming from step 30 (checkpoint from {mirror}/ckpt-30)" in caplog.text
    assert pull_checkpoints(mirror, there, "pretrain") == []  # what the work dir has stays as it is

    store = Store("s3://slmflow/unit")
    store.tidy("pretrain", "00000000000000aa")  # a cache hit's tidy: nobody holds the key
    assert stored_names(mirror) == set()


def test_rl_samples_travel_with_its_checkpoints(s3, tok, rows, tmp_path, monkeypatch, one_thread):
    """GRPO's history table is read from its samples files, which nothing recomputes: a run resumed
    elsewhere from the store's checkpoint gets them too, and its table is the straight run's."""
    monkeypatch.setattr(loop, "score_prompts", planted(loop.score_prompts))
    cfg = GRPOConfig(max_steps=4, batch_prompts=2, num_generations=4, max_completion_length=4, filter="mixed",
                     oversample=2.0, max_generation_rounds=3, eval_every=2, checkpoint_every=2, batch_size=64,
                     temperature=0.9, device="cpu", seed=1)
    eval_rows, train_rows, cpu = rows[:2], rows[2:], torch.device("cpu")
    grpo(new_model(tok), tok, train_rows, eval_rows, cfg, tmp_path / "straight", cpu)
    mirror = "s3://slmflow/unit/rl/.work-00000000000000bb"
    save = loop.save_checkpoint

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise Killed

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        grpo(new_model(tok), tok, train_rows, eval_rows, cfg, tmp_path / "killed", cpu, mirror=mirror)
    monkeypatch.setattr(loop, "save_checkpoint", save)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert pull_checkpoints(mirror, elsewhere, "rl") == ["ckpt-2"]
    resumed = grpo(new_model(tok), tok, train_rows, eval_rows, cfg, elsewhere, cpu, mirror=mirror)
    assert resumed.resumed_from == 2
    assert history_table(elsewhere).equals(history_table(tmp_path / "straight"))
