"""The eval and difficulty stages: metrics recomputed from their tables, oracle/garbage models,
pass rates against a brute-force recount, the band's strict ends, determinism."""

from __future__ import annotations

from collections import Counter

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ONE_DIGIT_ARITHMETIC
from tokenizers import pre_tokenizers, trainers

from tasks import difficulty as D
from tasks import eval as E
from tasks import prompts as P
from tasks.core import chat
from tasks.core.rollout import in_band
from tasks.core.outputs import kept_ids, load_pass_rates, load_prompts
from tasks.core.model import GPT, ModelConfig, save_model
from tasks.core.rollout import end_id
from tasks.core.stage import run_stage
from tasks.core.store import Store
from tasks.tokenizer import TokenizerConfig, new_tokenizer

TASKS = {"basic_arithmetic": ONE_DIGIT_ARITHMETIC,
         "leg_counting": {"min_animals": 1, "max_animals": 2, "min_instances": 1, "max_instances": 4}}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A store with a real prompts output, a tokenizer trained on it and a tiny random model."""
    store = Store(tmp_path_factory.mktemp("store"))
    prompts = run_stage(P.STAGE, P.PromptsConfig(tasks=TASKS, train_size=12, eval_size=6), {}, store).artifact
    rows = load_prompts(prompts, "train") + load_prompts(prompts, "eval")
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=320, min_frequency=2, special_tokens=TokenizerConfig().special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([r["question"] + "\n" + chat.completion_text(r["answer"]) for r in rows] * 2, trainer)
    torch.manual_seed(0)
    gpt = GPT(ModelConfig(vocab_size=tok.get_vocab_size(), depth=1, width=32, max_seq_len=256)).eval()
    scratch = store.scratch("pretrain")
    save_model(gpt, scratch / "model")
    tok.save(str(scratch / "model" / "tokenizer.json"))
    model = store.commit(scratch, "pretrain", "tiny", {"stage": "pretrain"})
    return {"store": store, "prompts": prompts, "model": model, "tok": tok, "gpt": gpt}


class FakeModel:
    """`generate` answers "Answer: <gold>" or "Answer: zzz" per sequence, as `decide(row, j, temperature,
    generator)` says, where j counts the times this prompt was seen so far."""

    def __init__(self, tok, rows, decide):
        self.rows = {tuple(chat.prompt_ids(tok, r["question"])): r for r in rows}
        self.tok, self.decide, self.seen = tok, decide, Counter()

    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, eos_id=None, generator=None,
                 use_cache=True):
        assert eos_id == end_id(self.tok) and use_cache
        out = []
        for p in prompts:
            row, j = self.rows[tuple(p)], self.seen[tuple(p)]
            self.seen[tuple(p)] += 1
            answer = row["answer"] if self.decide(row, j, temperature, generator) else "zzz"
            out.append((chat.encode_plain(self.tok, chat.completion_text(answer)) + [eos_id])[:max_new_tokens])
        return out


def coin(p_of):
    """Correct with probability p_of(row) per sample (one draw from the generator); greedy: p >= 0.5."""
    def decide(row, j, temperature, generator):
        if temperature == 0:
            return p_of(row) >= 0.5
        return torch.rand(1, generator=generator).item() < p_of(row)
    return decide


def varied_p(row) -> float:
    return [0.0, 0.3, 0.5, 0.8, 1.0][int(row["id"], 16) % 5]


def use_model(monkeypatch, module, env, fake):
    """The stage (eval or difficulty) scores `fake` instead of the model input."""
    from tasks.core import rollout

    monkeypatch.setattr(rollout, "load_policy", lambda artifact, device: (fake, env["tok"]))


def table(artifact, name) -> pl.DataFrame:
    return pl.concat([pl.from_arrow(pq.read_table(p)) for p in artifact.files(name)])


def run(stage, cfg, env):
    return run_stage(stage, cfg, {"model": env["model"], "prompts": env["prompts"]}, env["store"], force=True).artifact


# ------------------------------------------------------------------------------------------
# eval


@pytest.mark.parametrize("always", [True, False])
def test_eval_oracle_scores_one_and_garbage_zero(env, monkeypatch, always):
    rows = load_prompts(env["prompts"], "eval")
    use_model(monkeypatch, E, env, FakeModel(env["tok"], rows, lambda *a: always))
    art = run(E.STAGE, E.EvalConfig(k=3, device="cpu"), env)
    m, want = art.manifest["metrics"], float(always)
    for name in E.MEASURES[:3]:
        assert m[name] == want and all(m[f"{name}.{t}"] == want for t in TASKS)
    results = table(art, "results")
    assert results["prompt_id"].to_list() == [r["id"] for r in rows]
    if always:
        assert results["greedy_answer"].to_list() == [r["answer"] for r in rows]
    assert (results["samples_correct"] == (3 if always else 0)).all()


def test_eval_metrics_match_the_results_table(env, monkeypatch):
    rows = load_prompts(env["prompts"], "eval")
    use_model(monkeypatch, E, env, FakeModel(env["tok"], rows, coin(varied_p)))
    art = run(E.STAGE, E.EvalConfig(k=4, max_prompts_per_task=5, device="cpu", batch_size=6), env)
    results = table(art, "results")
    assert results.columns == ["prompt_id", "task", "greedy_completion", "greedy_answer", "greedy_score",
                               "greedy_correct", "samples_correct", "k", "completion_tokens"]
    assert sorted(Counter(results["task"]).values()) == [5, 5]
    by_id = {r["id"]: r for r in rows}
    m, per_task = art.manifest["metrics"], {}
    for r in results.iter_rows(named=True):
        row = by_id[r["prompt_id"]]
        assert r["greedy_answer"] == chat.extract_answer(r["greedy_completion"])
        assert r["greedy_score"] == chat.score(row, r["greedy_completion"])
        assert r["greedy_correct"] == (r["greedy_score"] == 1.0) == (varied_p(row) >= 0.5)
        assert r["k"] == 4 and 0 <= r["samples_correct"] <= 4
        per_task.setdefault(r["task"], []).append(r)
    for task, rs in per_task.items():
        assert m[f"pass_at_1.{task}"] == pytest.approx(np.mean([r["greedy_correct"] for r in rs]))
        assert m[f"pass_at_k.{task}"] == pytest.approx(np.mean([r["samples_correct"] > 0 for r in rs]))
        assert m[f"sampled_pass_at_1.{task}"] == pytest.approx(np.mean([r["samples_correct"] / 4 for r in rs]))
        assert m[f"completion_tokens.{task}"] == pytest.approx(np.mean([r["completion_tokens"] for r in rs]))
    for name in E.MEASURES:
        assert m[name] == pytest.approx(np.mean([m[f"{name}.{t}"] for t in per_task]))
    assert 0 < m["pass_at_1"] < 1 and m["pass_at_1"] <= m["pass_at_k"]
    assert set(E.STAGE.report_metrics) <= set(m)


def test_eval_real_model_is_deterministic(env):
    cfg = E.EvalConfig(k=2, max_prompts_per_task=3, max_completion_length=8, batch_size=4, device="cpu")
    a = run(E.STAGE, cfg, env)
    results = table(a, "results")
    assert len(results) == 6 and a.rows == {"results": 6}
    assert ((results["completion_tokens"] >= 1) & (results["completion_tokens"] <= 8)).all()
    b = run(E.STAGE, cfg, env)
    assert table(b, "results").equals(results)
    assert a.manifest["files"] == b.manifest["files"]  # same bytes


# ------------------------------------------------------------------------------------------
# difficulty


def brute_force_counts(model, tok, rows, cfg) -> tuple[list[int], list[list[float]]]:
    """Regenerate with the documented layout (prompt i's k copies in place, batches of batch_size,
    one generator), then decode and score every sample on its own."""
    seqs = [(i, chat.prompt_ids(tok, r["question"])) for i, r in enumerate(rows) for _ in range(cfg.k)]
    g = torch.Generator().manual_seed(cfg.seed)
    rewards = [[] for _ in rows]
    for s in range(0, len(seqs), cfg.batch_size):
        batch = seqs[s:s + cfg.batch_size]
        outs = model.generate([p for _, p in batch], cfg.max_completion_length, temperature=cfg.temperature,
                              top_k=cfg.top_k, eos_id=end_id(tok), generator=g, use_cache=True)
        for (i, _), ids in zip(batch, outs):
            rewards[i].append(chat.score(rows[i], chat.decode_completion(tok, ids)))
    return [sum(x == 1.0 for x in rs) for rs in rewards], rewards


def test_difficulty_pass_rates_match_a_brute_force_count(env, monkeypatch):
    rows = load_prompts(env["prompts"], "train")[:100]
    cfg = D.DifficultyConfig(k=6, max_prompts_per_task=7, batch_size=10, seed=5, device="cpu")
    use_model(monkeypatch, D, env, FakeModel(env["tok"], rows, coin(varied_p)))
    art = run(D.STAGE, cfg, env)
    rates = load_pass_rates(art)
    assert rates.columns == ["prompt_id", "task", "k", "correct", "pass_rate", "kept"]
    chosen = [r for r in rows if r["id"] in set(rates["prompt_id"])]
    assert [r["id"] for r in chosen] == rates["prompt_id"].to_list()
    assert sorted(Counter(rates["task"]).values()) == [7, 7]
    counts, rewards = brute_force_counts(FakeModel(env["tok"], rows, coin(varied_p)), env["tok"], chosen, cfg)
    assert rates["correct"].to_list() == counts
    assert 0 < sum(counts) < 6 * len(chosen)  # a mix, not all-or-nothing
    assert rates["pass_rate"].to_list() == [c / 6 for c in counts]
    samples = table(art, "samples")
    assert samples["reward"].to_list() == [x for rs in rewards for x in rs]
    assert samples["sample"].to_list() == list(range(6)) * len(chosen)


def test_difficulty_real_model_matches_regeneration_and_is_deterministic(env):
    cfg = D.DifficultyConfig(k=3, max_prompts_per_task=3, max_completion_length=6, batch_size=4, seed=2, device="cpu")
    a = run(D.STAGE, cfg, env)
    rates, samples = load_pass_rates(a), table(a, "samples")
    rows = {r["id"]: r for r in load_prompts(env["prompts"], "train")}
    chosen = [rows[i] for i in rates["prompt_id"]]
    tok, gpt = env["tok"], env["gpt"]
    g = torch.Generator().manual_seed(2)
    seqs = [chat.prompt_ids(tok, r["question"]) for r in chosen for _ in range(3)]
    texts = [chat.decode_completion(tok, ids) for s in range(0, len(seqs), 4)
             for ids in gpt.generate(seqs[s:s + 4], 6, temperature=1.0, eos_id=end_id(tok), generator=g)]
    assert samples["completion"].to_list() == texts
    counts, _ = brute_force_counts(gpt, tok, chosen, cfg)
    assert rates["correct"].to_list() == counts
    b = run(D.STAGE, cfg, env)
    assert a.manifest["files"] == b.manifest["files"]  # same seed: the same bytes


def test_band_keeps_exactly_the_strict_interior(env, monkeypatch):
    rows = load_prompts(env["prompts"], "train")
    plan = {r["id"]: [0, 1, 2, 5, 9, 10][i % 6] for i, r in enumerate(rows)}  # correct samples out of 10
    fake = FakeModel(env["tok"], rows, lambda row, j, t, g: j < plan[row["id"]])
    use_model(monkeypatch, D, env, fake)
    art = run(D.STAGE, D.DifficultyConfig(k=10, max_prompts_per_task=None, device="cpu"), env)
    rates = load_pass_rates(art)
    assert len(rates) == len(rows)
    assert rates["correct"].to_list() == [plan[i] for i in rates["prompt_id"]]
    assert set(rates["pass_rate"].to_list()) == {0.0, 0.1, 0.2, 0.5, 0.9, 1.0}
    expected = {i for i, c in plan.items() if c in (2, 5)}  # 0.1 and 0.9 themselves are out
    assert kept_ids(art) == expected
    assert rates["kept"].to_list() == [in_band(p, (0.1, 0.9)) for p in rates["pass_rate"]]
    m = art.manifest["metrics"]
    assert m["kept"] == len(expected) and m["kept_fraction"] == pytest.approx(len(expected) / len(rows))
    assert m["frac_zero"] == pytest.approx(sum(c == 0 for c in plan.values()) / len(rows))
    assert m["frac_one"] == pytest.approx(sum(c == 10 for c in plan.values()) / len(rows))
    for t in TASKS:
        sub = rates.filter(pl.col("task") == t)
        assert m[f"kept_fraction.{t}"] == pytest.approx(sub["kept"].mean())
        assert m[f"pass_rate.{t}"] == pytest.approx(sub["pass_rate"].mean())


def test_in_band_is_strict_on_scalars_and_arrays():
    band = (0.1, 0.9)
    values = [0.0, 0.1, 0.1000001, 0.5, 0.8999999, 0.9, 1.0]
    want = [False, False, True, True, True, False, False]
    assert [in_band(v, band) for v in values] == want
    assert in_band(np.array(values), band).tolist() == want
    assert in_band(pl.Series(values), band).to_list() == want
    assert [in_band(c / 10, band) for c in range(11)] == [False, False] + [True] * 7 + [False, False]
    assert in_band(0.0, (0.0, 1.0)) is False and in_band(0.5, (0.0, 1.0)) is True


def test_bad_band_is_a_config_error():
    from pydantic import ValidationError

    from tasks.rl import RLConfig

    for band in [(0.9, 0.1), (0.5, 0.5), (-0.1, 0.5), (0.2, 1.5)]:
        for cls in (D.DifficultyConfig, RLConfig):
            with pytest.raises(ValidationError, match=r"band\n.*need 0 <= low < high <= 1"):
                cls(band=band)
