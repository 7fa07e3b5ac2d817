"""The stage contract without Prefect: keys, atomic outputs, cache hits, crash safety."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tasks.core.stage import Stage, StageConfig, StageError, run_stage
from tasks.core.store import Store, stage_key


class Cfg(StageConfig):
    n: int = 3
    label: str = "x"


def write_rows(cfg: Cfg, inputs, ctx):
    (ctx.out / "rows.txt").write_text("\n".join(f"{cfg.label}{i}" for i in range(cfg.n)))
    return {"rows": {"rows": cfg.n}, "metrics": {"n": cfg.n}}


STAGE = Stage("toy", 1, Cfg, write_rows)


def test_key_depends_on_name_version_config_inputs_only():
    k = stage_key("toy", 1, Cfg(), {"a": "k1"})
    assert k == stage_key("toy", 1, Cfg(n=3), {"a": "k1"}) and len(k) == 16
    assert k == stage_key("toy", 1, {"label": "x", "n": 3}, {"a": "k1"})  # canonical JSON: order-free
    others = [stage_key("toy2", 1, Cfg(), {"a": "k1"}), stage_key("toy", 2, Cfg(), {"a": "k1"}),
              stage_key("toy", 1, Cfg(n=4), {"a": "k1"}), stage_key("toy", 1, Cfg(), {"a": "k2"}),
              stage_key("toy", 1, Cfg(), {"b": "k1"})]
    assert len({k, *others}) == 6


def test_unknown_config_field_is_an_error():
    with pytest.raises(ValueError, match="bogus"):
        Cfg(bogus=1)


def test_output_committed_with_manifest_then_cache_hit(tmp_path):
    store = Store(tmp_path)
    first = run_stage(STAGE, Cfg(), {}, store)
    assert not first.cached
    out = tmp_path / "toy" / first.artifact.key
    assert (out / "rows.txt").read_text() == "x0\nx1\nx2"
    m = first.artifact.manifest
    assert m["stage"] == "toy" and m["version"] == 1 and m["rows"] == {"rows": 3} and m["config"] == {"n": 3, "label": "x"}
    assert set(m["files"]) == {"rows.txt"} and len(m["files"]["rows.txt"]) == 64
    calls = []
    again = run_stage(Stage("toy", 1, Cfg, lambda *a: calls.append(a)), Cfg(), {}, store)
    assert again.cached and calls == [] and again.artifact.key == first.artifact.key
    assert store.keys("toy") == [first.artifact.key]
    assert [p.name for p in (tmp_path / "toy").iterdir()] == [first.artifact.key]  # no leftovers


def test_force_recomputes_and_replaces(tmp_path):
    store = Store(tmp_path)
    key = run_stage(STAGE, Cfg(), {}, store).artifact.key
    (tmp_path / "toy" / key / "rows.txt").write_text("tampered")
    forced = run_stage(STAGE, Cfg(), {}, store, force=True)
    assert not forced.cached and forced.artifact.key == key
    assert (tmp_path / "toy" / key / "rows.txt").read_text() == "x0\nx1\nx2"
    assert [p.name for p in (tmp_path / "toy").iterdir()] == [key]


def test_failing_stage_leaves_nothing(tmp_path):
    def boom(cfg, inputs, ctx):
        (ctx.out / "half.txt").write_text("partial")
        raise StageError("toy: bad row 7")

    store = Store(tmp_path)
    with pytest.raises(StageError, match="bad row 7"):
        run_stage(Stage("toy", 1, Cfg, boom), Cfg(), {}, store)
    assert store.keys("toy") == [] and list((tmp_path / "toy").iterdir()) == []


def test_stage_killed_mid_write_leaves_no_done_directory(tmp_path):
    """SIGKILL while the stage is writing: the half-written directory never counts as done."""
    marker = tmp_path / "writing"
    script = textwrap.dedent(f"""
        import time, pathlib
        from tasks.core.stage import Stage, StageConfig, run_stage
        from tasks.core.store import Store
        class Cfg(StageConfig):  # the test's Cfg: the same stage key
            n: int = 3
            label: str = "x"
        def slow(cfg, inputs, ctx):
            (ctx.out / "part-0.txt").write_text("half")
            pathlib.Path({str(marker)!r}).write_text("x")
            time.sleep(60)
        run_stage(Stage("toy", 1, Cfg, slow), Cfg(), {{}}, Store({str(tmp_path)!r}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "stage never started writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    store = Store(tmp_path)
    key = stage_key("toy", 1, Cfg(), {})
    assert store.get("toy", key) is None and store.keys("toy") == []
    leftovers = list((tmp_path / "toy").iterdir())
    assert leftovers and all(p.name.startswith((".tmp-", ".work-", ".lock-")) for p in leftovers)  # hidden only
    # and the next run takes the dead run's lock at once, computes it, and clears what it left
    done = run_stage(Stage("toy", 1, Cfg, write_rows), Cfg(), {}, store)
    assert not done.cached and store.keys("toy") == [key]
    assert [p.name for p in (tmp_path / "toy").iterdir()] == [key]


def test_fsspec_memory_filesystem_commits_manifest_last(tmp_path):
    store = Store("memory://slmflow-test")
    out = run_stage(STAGE, Cfg(n=2), {}, store)
    assert out.artifact.path.startswith("memory://")
    assert store.get("toy", out.artifact.key).rows == {"rows": 2}
    assert store.fs.cat(f"/slmflow-test/toy/{out.artifact.key}/rows.txt") == b"x0\nx1"
    assert run_stage(STAGE, Cfg(n=2), {}, store).cached


# --- A manifest that vouches for nothing: never a hit, set aside, recomputed ----------------------------------

def committed(tmp_path):
    store = Store(tmp_path)
    key = run_stage(STAGE, Cfg(), {}, store).artifact.key
    return store, key, tmp_path / "toy" / key / "manifest.json"


def test_empty_manifest_is_not_a_hit_and_is_recomputed(tmp_path, caplog):
    store, key, manifest = committed(tmp_path)
    manifest.write_text("{}")
    again = run_stage(STAGE, Cfg(), {}, store)
    assert not again.cached and again.artifact.key == key
    assert (tmp_path / "toy" / key / "rows.txt").read_text() == "x0\nx1\nx2"
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and f"{manifest}: lacks stage, key, files, sizes" in warned[0], warned
    assert "it will be recomputed" in warned[0]
    aside = [p.name for p in (tmp_path / "toy").iterdir() if p.name.startswith(f".damaged-{key}-")]
    assert len(aside) == 1 and store.get("toy", key) is not None


@pytest.mark.parametrize("content, why", [
    (None, "not JSON ("),  # cut short: the first half of the real manifest
    (b"\xff\xfe\x00garbage\x00", "not JSON ("),  # binary
    (b"[1, 2]", "not a JSON object"),
    (b'{"stage": "toy", "key": "0123456789abcdef", "files": {}, "sizes": {}}', "names toy 0123456789abcdef, not"),
    (b'{"stage": "toy", "key": "KEY", "files": {"rows.txt": "abc"}, "sizes": {"rows.txt": 8}}',
     "files is not a map of file name to sha256"),
    (b'{"stage": "toy", "key": "KEY", "files": {"rows.txt": "' + b"a" * 64 + b'"}, "sizes": {}}',
     "files and sizes name different files"),
    (b'{"stage": "toy", "key": "KEY", "files": {"../x": "' + b"a" * 64 + b'"}, "sizes": {"../x": 1}}',
     "names a file outside its output directory"),
])
def test_bad_manifest_get_returns_none_with_one_warning_and_sets_it_aside(tmp_path, caplog, content, why):
    store, key, manifest = committed(tmp_path)
    whole = manifest.read_bytes()
    manifest.write_bytes(whole[: len(whole) // 2] if content is None else content.replace(b"KEY", key.encode()))
    assert store.read_manifest("toy", key) is None  # never raises
    assert store.get("toy", key) is None
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and f"{manifest}: {why}" in warned[0], warned
    assert "\n" not in warned[0] and "set aside as" in warned[0]
    assert store.keys("toy") == [] and not manifest.parent.exists()
    assert [p.name.startswith(f".damaged-{key}-") for p in (tmp_path / "toy").iterdir()] == [True]


def test_bad_manifest_is_not_set_aside_while_a_run_holds_its_key(tmp_path, caplog):
    store, key, manifest = committed(tmp_path)
    manifest.write_text("{")
    with store.lock("toy", key):  # that run's commit replaces it: setting it aside could race the commit
        assert store.get("toy", key) is None
    assert manifest.exists() and "it will be recomputed" in caplog.text and "set aside" not in caplog.text


def test_commit_writes_the_stage_and_key_into_the_manifest(tmp_path):
    store = Store(tmp_path)
    scratch = store.scratch("toy", "k1")
    (scratch / "x.txt").write_text("x")
    art = store.commit(scratch, "toy", "k1", {"rows": {}})
    assert art.manifest["stage"] == "toy" and art.manifest["key"] == "k1"
    assert store.get("toy", "k1") is not None


def test_verify_ls_and_status_name_bad_manifests_without_crashing(project):
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.config import load_config
    from flows.pipeline import make_plan

    cfg = str(project / "tiny.yaml")
    store = Store(project / "data")
    bad = []
    for n, content in ((1, b"{}"), (2, b'{"stage": "toy", "ke'), (3, b"\x00\x01\xff\xfe binary")):
        manifest = project / "data" / "toy" / run_stage(STAGE, Cfg(n=n), {}, store).artifact.key / "manifest.json"
        manifest.write_bytes(content)
        bad.append(manifest)
    ingest = project / "data" / "ingest" / make_plan(load_config(cfg)).stages["ingest"].key
    ingest.mkdir(parents=True)
    (ingest / "manifest.json").write_text("not json")
    runner = CliRunner()

    listing = runner.invoke(app, ["ls", "-c", cfg])
    assert listing.exit_code == 0, listing.output
    assert "4 outputs, 0.0 MB, 4 damaged" in listing.output
    assert f"damaged: {bad[0]}: lacks stage, key, files, sizes" in " ".join(listing.output.split())
    status = runner.invoke(app, ["status", "-c", cfg], terminal_width=250)
    assert status.exit_code == 0, status.output
    assert " damaged " in status.output and "manifest.json: not JSON" in status.output
    assert all(m.exists() for m in bad)  # ls and status only read

    result = runner.invoke(app, ["verify", "-c", cfg])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert f"damaged: {bad[0]}: lacks stage, key, files, sizes" in text
    assert f"damaged: {bad[1]}: not JSON (" in text and f"damaged: {bad[2]}: not JSON (" in text
    assert f"damaged: {ingest / 'manifest.json'}: not JSON (" in text
    assert "verified 4 outputs (0.0 MB): 4 damaged" in text and "Traceback" not in text
    assert store.keys("toy") == [] and len(list((project / "data" / "toy").glob(".damaged-*"))) == 3
    again = runner.invoke(app, ["verify", "-c", cfg])
    assert again.exit_code == 0 and "verified 0 outputs" in again.output
