"""The `slmflow` CLI: bad input fails with one clear line and writes nothing; inspection commands."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def with_source(project, source: dict):
    cfg = yaml.safe_load((project / "tiny.yaml").read_text())
    cfg["ingest"]["sources"] = [source]
    (project / "user.yaml").write_text(yaml.safe_dump(cfg))
    return project / "user.yaml"


def fails_cleanly(project, args, *needles):
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
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


def test_run_status_show_lineage(tiny_run):
    root, _ = tiny_run
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
    assert text.index("dedup") < text.index("ingest") and "MLflow run" in text
    missing = runner.invoke(app, ["show", "dedup", "-c", cfg, "--set", "dedup.seed=99"])
    assert missing.exit_code == 1 and "not in the store" in missing.output
