"""The `slmflow` CLI: bad input fails with one clear line and writes nothing; inspection commands."""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()
MLFLOW_INFO = re.compile(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO mlflow")
# Prefect's own log lines (`12:00:01.234 | INFO | Flow run ...`) reach the captured output when its console
# handler was set up inside this CliRunner call (a test run alone): progress, not the error
PREFECT_LOG = re.compile(r"\d\d:\d\d:\d\d\.\d{3} \| [A-Z]+ +\| ")


def with_source(project, source: dict):
    cfg = yaml.safe_load((project / "tiny.yaml").read_text())
    cfg["ingest"]["sources"] = [source]
    (project / "user.yaml").write_text(yaml.safe_dump(cfg))
    return project / "user.yaml"


def fails_cleanly(project, args, *needles):
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    # MLflow's INFO lines when it creates a new database (a run that got as far as a stage) are not errors,
    # nor the dim line where a read command names the plan and stores it reads
    lines = [ln for ln in result.output.splitlines() if ln.strip() and not MLFLOW_INFO.match(ln)
             and not PREFECT_LOG.match(ln) and not ln.startswith("reading the plan of ")]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for needle in needles:
        assert needle in lines[0]
    assert not (project / "data").exists() or not any((project / "data").rglob("manifest.json"))
    return lines[0]


def test_missing_path(project):
    cfg = with_source(project, {"kind": "parquet", "path": "corpus/*.parquet"})
    fails_cleanly(project, ["run", "-c", str(cfg)], "corpus/*.parquet")


def test_file_that_is_not_parquet(project):
    (project / "corpus").mkdir()
    (project / "corpus" / "a.parquet").write_text("this is not parquet")
    cfg = with_source(project, {"kind": "parquet", "path": str(project / "corpus" / "*.parquet")})
    fails_cleanly(project, ["run", "-c", str(cfg)], "a.parquet", "not a Parquet file")


def test_missing_text_column(project):
    (project / "corpus").mkdir()
    pq.write_table(pa.table({"id": ["1"], "body": ["hello"]}), project / "corpus" / "a.parquet")
    cfg = with_source(project, {"kind": "parquet", "path": str(project / "corpus" / "*.parquet"), "text_column": "text"})
    fails_cleanly(project, ["run", "-c", str(cfg)], "a.parquet", "'text'", "body")


@pytest.mark.parametrize("args,needle", [
    (["--set", "dedup.bandz=3"], "dedup.bandz"),
    (["--set", "dedup.rows=zero"], "dedup.rows"),
    (["--only", "dedupe"], "dedupe"),
    # rules between sections
    (["--set", "pack.seed=3"], "pack.seed 3 must equal tokenizer.seed 0"),
    (["--set", "references.pack.seed=2"], "references.pack.seed 2 must equal references.tokenizer.seed 0"),
    (["--set", "preselect.benchmark=eval_pass_at_1"], "preselect.benchmark eval_pass_at_1 needs an eval stage"),
    (["--set", "rl.band=[0.9, 0.1]"], "rl.band: need 0 <= low < high <= 1, got [0.9, 0.1]"),
])
def test_config_typos(project, args, needle):
    fails_cleanly(project, ["run", "-c", str(project / "tiny.yaml"), *args], needle)


def test_typo_in_yaml_file(project):
    cfg = yaml.safe_load((project / "tiny.yaml").read_text())
    cfg["dedup"]["shingle_size"] = 5
    (project / "typo.yaml").write_text(yaml.safe_dump(cfg))
    fails_cleanly(project, ["run", "-c", str(project / "typo.yaml")], "typo.yaml", "dedup.shingle_size")


def test_missing_config_file(project):
    fails_cleanly(project, ["run", "-c", "nope.yaml"], "nope.yaml")


def test_run_status_show_lineage(quick_run):
    root, _ = quick_run
    cfg = str(root / "tiny.yaml")
    status = runner.invoke(app, ["status", "-c", cfg, "--set", "dedup.seed=99"])  # dedup and downstream: new keys
    assert status.exit_code == 0 and status.output.count(" no ") >= 20 and " yes " in status.output
    ran = runner.invoke(app, ["run", "-c", cfg])  # everything stored: all cache hits
    assert ran.exit_code == 0, ran.output
    assert "report card" in ran.output and "report:" in ran.output and "held-out accuracy" in ran.output
    assert "eval_rl" in ran.output.split("held-out accuracy")[1]
    status = runner.invoke(app, ["status", "-c", cfg])
    assert status.exit_code == 0 and "documents" in status.output and " no " not in status.output
    show = runner.invoke(app, ["show", "dedup", "-c", cfg, "--table", "clusters", "--rows", "3"])
    assert show.exit_code == 0, show.output
    assert "cluster_id" in show.output and '"stage": "dedup"' in show.output
    lineage = runner.invoke(app, ["lineage", "dedup", "-c", cfg])
    assert lineage.exit_code == 0, lineage.output
    text = lineage.output
    from flows.config import load_config
    from flows.pipeline import make_plan

    keys = {n: p.key for n, p in make_plan(load_config(cfg)).stages.items()}
    assert text.index(keys["ingest"]) < text.rindex(keys["dedup"]) and "MLflow run" in text  # upstream first
    missing = runner.invoke(app, ["show", "dedup", "-c", cfg, "--set", "dedup.seed=99"])
    assert missing.exit_code == 1 and "not in the store" in missing.output


# --- What bad input gets (README): one test per row ------------------------------------------------

def ingest_only(project, source: dict):
    """Run the ingest stage of tiny.yaml on one source; the CLI result and the ingest manifest."""
    import json

    cfg = with_source(project, source)
    result = runner.invoke(app, ["run", "-c", str(cfg), "--only", "ingest"])
    manifests = list((project / "data" / "ingest").glob("*/manifest.json"))
    return result, (json.loads(manifests[0].read_text()) if manifests else None)


@pytest.mark.usefixtures("prefect_server")
def test_jsonl_malformed_line_names_the_line(project):
    (project / "c.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n{"text": broken\n')
    cfg = with_source(project, {"kind": "jsonl", "path": str(project / "c.jsonl")})
    fails_cleanly(project, ["run", "-c", str(cfg), "--only", "ingest"], "c.jsonl line 3", "not valid JSON")


@pytest.mark.usefixtures("prefect_server")
def test_jsonl_invalid_utf8_is_replaced_counted_and_named(project, caplog):
    (project / "c.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9 au lait"}\n')
    result, manifest = ingest_only(project, {"kind": "jsonl", "path": str(project / "c.jsonl")})
    assert result.exit_code == 0, result.output
    assert manifest["metrics"]["invalid_utf8"] == 1 and manifest["rows"]["documents"] == 2
    assert "ingest: jsonl:c.jsonl:2 is not valid UTF-8" in caplog.text  # the file as the glob's directory sees it


@pytest.mark.usefixtures("prefect_server")
def test_empty_and_whitespace_documents_are_counted_and_dropped(project):
    (project / "c.jsonl").write_text('{"text": "kept"}\n{"text": ""}\n{"text": " \\n\\t "}\n')
    result, manifest = ingest_only(project, {"kind": "jsonl", "path": str(project / "c.jsonl")})
    assert result.exit_code == 0, result.output
    assert manifest["metrics"]["dropped_empty"] == 2 and manifest["rows"]["documents"] == 1


@pytest.mark.usefixtures("prefect_server")
def test_a_50_mb_single_line_document_is_dropped_by_the_documented_limit(project, caplog):
    import json

    big = "word " * 10_000_000  # 50 MB on one line
    (project / "c.jsonl").write_text(json.dumps({"text": "kept"}) + "\n" + json.dumps({"text": big}) + "\n")
    result, manifest = ingest_only(project, {"kind": "jsonl", "path": str(project / "c.jsonl")})
    assert result.exit_code == 0, result.output
    assert manifest["metrics"]["dropped_too_long"] == 1 and manifest["rows"]["documents"] == 1
    assert "has 50,000,000 characters, over ingest.max_doc_chars (10,000,000): dropped" in caplog.text


@pytest.mark.parametrize("setting", ["dedup.bands=0", "pretrain.max_steps=0", "pretrain.batch_size=0",
                                     "sft.batch_size=-4", "ingest.shard_rows=-1", "ingest.max_doc_chars=0"])
def test_zero_or_negative_sizes(project, setting):
    fails_cleanly(project, ["run", "-c", str(project / "tiny.yaml"), "--set", setting], setting.split("=")[0],
                  "greater than")


def test_a_learning_rate_that_makes_the_loss_nan(quick_run, tmp_path):
    """A store of this test's own with quick_run's outputs up to pack (cache hits): pretrain alone runs."""
    from conftest import copy_outputs, quick_config

    config = quick_config(tmp_path)
    copy_outputs(quick_run[0], config, ["pack"])
    result = runner.invoke(app, ["run", "-c", str(config), "--only", "pretrain", "--set", "pretrain.lr=1e6"])
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: pretrain: loss became nan at step "), result.output
    assert "(a lower lr, or more warmup_steps, usually cures it)" in lines[0]
    from flows.config import load_config
    from flows.pipeline import make_plan

    key = make_plan(load_config(config, ["pretrain.lr=1e6"])).stages["pretrain"].key
    assert not (tmp_path / "models" / "pretrain" / key).exists()  # nothing committed


@pytest.mark.parametrize("args,needles", [
    (["show", "dedupe"], ["no such stage: dedupe"]),
    (["lineage", "nope"], ["no such stage: nope"]),
    (["show", "dedup", "--key", "../../etc"], ["--key '../../etc' is not a valid name"]),
    (["lineage", "ingest", "--key", "../x"], ["--key '../x' is not a valid name"]),
])
def test_show_and_lineage_refuse_unknown_stages_and_path_keys(project, args, needles):
    fails_cleanly(project, [*args, "-c", str(project / "tiny.yaml")], *needles)
