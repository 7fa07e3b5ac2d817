"""The prompts stage (generation, ids, decontamination of train from eval) and the decontaminate stage."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import decontaminate, prompts
from tasks.core import gym
from tasks.core.chat import completion_text, score
from tasks.core.stage import StageError, run_stage
from tasks.core.store import Artifact, Store, canonical_json, write_parquet
from tasks.core.outputs import load_prompts
from tasks.core.tokens import normalize
from tasks.prompts import DEFAULT_TASKS, STAGE, PromptsConfig, generate

SMALL = PromptsConfig(train_size=150, eval_size=30, shard_rows=100)
# 2 one-digit terms and "+" only: 11 x 11 = 121 distinct questions, so train and eval overlap.
TINY_SPACE = {"basic_arithmetic": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1,
                                   "operators": ["+"], "allow_parentheses": False, "allow_negation": False}}

GCD = {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 30}

@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Artifact:
    return run_stage(STAGE, SMALL, {}, Store(tmp_path_factory.mktemp("prompts"))).artifact


def test_tables(small):
    train, evals = load_prompts(small, "train"), load_prompts(small, "eval")
    assert small.rows == {"train": len(train), "eval": len(evals)}
    assert list(train[0]) == ["id", "task", "difficulty", "question", "answer", "solution", "metadata"]
    assert len(small.files("train")) == -(-len(train) // 100) and len(small.files("eval")) == 1
    for split, rows, size in (("train", train, SMALL.train_size), ("eval", evals, SMALL.eval_size)):
        assert {r["task"] for r in rows} == set(DEFAULT_TASKS)
        for task in DEFAULT_TASKS:
            n = sum(r["task"] == task for r in rows)
            assert 0 < n <= size and n == small.manifest["metrics"][f"{split}.{task}"]
        assert len({r["id"] for r in rows}) == len(rows)
        assert len({normalize(r["question"]) for r in rows}) == len(rows)  # no duplicates within a split
    assert not {normalize(r["question"]) for r in train} & {normalize(r["question"]) for r in evals}
    assert not {r["id"] for r in train} & {r["id"] for r in evals}
    row = train[0]
    assert row["difficulty"] == canonical_json(DEFAULT_TASKS[row["task"]])
    assert isinstance(json.loads(row["metadata"]), dict) and row["solution"] is None
    assert score(row, completion_text(row["answer"])) == 1.0
    assert all(small.manifest["metrics"][f"gold_rejected.{t}"] == 0 for t in DEFAULT_TASKS)


def test_rows_whose_gold_answer_fails_the_verifier_are_dropped_and_counted(monkeypatch, tmp_path):
    """A minority of rejected gold answers: dropped from the split, counted per task, the stage goes on."""
    real = prompts.score
    monkeypatch.setattr(prompts, "score", lambda row, text: 0.0 if row["answer"] == "1" else real(row, text))
    cfg = PromptsConfig(tasks={"gcd": GCD}, train_size=60, eval_size=20)
    art = run_stage(STAGE, cfg, {}, Store(tmp_path)).artifact
    rows = load_prompts(art, "train") + load_prompts(art, "eval")
    ones = sum(r["answer"] == "1" for r in generate("gcd", cfg.tasks["gcd"], "train", 0, 60))
    assert rows and "1" not in {r["answer"] for r in rows} and 0 < ones < 30
    assert art.manifest["metrics"]["gold_rejected.gcd"] >= ones


def test_same_config_same_bytes(small, tmp_path):
    # The tasks dict in another order is the same config (canonical JSON) and gives the same bytes.
    shuffled = SMALL.model_copy(update={"tasks": dict(reversed(list(SMALL.tasks.items())))})
    again = run_stage(STAGE, shuffled, {}, Store(tmp_path)).artifact
    assert again.key == small.key
    assert again.manifest["files"] == small.manifest["files"]  # sha256 of every shard
    assert load_prompts(again, "eval") == load_prompts(small, "eval")


def test_ids_are_stable():
    a = generate("gcd", GCD, "train", 3, 20)
    b = generate("gcd", GCD, "train", 3, 30)
    assert a == b[:20]  # a prefix: growing train_size only adds rows
    assert a[0]["id"] == prompts.prompt_id("gcd", "train", 3, 0)
    assert a[0]["id"] != generate("gcd", GCD, "eval", 3, 1)[0]["id"]


def test_neighbouring_seeds_are_disjoint():
    # reasoning-gym builds item i from Random(seed + i): raw seeds 0 and 1 would share 99 of 100
    # items. The generator seed is a hash, so neighbouring seeds give unrelated items.
    kwargs = {"min_animals": 3, "max_animals": 6}  # a large question space: no chance overlap
    a = {r["question"] for r in generate("leg_counting", kwargs, "train", 0, 100)}
    b = {r["question"] for r in generate("leg_counting", kwargs, "eval", 1, 100)}
    assert len(a) == len(b) == 100 and not a & b
    assert prompts.generator_seed("gcd", 0) != prompts.generator_seed("gcd", 1) != prompts.generator_seed("lcm", 1)


def test_planted_overlap_is_removed(tmp_path):
    cfg = PromptsConfig(tasks=TINY_SPACE, train_size=300, eval_size=20, train_seed=5, eval_seed=9)
    out = run_stage(STAGE, cfg, {}, Store(tmp_path)).artifact
    m = out.manifest["metrics"]
    raw_train = generate("basic_arithmetic", TINY_SPACE["basic_arithmetic"], "train", 5, 300)
    raw_eval = generate("basic_arithmetic", TINY_SPACE["basic_arithmetic"], "eval", 9, 20)
    eval_q = {normalize(r["question"]) for r in raw_eval}
    train_q = {normalize(r["question"]) for r in raw_train}
    overlap = len(train_q & eval_q)
    assert overlap > 0 and m["decontaminated.basic_arithmetic"] == m["decontaminated"] == overlap
    assert m["duplicates_dropped.eval"] == 20 - len(eval_q)
    assert m["duplicates_dropped.train"] == 300 - len(train_q)
    assert m["duplicates_dropped"] == m["duplicates_dropped.eval"] + m["duplicates_dropped.train"]
    train = load_prompts(out, "train")
    assert len(train) == len(train_q) - overlap == m["train.basic_arithmetic"]
    assert not {normalize(r["question"]) for r in train} & eval_q
    # the first occurrence is the one kept
    firsts = {}
    for r in raw_train:
        firsts.setdefault(normalize(r["question"]), r["id"])
    assert [r["id"] for r in train] == [i for q, i in firsts.items() if q not in eval_q]


def test_normalize():
    assert normalize("  Calculate\t4 +\n\n 5. ") == "calculate 4 + 5."
    assert normalize("Cafe\u0301") == normalize("Café")


def test_worked_solution():
    row = generate("gsm_symbolic", {}, "train", 0, 1)[0]
    cot = json.loads(row["metadata"])["answer_cot"]
    assert cot.rstrip().endswith(f"#### {row['answer']}")
    assert row["solution"] and "####" not in row["solution"] and cot.startswith(row["solution"])
    assert gym.solution_of({"answer_cot": "#### 5"}) is None
    assert gym.solution_of({"answer_cot": "a\nb\n#### 5\n"}) == "a\nb"


@pytest.mark.parametrize("update, setting", [
    ({"eval_seed": 0, "train_seed": 0}, "prompts.eval_seed"),
    ({"tasks": {}}, "prompts.tasks"),
    ({"tasks": {"no_such_task": {}}}, "unknown task 'no_such_task'"),
    ({"tasks": {"gcd": {"min_value": 1, "max_value": 100, "seed": 3}}}, "prompts.tasks.gcd: may not set"),
    ({"tasks": {"basic_arithmetic": {"min_terms": 0}}}, "prompts.tasks.basic_arithmetic: bad generator settings"),
    ({"tasks": {"gcd": {"no_such_kwarg": 1}}}, "prompts.tasks.gcd: bad generator settings"),
    # the config class takes them; the generator breaks on its first item (it wants its enum, YAML gives strings)
    ({"tasks": {"aiw": {"task_types": ["siblings"], "task_type_weights": [1.0]}}},
     r"prompts.tasks.aiw: bad generator settings \(AttributeError: 'str' object has no attribute 'value'\)"),
    # no gold answers (its verifier checks the logic itself): nothing to teach or reward
    ({"tasks": {"propositional_logic": {}}, "train_size": 20, "eval_size": 10},
     "prompts.tasks.propositional_logic: its verifier rejects 10 of 10 eval gold answers given as 'Answer: <gold>' "
     r"\(e.g. answer None\): slmflow trains on gold answers"),
])
def test_bad_settings(tmp_path, update, setting):
    cfg = PromptsConfig(**{**SMALL.model_dump(), **update})
    with pytest.raises(StageError, match=setting) as err:
        run_stage(STAGE, cfg, {}, Store(tmp_path))
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "prompts").glob("*/manifest.json"))


def test_load_prompts_bad_split(small):
    with pytest.raises(ValueError, match="split"):
        load_prompts(small, "test")


# ---------------------------------------------------------------------------------------
# decontaminate

DOC_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string()),
                        ("dup_cluster", pa.string())])


def make_documents(root: Path, shards: list[list[tuple[str, str, str]]]) -> Artifact:
    """A fake dedup output: shards of (id, text, source) plus an empty dup_cluster column."""
    out = root / "dedup" / "k"
    for n, rows in enumerate(shards):
        cols = {"id": [r[0] for r in rows], "text": [r[1] for r in rows], "source": [r[2] for r in rows],
                "dup_cluster": [None] * len(rows)}
        write_parquet(pa.table(cols, schema=DOC_SCHEMA), out / "documents" / f"part-{n:05d}.parquet")
    files = {f"documents/{p.name}": "" for p in sorted((out / "documents").iterdir())}
    return Artifact(stage="dedup", key="k", path=str(out), manifest={"files": files, "rows": {}})


def test_decontaminate(small, tmp_path):
    evals = load_prompts(small, "eval")
    e1, e2, e3 = evals[0], evals[40], evals[-1]
    train_q = load_prompts(small, "train")[0]["question"]
    shards = [
        [("rg-1", f"{e1['question'].strip()}\n\nAnswer: {e1['answer']}\n", "reasoning_gym"),  # rendered as ingest does
         ("rg-2", f"Some preamble.\n{e2['question'].upper()}   more text", "reasoning_gym"),  # inside, case/space changed
         ("rg-3", f"{train_q}\n\nAnswer: 1\n", "reasoning_gym")],  # a train question: kept
        [("py-1", f"# {e3['question']}\nprint(1)\n", "stdlib"),  # source not checked: kept
         ("rg-4", "Calculate nothing at all.\n\nAnswer: 0\n", "reasoning_gym")],
        [("rg-5", e3["question"], "reasoning_gym")],  # the whole shard is removed
    ]
    docs = make_documents(tmp_path / "in", shards)
    out = run_stage(decontaminate.STAGE, decontaminate.DecontaminateConfig(), {"documents": docs, "prompts": small},
                    Store(tmp_path / "out")).artifact
    kept = [pq.read_table(f) for f in out.files("documents")]
    assert [Path(f).name for f in out.files("documents")] == [f"part-{n:05d}.parquet" for n in range(3)]
    assert all(t.schema == DOC_SCHEMA for t in kept)
    assert [t["id"].to_pylist() for t in kept] == [["rg-3"], ["py-1", "rg-4"], []]
    removed = pq.read_table(out.files("removed")[0]).to_pylist()
    assert removed == sorted([{"doc_id": "rg-1", "prompt_id": e1["id"], "task": e1["task"]},
                              {"doc_id": "rg-2", "prompt_id": e2["id"], "task": e2["task"]},
                              {"doc_id": "rg-5", "prompt_id": e3["id"], "task": e3["task"]}],
                             key=lambda r: (r["doc_id"], r["prompt_id"]))
    m = out.manifest["metrics"]
    assert (m["docs_in"], m["docs_kept"], m["docs_dropped"], m["dropped.eval_question"], m["matches"]) == (6, 3, 3, 3, 3)
    assert (m["docs_in.reasoning_gym"], m["docs_kept.reasoning_gym"], m["docs_in.stdlib"], m["docs_kept.stdlib"]) == (5, 2, 1, 1)
    assert out.rows == {"documents": 3, "removed": 3}

    both = decontaminate.DecontaminateConfig(sources=["reasoning_gym", "stdlib"])
    out2 = run_stage(decontaminate.STAGE, both, {"documents": docs, "prompts": small}, Store(tmp_path / "out")).artifact
    m2 = out2.manifest["metrics"]
    assert (m2["docs_kept.stdlib"], m2["docs_kept.reasoning_gym"], m2["docs_kept"], m2["docs_dropped"]) == (0, 2, 2, 4)


def test_question_index_finds_every_occurrence():
    ps = [{"id": "a", "task": "t", "question": "Calculate 4 + 5."},
          {"id": "b", "task": "t", "question": "Calculate 4 + 5. And then 6."},
          {"id": "c", "task": "u", "question": "  calculate   4 + 5. "}]  # same normalized question as a
    index = decontaminate.QuestionIndex(ps)
    assert index.find(normalize("x calculate 4 + 5. and then 6. y")) == {("a", "t"), ("b", "t"), ("c", "u")}
    assert index.find(normalize("Calculate 4 + 5")) == set()  # no final period: not the question
    assert index.find("") == set()
    assert decontaminate.QuestionIndex([]).find("anything") == set()
