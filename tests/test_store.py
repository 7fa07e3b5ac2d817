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
