"""The tokenizer -> pack -> pretrain part of the pipeline on configs/tiny.yaml, under Prefect."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from typer.testing import CliRunner

from flows.cli import app
from flows.config import load_config
from flows.pipeline import pipeline
from flows.report import mean_standard_error
from tasks.core.model import load_model
from tasks.core.store import Store

pytestmark = pytest.mark.usefixtures("prefect_server")


def run(root: Path, sets=(), only=None) -> dict:
    cfg = load_config(root / "tiny.yaml", list(sets))
    return {r["stage"]: r for r in pipeline(cfg.model_dump(mode="json"), only)["report"]}


@pytest.fixture(scope="module")
def trained(tiny_run):
    root, result = tiny_run
    return root, {r["stage"]: r for r in result["report"]}


def test_pretraining_beats_unigram_entropy(trained):
    _, report = trained
    names = list(report)
    assert names[names.index("select"):][:4] == ["select", "tokenizer", "pack", "pretrain"]
    m = Store(trained[0] / "models").get("pretrain", report["pretrain"]["key"]).manifest["metrics"]
    assert m["steps"] == 400 and m["resumed_from_step"] == 0
    # well below the loss of the best context-free model of the same data
    assert m["val_loss"] < m["unigram_entropy"] - 0.5, m
    assert 0 < m["val_bpb"] < 8 and m["tokens_per_s"] > 0 and m["params"] > 0
    assert report["pretrain"]["metrics"]["val_bpb"] == m["val_bpb"]  # on the report card


def test_outputs_weights_tokenizer_history_and_mlflow(trained):
    root, report = trained
    art = Store(root / "models").get("pretrain", report["pretrain"]["key"])
    model_dir = Path(art.path) / "model"
    assert {p.name for p in model_dir.iterdir()} == {"model.safetensors", "config.json", "tokenizer.json"}
    model = load_model(model_dir)
    assert model.dims.vocab_size == 512 and model.dims.max_seq_len == 128
    assert set(art.manifest["files"]) == {"model/model.safetensors", "model/config.json", "model/tokenizer.json",
                                          "history/part-00000.parquet"}
    assert not any(p.name.startswith(".") for p in (root / "models" / "pretrain").iterdir())  # work dir cleaned
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    run_id = art.manifest["mlflow_run_id"]
    losses = client.get_metric_history(run_id, "loss")
    assert [h.step for h in losses] == list(range(10, 401, 10))
    assert [h.step for h in client.get_metric_history(run_id, "val_loss")] == [200, 400]
    assert "plots/loss_curve.png" in [a.path for a in client.list_artifacts(run_id, "plots")]
    outputs = client.get_run(run_id).outputs.model_outputs
    assert len(outputs) == 1 and outputs[0].step == 400
    logged = client.get_logged_model(outputs[0].model_id)
    assert logged.source_run_id == run_id and logged.status == LoggedModelStatus.READY
    inputs = {d.dataset.name for d in client.get_run(run_id).inputs.dataset_inputs}
    assert inputs == {"pack", "tokenizer", "pretrain"}  # inputs + its own output dataset


def test_changing_a_pretrain_setting_reruns_pretrain_and_downstream_only(trained):
    root, base = trained
    again = run(root, ["pretrain.lr=0.02", "pretrain.max_steps=20", "pretrain.checkpoint_every=10"], only=["pretrain"])
    assert [s for s, r in again.items() if not r["cached"]] == ["pretrain"]
    assert again["pretrain"]["key"] != base["pretrain"]["key"]
    upstream = ("ingest", "dedup", "prompts", "decontaminate", "quality", "tokenizer_ref", "ref_0", "preselect",
                "select", "tokenizer", "pack")
    assert all(again[s]["key"] == base[s]["key"] for s in upstream)
    from flows.pipeline import make_plan

    plan = make_plan(load_config(root / "tiny.yaml", ["pretrain.lr=0.02"]))
    changed = {n for n, p in plan.stages.items() if p.key != base[n]["key"]}
    assert changed == {"pretrain", "difficulty_pretrain", "sft", "rl", "eval_pretrain", "eval_sft", "eval_rl"}


def test_select_keeps_the_configured_share_and_feeds_tokenizer_and_pack(trained):
    """select (preselect, tiny.yaml's fraction of characters) reads the quality output; the tokenizer and pack read select."""
    import polars as pl

    root, report = trained
    cfg = load_config(root / "tiny.yaml")
    data = Store(root / "data")
    art = {s: data.get(s, report[s]["key"]) for s in ("quality", "preselect", "select", "tokenizer", "pack")}
    inputs = {s: {k: v["key"] for k, v in a.manifest["inputs"].items()} for s, a in art.items()}
    assert inputs["select"] == {"documents": art["quality"].key, "scores": art["preselect"].key}
    assert inputs["tokenizer"] == {"documents": art["select"].key}
    assert inputs["pack"] == {"documents": art["select"].key, "tokenizer": art["tokenizer"].key}
    # kept = the shortest prefix of the score ranking whose characters reach fraction x the quality output's
    docs = pl.concat([pl.read_parquet(f, columns=["id", "text"]) for f in art["quality"].files("documents")])
    scores = pl.concat([pl.read_parquet(f) for f in art["preselect"].files("scores")])
    ranked = (docs.join(scores, left_on="id", right_on="doc_id").sort(["preselect_score", "id"], descending=[True, False])
              .with_columns(chars=pl.col("text").str.len_chars()))
    budget = cfg.select.fraction * ranked["chars"].sum()
    n = int((ranked["chars"].cum_sum() < budget).sum()) + 1
    kept = pl.concat([pl.read_parquet(f, columns=["id"]) for f in art["select"].files("documents")])
    assert sorted(kept["id"]) == sorted(ranked["id"][:n])
    m = art["select"].manifest["metrics"]
    assert m["chars_kept"] == ranked["chars"][:n].sum() >= budget > m["chars_kept"] - ranked["chars"][n - 1]
    assert m["kept_char_fraction"] == m["chars_kept"] / ranked["chars"].sum() >= cfg.select.fraction
    assert report["select"]["metrics"]["chars_kept"] == m["chars_kept"]  # on the report card
    # the tokenizer and pack saw exactly the selected documents
    assert art["tokenizer"].manifest["metrics"]["documents"] == len(kept) == m["docs_kept"]
    pm = art["pack"].manifest["metrics"]
    assert pm["train_docs"] + pm["val_docs"] == len(kept)


def test_interrupted_stage_resumes_from_its_checkpoint(trained):
    """Kill the pretrain stage after its first checkpoint; the rerun resumes instead of starting over."""
    root, _ = trained
    sets = ["pretrain.max_steps=60", "pretrain.checkpoint_every=20", "pretrain.seed=5"]
    script = (
        "import sys, time\n"
        "import tasks.core.train as t\n"
        "orig = t.save_checkpoint\n"
        "def slow(*a, **k):\n"
        "    orig(*a, **k); time.sleep(60)\n"
        "t.save_checkpoint = slow\n"
        "from flows.config import load_config\n"
        "from flows.pipeline import make_plan\n"
        "from tasks.core.stage import run_stage\n"
        "from tasks.core.store import Store\n"
        f"cfg = load_config({str(root / 'tiny.yaml')!r}, {sets!r})\n"
        "plan = make_plan(cfg)\n"
        "data = Store(cfg.run.data_root)\n"
        "inputs = {'packed': data.get('pack', plan.stages['pack'].key), 'tokenizer': data.get('tokenizer', plan.stages['tokenizer'].key)}\n"
        "run_stage(plan.stages['pretrain'].stage, plan.stages['pretrain'].cfg, inputs, Store(cfg.run.models_root))\n"
    )
    cfg = load_config(root / "tiny.yaml", sets)
    from flows.pipeline import make_plan

    key = make_plan(cfg).stages["pretrain"].key
    work = root / "models" / "pretrain" / f".work-{key}"
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120
    while not (work / "ckpt-20").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (work / "ckpt-20" / "state.json").exists()
    assert Store(root / "models").get("pretrain", key) is None
    resumed = run(root, sets, only=["pretrain"])["pretrain"]
    assert not resumed["cached"] and resumed["key"] == key
    manifest = Store(root / "models").get("pretrain", key).manifest
    assert manifest["metrics"]["resumed_from_step"] == 20 and manifest["metrics"]["steps"] == 60
    assert not work.exists()


def test_export_loads_in_transformers_with_matching_logits(trained, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    root, report = trained
    monkeypatch.chdir(root)
    result = CliRunner().invoke(app, ["export", "pretrain", str(tmp_path / "hf"), "-c", str(root / "tiny.yaml")])
    assert result.exit_code == 0, result.output
    ours = load_model(Path(Store(root / "models").get("pretrain", report["pretrain"]["key"]).path) / "model").eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([tok("def f(x):\n    return x + 1\n")["input_ids"][:60]])
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-4
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_sft_beats_the_base_model_on_held_out_problems(trained):
    root, report = trained
    base, tuned = report["eval_pretrain"]["metrics"], report["eval_sft"]["metrics"]
    assert tuned["pass_at_1"] > base["pass_at_1"], (base, tuned)
    # the eval table backs the number: greedy correctness per prompt
    import polars as pl

    art = Store(root / "data").get("eval", report["eval_sft"]["key"])
    results = pl.read_parquet(art.files("results"))
    per_task = results.group_by("task").agg(pl.col("greedy_correct").mean())
    assert abs(per_task["greedy_correct"].mean() - tuned["pass_at_1"]) < 1e-9


def test_sft_masks_prompts_and_records_lineage(trained):
    root, report = trained
    art = Store(root / "models").get("sft", report["sft"]["key"])
    m = art.manifest["metrics"]
    assert m["train_examples"] > 0 and 0 < m["train_target_tokens"] < m["train_rows"] * 129
    assert art.manifest["inputs"]["model"]["stage"] == "pretrain"
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    run_ = client.get_run(art.manifest["mlflow_run_id"])
    pretrain_model = Store(root / "models").get("pretrain", report["pretrain"]["key"]).manifest["info"]["mlflow_model_id"]
    assert [i.model_id for i in run_.inputs.model_inputs] == [pretrain_model]  # model-to-model lineage
    evals = [r for r in client.search_runs([run_.info.experiment_id], "tags.stage = 'eval'")]
    assert {r.info.run_name for r in evals} >= {"eval_pretrain", "eval_sft"}


def test_rl_raises_reward_records_history_and_registers(trained):
    """The last stage of the tiny DAG: GRPO from the SFT model with the balanced online filter."""
    import polars as pl

    root, report = trained
    names = list(report)
    assert names[names.index("sft"):][:2] == ["sft", "rl"] and "eval_rl" in report
    art = Store(root / "models").get("rl", report["rl"]["key"])
    m = art.manifest["metrics"]
    assert m["steps"] == 20 and m["resumed_from_step"] == 0 and 0 < m["kept_fraction"] < 1
    steps = pl.read_parquet(art.files("steps")).filter(pl.col("step") > 0).sort("step")
    reward = steps["reward_mean"].to_numpy()
    # RL on tiny raises the mean reward over its first steps (every step draws fresh prompts)
    assert reward[-5:].mean() > reward[:5].mean() + 0.02, reward
    on_policy = steps.filter(pl.col("ratio_mean").is_not_null())
    # a step whose rounds found no group inside the band makes no update (no ratio): rare, never most steps
    assert len(on_policy) >= 15 and (on_policy["ratio_mean"] == 1.0).all() and (on_policy["clip_fraction"] == 0).all()
    # balanced: every kept group has a pass rate strictly inside the band
    history = pl.read_parquet(art.files("history"))
    assert set(history.columns) >= {"step", "prompt_id", "task", "sample", "completion", "reward", "pass_rate", "kept"}
    kept = history.filter(pl.col("kept"))["pass_rate"]
    assert len(kept) and kept.min() > 0.2 and kept.max() < 0.8  # the default band (0.2, 0.8)
    dropped = history.filter(~pl.col("kept"))["pass_rate"]
    assert len(dropped) and ((dropped <= 0.2) | (dropped >= 0.8)).all()
    assert set(history["step"]) == set(range(1, 21))  # the step each group was drawn for, as in `steps`
    # the held-out evaluation of the RL model is on the report card beside SFT's, and RL loses nothing
    # beyond noise: within 2 standard errors of SFT's pass@1 (at rl.lr 0.003 it lost 0.06-0.09)
    sft_eval = report["eval_sft"]
    tasks = sorted(sft_eval["accuracy"])
    se = mean_standard_error([sft_eval["accuracy"][t] for t in tasks], [sft_eval["prompts"][t] for t in tasks])
    assert 0 < se < 0.1 and report["eval_rl"]["metrics"]["pass_at_1"] >= sft_eval["metrics"]["pass_at_1"] - 2 * se
    assert art.manifest["info"]["registered_version"] == "1"
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    assert str(client.get_registered_model("slmflow-rl").latest_versions[0].version) == "1"
    run_ = client.get_run(art.manifest["mlflow_run_id"])
    assert {"reward_mean", "kept_fraction", "zero_variance_fraction", "generation_seconds", "train_seconds",
            "generated_tokens_per_s", "clip_fraction", "check_pass_at_1"} <= set(run_.data.metrics)
    assert "plots/rl_curve.png" in {a.path for a in client.list_artifacts(run_.info.run_id, "plots")}
    sft_model = Store(root / "models").get("sft", report["sft"]["key"]).manifest["info"]["mlflow_model_id"]
    assert [i.model_id for i in run_.inputs.model_inputs] == [sft_model]
    # `slmflow difficulty PROMPT_ID` shows the prompt's pass rate at each RL step it was drawn
    drawn = history.filter(pl.col("sample") == 0).row(0, named=True)
    result = CliRunner().invoke(app, ["difficulty", drawn["prompt_id"], "-c", str(root / "tiny.yaml")])
    assert result.exit_code == 0, result.output
    assert f"rl {art.key}" in result.output and f"{drawn['pass_rate']:.3f}" in result.output
    missing = CliRunner().invoke(app, ["difficulty", "no-such-prompt", "-c", str(root / "tiny.yaml")])
    assert missing.exit_code == 1 and "appears in no difficulty table" in missing.output


def test_rl_resumes_after_a_kill_exactly_like_a_straight_run(trained, tmp_path):
    """Kill RL after its first checkpoint; the rerun resumes (prompt cursor, optimizer, RNG) and ends
    with the same weights and step records as a run that was never interrupted."""
    from tasks.core.stage import run_stage
    from tasks.rl import STAGE as RL, RLConfig

    root, report = trained
    data, models = Store(root / "data"), Store(root / "models")
    inputs = {"model": models.get("sft", report["sft"]["key"]), "prompts": data.get("prompts", report["prompts"]["key"])}
    settings = dict(max_steps=4, batch_prompts=4, num_generations=4, max_completion_length=12, filter="mixed", lr=1e-3,
                    max_generation_rounds=2, eval_every=2, eval_prompts_per_task=5, checkpoint_every=2, seed=3)
    straight = run_stage(RL, RLConfig(**settings), inputs, Store(tmp_path / "straight")).artifact
    killed = tmp_path / "killed"
    script = (
        "import time, json\n"
        "import tasks.rl as rl\n"
        "import tasks.rl.loop as loop\n"
        "orig = loop.save_checkpoint\n"
        "def slow(*a, **k):\n"
        "    orig(*a, **k); time.sleep(60)\n"
        "loop.save_checkpoint = slow\n"
        "from tasks.core.stage import run_stage\n"
        "from tasks.core.store import Store\n"
        f"inputs = {{'model': Store({str(root / 'models')!r}).get('sft', {report['sft']['key']!r}), "
        f"'prompts': Store({str(root / 'data')!r}).get('prompts', {report['prompts']['key']!r})}}\n"
        f"run_stage(rl.STAGE, rl.RLConfig(**json.loads({json.dumps(json.dumps(settings))})), inputs, Store({str(killed)!r}))\n"
    )
    work = killed / "rl" / f".work-{straight.key}"
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120
    while not (work / "ckpt-2" / "state.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (work / "ckpt-2").exists() and Store(killed).get("rl", straight.key) is None
    resumed = run_stage(RL, RLConfig(**settings), inputs, Store(killed)).artifact
    assert resumed.key == straight.key and resumed.manifest["metrics"]["resumed_from_step"] == 2
    for name in ("model/model.safetensors", "steps/part-00000.parquet", "history/part-00000.parquet"):
        assert resumed.manifest["files"][name] == straight.manifest["files"][name], name
