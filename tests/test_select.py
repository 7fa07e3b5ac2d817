"""The select stage: the budget rule (shortest ranked prefix reaching fraction x total), each
method's ranking against an oracle, units, sharding independence and errors."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from tokenizers import pre_tokenizers, trainers

from tasks.core.stage import StageError, run_stage
from tasks.core.store import Artifact, Store, write_parquet
from tasks.select import STAGE, SelectConfig, budget_prefix
from tasks.core.tokens import doc_hash
from tasks.tokenizer import TokenizerConfig, new_tokenizer


def corpus(n: int = 60, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "x", "yy", "héllo", "naïve"]
    return pl.DataFrame({
        "id": [f"d{i:03d}" for i in rng.permutation(n)],
        "text": [" ".join(rng.choice(words, rng.integers(1, 40))) for _ in range(n)],
        "source": ["t"] * n,
        "extra": list(range(n)),  # carried through
        "quality_kept": (rng.random(n) < 0.7).tolist(),
        "score": np.round(rng.random(n), 2),  # rounded: ties, broken by id
    })


def documents(root, df: pl.DataFrame, shard_rows: int, name: str = "docs") -> Artifact:
    out = root / name
    for s in range(0, len(df), shard_rows):
        write_parquet(df.slice(s, shard_rows).drop("score").to_arrow(), out / "documents" / f"part-{s // shard_rows:05d}.parquet")
    files = {f"documents/{p.name}": "" for p in sorted((out / "documents").iterdir())}
    return Artifact(stage="quality", key=name, path=str(out), manifest={"files": files})


def scores(root, df: pl.DataFrame, name: str = "scores") -> Artifact:
    out = root / name
    table = df.select(doc_id="id", preselect_score="score", chars=pl.col("text").str.len_chars().cast(pl.Int64))
    for s in range(0, len(df), 25):
        write_parquet(table.slice(s, 25).to_arrow(), out / "scores" / f"part-{s // 25:05d}.parquet")
    files = {f"scores/{p.name}": "" for p in sorted((out / "scores").iterdir())}
    return Artifact(stage="preselect", key=name, path=str(out), manifest={"files": files})


def kept(art: Artifact) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(f) for f in art.files("documents")])


def check_budget(ranked_sizes: list[int], n_kept: int, fraction: float) -> None:
    """Kept = the shortest prefix of the ranking whose size reaches fraction x total."""
    budget = fraction * sum(ranked_sizes)
    assert sum(ranked_sizes[:n_kept]) >= budget
    assert sum(ranked_sizes[:n_kept - 1]) < budget


def test_budget_prefix():
    assert budget_prefix([5, 3, 2], 0.5) == 1  # 5 >= 5 exactly
    assert budget_prefix([5, 3, 2], 0.51) == 2
    assert budget_prefix([5, 3, 2], 1.0) == 3
    assert budget_prefix([1, 1, 1, 1], 0.3) == 2
    assert budget_prefix([], 0.5) == 0


@pytest.mark.parametrize("fraction", [0.1, 0.37, 0.5, 1.0])
def test_preselect_keeps_the_top_scored_prefix(tmp_path, fraction):
    df = corpus()
    art = run_stage(STAGE, SelectConfig(method="preselect", fraction=fraction),
                    {"documents": documents(tmp_path, df, 17), "scores": scores(tmp_path, df)}, Store(tmp_path / "s")).artifact
    ranked = df.with_columns(chars=pl.col("text").str.len_chars()).sort(["score", "id"], descending=[True, False])
    out = kept(art)
    check_budget(ranked["chars"].to_list(), len(out), fraction)
    assert set(out["id"]) == set(ranked["id"][:len(out)])
    assert out.columns == ["id", "text", "source", "extra", "quality_kept"]
    m = art.manifest["metrics"]
    total = int(ranked["chars"].sum())
    assert (m["docs_in"], m["docs_kept"], m["chars_in"]) == (60, len(out), total)
    assert m["chars_kept"] == int(out["text"].str.len_chars().sum()) and m["kept_char_fraction"] == m["chars_kept"] / total
    assert m["budget"] == pytest.approx(fraction * total)
    # one shard per input shard, same names, rows in input order
    assert [f.rsplit("/", 1)[-1] for f in art.files("documents")] == [f"part-{i:05d}.parquet" for i in range(4)]
    assert out["extra"].to_list() == sorted(out["extra"])


def test_random_is_seeded_and_independent_of_sharding(tmp_path):
    df = corpus(80, 1)
    runs = {}
    for seed, shard_rows in [(0, 7), (0, 100), (1, 7)]:
        docs = documents(tmp_path, df, shard_rows, f"docs{shard_rows}")
        art = run_stage(STAGE, SelectConfig(method="random", fraction=0.3, seed=seed), {"documents": docs},
                        Store(tmp_path / f"s{seed}-{shard_rows}")).artifact
        runs[seed, shard_rows] = set(kept(art)["id"])
    assert runs[0, 7] == runs[0, 100] and runs[0, 7] != runs[1, 7]
    ids = df["id"].to_list()
    order = np.lexsort((np.array(ids), doc_hash(ids, 0)))
    sizes = df["text"].str.len_chars().to_numpy()[order].tolist()
    check_budget(sizes, len(runs[0, 7]), 0.3)
    assert runs[0, 7] == {ids[i] for i in order[:len(runs[0, 7])]}


def test_quality_and_none(tmp_path):
    df = corpus()
    docs = documents(tmp_path, df, 25)
    q = kept(run_stage(STAGE, SelectConfig(method="quality"), {"documents": docs}, Store(tmp_path / "q")).artifact)
    assert q["id"].to_list() == df.filter(pl.col("quality_kept"))["id"].to_list()
    everything = run_stage(STAGE, SelectConfig(method="none", fraction=0.1), {"documents": docs}, Store(tmp_path / "n")).artifact
    assert kept(everything)["id"].to_list() == df["id"].to_list()
    assert everything.manifest["metrics"]["kept_char_fraction"] == 1.0
    plain = documents(tmp_path, df.drop("quality_kept"), 25, "plain")
    with pytest.raises(StageError, match="method quality needs a quality_kept column"):
        run_stage(STAGE, SelectConfig(method="quality"), {"documents": plain}, Store(tmp_path / "e"))


def test_token_budget(tmp_path):
    df = corpus(40, 2)
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=280, min_frequency=2, special_tokens=TokenizerConfig().special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(df["text"].to_list(), trainer)
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    tokenizer = Artifact(stage="tokenizer", key="t", path=str(tmp_path / "tok"), manifest={"files": {}})
    art = run_stage(STAGE, SelectConfig(method="preselect", fraction=0.4, unit="tokens"),
                    {"documents": documents(tmp_path, df, 15), "scores": scores(tmp_path, df), "tokenizer": tokenizer},
                    Store(tmp_path / "s")).artifact
    ranked = df.sort(["score", "id"], descending=[True, False])
    tokens = [len(tok.encode(t).ids) + 1 for t in ranked["text"]]  # + <|bos|>, as pack counts
    out = kept(art)
    check_budget(tokens, len(out), 0.4)
    m = art.manifest["metrics"]
    assert m["units_in"] == sum(tokens) and m["units_kept"] == sum(tokens[:len(out)])
    with pytest.raises(StageError, match="unit tokens needs a 'tokenizer' input"):
        run_stage(STAGE, SelectConfig(unit="tokens"), {"documents": documents(tmp_path, df, 15)}, Store(tmp_path / "x"))


def test_preselect_errors(tmp_path):
    df = corpus()
    docs = documents(tmp_path, df, 25)
    with pytest.raises(StageError, match="needs a 'scores' input"):
        run_stage(STAGE, SelectConfig(), {"documents": docs}, Store(tmp_path / "a"))
    partial = scores(tmp_path, df.slice(0, 59), "partial")
    with pytest.raises(StageError, match=f"document {df['id'][59]} has no preselect_score"):
        run_stage(STAGE, SelectConfig(), {"documents": docs, "scores": partial}, Store(tmp_path / "b"))


@pytest.mark.parametrize("method", ["none", "quality", "random", "preselect"])
def test_drop_sources_removes_a_source_before_selecting(tmp_path, method):
    df = corpus(60, 3).with_columns(source=pl.Series(["a", "b", "c"] * 20))
    docs, sc = documents(tmp_path, df, 17), scores(tmp_path, df)
    cfg = SelectConfig(method=method, fraction=0.5, drop_sources=["b"])
    art = run_stage(STAGE, cfg, {"documents": docs, "scores": sc}, Store(tmp_path / "s")).artifact
    out = kept(art)
    assert "b" not in set(out["source"]) and art.manifest["metrics"]["dropped.dropped_source"] == 20
    rest = df.filter(pl.col("source") != "b")
    if method == "none":
        assert out["id"].to_list() == rest["id"].to_list()
    elif method == "quality":
        assert out["id"].to_list() == rest.filter(pl.col("quality_kept"))["id"].to_list()
    else:  # the same documents as selecting from a corpus that never had source b
        alone = run_stage(STAGE, cfg.model_copy(update={"drop_sources": []}),
                          {"documents": documents(tmp_path, rest, 17, "rest"), "scores": sc}, Store(tmp_path / "r")).artifact
        assert set(out["id"]) == set(kept(alone)["id"])
        assert art.manifest["metrics"]["budget"] == pytest.approx(0.5 * rest["text"].str.len_chars().sum())


def test_scored_twice_everything_dropped_and_memory_limit(tmp_path):
    """A document scored twice is an error; a mixture that drops every source keeps nothing (budget 0);
    duckdb's memory_limit is a runtime setting: same key, same output."""
    from tasks.core.store import stage_key

    df = corpus()
    docs = documents(tmp_path, df, 25)
    twice = scores(tmp_path, pl.concat([df, df.slice(7, 1)]), "twice")
    with pytest.raises(StageError, match=f"select: input 'scores' holds document {df['id'][7]} more than once"):
        run_stage(STAGE, SelectConfig(), {"documents": docs, "scores": twice}, Store(tmp_path / "a"))
    cfg = SelectConfig(method="random", drop_sources=["t"])
    none = run_stage(STAGE, cfg, {"documents": docs}, Store(tmp_path / "b")).artifact
    assert len(kept(none)) == 0 and none.manifest["metrics"]["budget"] == 0.0
    sc = scores(tmp_path, df)
    inputs = {"documents": docs, "scores": sc}
    outs = [run_stage(STAGE, SelectConfig(memory_limit=limit), inputs, Store(tmp_path / limit)).artifact for limit in ("64MB", "2GB")]
    assert outs[0].key == outs[1].key == stage_key("select", STAGE.version, SelectConfig(), {k: a.key for k, a in inputs.items()})
    assert outs[0].manifest["files"] == outs[1].manifest["files"]
