"""Shared fixtures: one Prefect test server per session, a fresh store + MLflow DB per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from flows.prefect_server import apply_defaults  # noqa: E402

apply_defaults()  # as the CLI does, before Prefect is imported (stages also run outside a flow here)

# Prefect binds its console log handler to sys.stderr when it sets up logging. The CLI imports it only
# inside `slmflow run`; under CliRunner that stderr is a buffer closed after the call, and every later
# Prefect log line would fail against it. Set it up here, bound to the real stderr.
from prefect.logging.configuration import setup_logging  # noqa: E402

setup_logging()

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def prefect_server():
    """A temporary Prefect API on 127.0.0.1 (its own SQLite database), stopped at the end."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()  # the CLI (`slmflow run` in-process) uses it too
        yield
        del os.environ["PREFECT_API_URL"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: a second thread only adds sync cost (and spins badly on a busy machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# One-digit +/- (the default task before 2026-12-07): short prompts and answers of one to three tokens,
# what the rollout, RL-loop and difficulty tests were written around
ONE_DIGIT_ARITHMETIC = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+", "-"],
                        "allow_parentheses": False, "allow_negation": False}


def chat_tokenizer(rows: list[dict]):
    """A small byte-level BPE (the tokenizer stage's, 320 tokens) trained on prompt rows in the chat format."""
    from tokenizers import pre_tokenizers, trainers

    from tasks.core import chat
    from tasks.tokenizer import TokenizerConfig, new_tokenizer

    t = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=320, min_frequency=2, special_tokens=TokenizerConfig().special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    t.train_from_iterator([r["question"] + "\n" + chat.completion_text(r["answer"]) for r in rows] * 4, trainer)
    return t


def tiny_config(root: Path, **run) -> Path:
    """configs/tiny.yaml with its store and MLflow SQLite file under `root` (and `run` settings)."""
    raw = yaml.safe_load(TINY.read_text())
    raw["run"].update({"data_root": str(root / "data"), "models_root": str(root / "models"),
                       "mlflow_uri": f"sqlite:///{root / 'mlflow.db'}", **run})
    root.mkdir(parents=True, exist_ok=True)
    (root / "tiny.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root / "tiny.yaml"


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A working directory with tiny.yaml pointed at a store and an MLflow SQLite file inside it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tiny_config(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, prefect_server) -> tuple[Path, dict]:
    """The whole tiny pipeline, run once per session into its own store: (root, pipeline result).
    Tests share it read-only (new settings make new keys beside it, never changes to it)."""
    from flows.pipeline import pipeline

    root = tmp_path_factory.mktemp("tiny_run")
    return root, pipeline(str(tiny_config(root)))
