"""`slmflow gc` keeps what recorded runs name, registered models and recent outputs; the read commands
and gc read the stores $SLMFLOW_DATA_ROOT / $SLMFLOW_MODELS_ROOT name. Stores are built by hand: no training."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.cli_common import out
from flows.config import load_config
from flows.pipeline import make_plan
from flows.record import RECORD, RUN_RECORD, Instance, RunRecord, recorded_runs, runs_dir
from tasks.core.store import Store

runner = CliRunner()


def days_ago(n: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(days=n)).isoformat(timespec="seconds")


def commit(root: Path, stage: str, key: str, made: str, **manifest) -> Path:
    """A stored output of 1000 bytes, made at `made`."""
    store = Store(root)
    scratch = store.scratch(stage, key)
    (scratch / "x.txt").write_text("x" * 1000)
    store.commit(scratch, stage, key, {"stage": stage, "key": key, "created": made, **manifest})
    return root / stage / key


def record(project: Path, stages: dict[str, tuple[str, str, str]], made: str, run_id: str,
           config_file: str = "old.yaml") -> RunRecord:
    """A run recorded in `project`'s store as `slmflow run` records it; stages: name -> (stage, key, store)."""
    rec = RunRecord(config_file, [], str(project / "data"), str(project / "models"),
                    {n: Instance(n, s, k, kind) for n, (s, k, kind) in stages.items()}, run_id, made)
    rec.save()
    return rec


@pytest.fixture
def gc_project(project, monkeypatch):
    """`project` with the store roots of no environment, and tables wide enough to read whole."""
    monkeypatch.delenv("SLMFLOW_DATA_ROOT", raising=False)
    monkeypatch.delenv("SLMFLOW_MODELS_ROOT", raising=False)
    monkeypatch.setattr(out, "width", 1000)
    return project


def tiny_outputs(project: Path, made: str, sets: list[str] | None = None) -> RunRecord:
    """Every output of tiny.yaml's plan in the store, made at `made`, and its run recorded then."""
    cfg = load_config(project / "tiny.yaml", sets or [])
    plan = make_plan(cfg)
    for p in plan.stages.values():
        commit(project / p.stage.store, p.stage.name, p.key, made)
    rec = RunRecord.from_plan(cfg, plan, str(project / "tiny.yaml"), sets, mlflow_run_id=f"{len(sets or []):08d}" * 4)
    rec.created = made
    rec.save()
    return rec


def stored(project: Path) -> set[tuple[str, str]]:
    return {(stage, key) for root in ("data", "models") for stage in Store(project / root).stages()
            for key in Store(project / root).keys(stage)}


def test_save_records_each_run_beside_its_report_and_as_the_last_run(gc_project):
    report = runs_dir(str(gc_project / "data")) / "20250101T000000Z-abcdef12"
    report.mkdir(parents=True)
    first = record(gc_project, {"ingest": ("ingest", "1" * 16, "data")}, days_ago(3), "abcdef12" * 4)
    second = record(gc_project, {"ingest": ("ingest", "2" * 16, "data")}, days_ago(1), "99999999" * 4)
    assert json.loads((report / RUN_RECORD).read_text())["stages"]["ingest"]["key"] == "1" * 16  # beside its report
    assert RunRecord.load(runs_dir(str(gc_project / "data")) / RECORD) == second
    assert recorded_runs(str(gc_project / "data")) == [first, second]  # oldest first; last-run.json repeats one


def test_gc_with_no_config_keeps_every_output_of_every_recorded_run(gc_project):
    old_tiny = tiny_outputs(gc_project, days_ago(40))  # a tiny run, long ago
    last = tiny_outputs(gc_project, days_ago(1), ["dedup.seed=99"])  # the last run: other keys from dedup down
    assert {i.key for i in old_tiny.stages.values()} - {i.key for i in last.stages.values()}  # not in last-run.json
    orphan = commit(gc_project / "data", "ingest", "0123456789abcdef", days_ago(30))  # no run names it
    recent = commit(gc_project / "data", "ingest", "fedcba9876543210", days_ago(2))  # a run not recorded yet may read it
    before = stored(gc_project)
    assert len(before) >= 30
    removed = runner.invoke(app, ["gc", "--yes"])
    assert removed.exit_code == 0, removed.output
    assert f"all 2 runs recorded in {Path('data') / 'runs'}" in removed.stderr
    text = removed.stdout
    assert str(orphan) in text and "output no recorded run names, made over 7 days ago" in text
    assert text.index("removing 1 entries") < text.index("removed 1 entries")  # the table and total first
    assert "bytes)" in text.splitlines()[-1]
    assert stored(gc_project) == before - {("ingest", orphan.name)}
    assert recent.exists() and all((gc_project / i.store / i.stage / i.key).exists() for i in old_tiny.stages.values())


def test_a_registered_rl_output_is_kept(gc_project):
    registered = commit(gc_project / "models", "rl", "1111111111111111", days_ago(60), info={"registered_version": "3"})
    unregistered = commit(gc_project / "models", "rl", "2222222222222222", days_ago(60), info={})
    listed = runner.invoke(app, ["gc", "--yes"])
    assert listed.exit_code == 0, listed.output
    assert str(unregistered) in listed.stdout and str(registered) not in listed.stdout
    assert registered.exists() and not unregistered.exists()


def test_an_output_only_a_run_of_30_days_ago_names_goes_with_config(gc_project):
    old = commit(gc_project / "data", "ingest", "3333333333333333", days_ago(31))
    new = commit(gc_project / "data", "ingest", "4444444444444444", days_ago(31))
    record(gc_project, {"ingest": ("ingest", old.name, "data")}, days_ago(30), "30303030" * 4)
    record(gc_project, {"ingest": ("ingest", new.name, "data")}, days_ago(1), "01010101" * 4)
    kept = runner.invoke(app, ["gc"])  # no --config: every recorded run counts, however old
    assert kept.exit_code == 0 and "nothing to remove" in kept.stdout, kept.output
    cfg = str(gc_project / "tiny.yaml")
    listed = runner.invoke(app, ["gc", "-c", cfg])
    assert listed.exit_code == 0, listed.output
    assert "the 1 of 2 runs recorded" in listed.stderr
    assert str(old) in listed.stdout and str(new) not in listed.stdout
    assert (f"output no given config reaches and no run of the last 7 days names (the last that did: old.yaml of "
            f"{days_ago(30)[:10]})") in listed.stdout
    assert old.exists()  # listing removes nothing
    removed = runner.invoke(app, ["gc", "-c", cfg, "--yes", "--keep-days", "7"])
    assert removed.exit_code == 0 and "removed 1 entries" in removed.stdout, removed.output
    assert not old.exists() and new.exists()


def test_a_broken_run_record_stops_gc_with_one_line(gc_project):
    broken = runs_dir("data") / "20250101T000000Z-deadbeef" / RUN_RECORD
    broken.parent.mkdir(parents=True)
    broken.write_text("{not json")
    orphan = commit(gc_project / "data", "ingest", "5555555555555555", days_ago(30))
    result = runner.invoke(app, ["gc", "--yes"])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.splitlines()[-1].startswith(f"error: {broken} is not a readable run record")
    assert orphan.exists()


def test_read_commands_and_gc_read_the_stores_the_environment_names(gc_project, monkeypatch):
    here = record(gc_project, {"ingest": ("ingest", "6666666666666666", "data")}, days_ago(1), "66666666" * 4)
    commit(gc_project / "data", "ingest", "6666666666666666", days_ago(1))
    other = gc_project / "elsewhere"
    monkeypatch.setenv("SLMFLOW_DATA_ROOT", str(other / "data"))
    monkeypatch.setenv("SLMFLOW_MODELS_ROOT", str(other / "models"))
    theirs = RunRecord("there.yaml", [], str(other / "data"), str(other / "models"),
                       {"ingest": Instance("ingest", "ingest", "7777777777777777", "data"),
                        "pretrain": Instance("pretrain", "pretrain", "8888888888888888", "models")},
                       "77777777" * 4, days_ago(1))
    theirs.save()
    commit(other / "data", "ingest", "7777777777777777", days_ago(1))
    commit(other / "models", "pretrain", "8888888888888888", days_ago(1))
    status = runner.invoke(app, ["status"])
    assert status.exit_code == 0, status.output
    assert "there.yaml" in status.stdout and status.stdout.count(" yes ") == 2 and here.stages["ingest"].key not in status.stdout
    assert f"from {other / 'data' / 'runs' / RECORD} in the stores {other / 'data'}, {other / 'models'}" in status.stderr
    listing = runner.invoke(app, ["ls"])
    assert listing.exit_code == 0, listing.output
    assert "7777777777777777" in listing.stdout and "8888888888888888" in listing.stdout
    assert "6666666666666666" not in listing.stdout and "2 outputs" in listing.stdout
    gc = runner.invoke(app, ["gc"])
    assert gc.exit_code == 0 and f"gc of the stores {other / 'data'}, {other / 'models'}" in gc.stderr, gc.output


def test_a_store_from_before_run_records_keeps_its_last_run_and_warns_of_the_others(gc_project):
    runs = runs_dir("data")
    (runs / "20250101T000000Z-0badc0de").mkdir(parents=True)  # an earlier run's report, no record of its plan
    (runs / "20250101T000000Z-0badc0de" / "report.md").write_text("# slmflow report card\n")
    last = record(gc_project, {"ingest": ("ingest", "9" * 16, "data")}, days_ago(20), "abababab" * 4)
    (last.run_dir() / RUN_RECORD).unlink()  # as runs wrote before: last-run.json only
    named = commit(gc_project / "data", "ingest", "9" * 16, days_ago(20))
    result = runner.invoke(app, ["gc"])
    assert result.exit_code == 0 and "nothing to remove" in result.stdout, result.output
    assert "all 1 runs recorded" in result.stderr and named.exists()
    assert f"warning: 1 runs in {runs} left a report but no record of their plan" in " ".join(result.stderr.split())
