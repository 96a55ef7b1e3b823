"""mvlm.convert.publish: the one staging -> publish protocol (single process here; the collective
path runs in tests/e2e/test_fault_tolerance.py and test_convert_errors.py) and its fault-injection
pause points."""
from __future__ import annotations

import json
import threading
import time

import pytest

import mvlm.convert.publish as pub
from mvlm.convert.publish import MARKER_ENV, PAUSE_ENV, fault_point, staged_publish


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(PAUSE_ENV, raising=False)
    monkeypatch.delenv(MARKER_ENV, raising=False)
    monkeypatch.setattr(pub, "_paused", False)


def test_publish_order_and_hooks(tmp_path):
    out = tmp_path / "out"
    seen = []
    with staged_publish(out, overwrite=False,
                        before_publish=lambda s: seen.append(("before", s.exists(), out.exists())),
                        after_publish=lambda p: seen.append(("after", p, p.exists()))) as st:
        assert st.parent == tmp_path and st.name.startswith(".out.tmp-")
        (st / "f").write_text("1")
        assert not out.exists()
    assert seen == [("before", True, False), ("after", out, True)]
    assert (out / "f").read_text() == "1" and not st.exists()


def test_failure_removes_staging_and_overwrite_is_refused(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with staged_publish(out, overwrite=False) as st:
            (st / "f").write_text("partial")
            raise RuntimeError("boom")
    assert not out.exists() and not list(tmp_path.iterdir())
    out.mkdir()
    (out / "keep").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        with staged_publish(out, overwrite=False):
            pass
    assert (out / "keep").read_text() == "mine"
    with pytest.raises(ValueError, match="check failed"):  # before_publish vetoes the rename
        with staged_publish(out, overwrite=True,
                            before_publish=lambda s: (_ for _ in ()).throw(
                                ValueError("check failed"))) as st:
            (st / "new").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "keep").exists()
    with staged_publish(out, overwrite=True) as st:
        (st / "new").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == ["new"]


def test_fault_point_is_inert_when_unset(tmp_path):
    fault_point("staged", tmp_path)  # returns at once, writes nothing
    assert not list(tmp_path.iterdir())


def test_fault_point_bad_settings_name_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(PAUSE_ENV, "halfway")
    with pytest.raises(ValueError, match="MVLM_FAULT_PAUSE_AT='halfway'.*mid_write, staged"):
        fault_point("staged")
    monkeypatch.setenv(PAUSE_ENV, "staged")
    with pytest.raises(ValueError, match="MVLM_FAULT_MARKER"):
        fault_point("staged")
    fault_point("mid_write")  # another point: no pause, no marker needed


def test_pause_writes_marker_and_resumes_when_it_is_deleted(tmp_path, monkeypatch):
    marker = tmp_path / "paused.json"
    monkeypatch.setenv(PAUSE_ENV, "staged")
    monkeypatch.setenv(MARKER_ENV, str(marker))
    out = tmp_path / "out"
    done = threading.Event()
    info = {}

    def save():
        with staged_publish(out, overwrite=False) as st:
            (st / "f").write_text("1")
        done.set()

    t = threading.Thread(target=save, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not marker.exists():
        assert time.time() < deadline, "no marker"
        time.sleep(0.01)
    info = json.loads(marker.read_text())
    assert info["point"] == "staged" and info["rank"] == 0
    staging = tmp_path / info["where"]
    # Paused at "staged": everything written, nothing published, and it stays that way.
    assert (staging / "f").read_text() == "1" and not out.exists()
    assert not done.wait(0.5) and not out.exists()
    marker.unlink()
    assert done.wait(30) and (out / "f").read_text() == "1" and not staging.exists()
    # Once per process: a second save goes straight through.
    with staged_publish(tmp_path / "out2", overwrite=False):
        pass
    assert (tmp_path / "out2").is_dir() and not marker.exists()


@pytest.mark.parametrize("point", ["mid_write", "before_latest"])
def test_pause_points_mid_write_and_before_latest(tmp_path, monkeypatch, point):
    """mid_write: the writer's first complete file is there, the rest is not (the HF shard
    writer calls it); before_latest: renamed into place, after_publish (`latest`) not run."""
    import torch

    from mvlm.convert.hf_io import StreamingSafetensorsWriter

    marker = tmp_path / "paused.json"
    monkeypatch.setenv(PAUSE_ENV, point)
    monkeypatch.setenv(MARKER_ENV, str(marker))
    out = tmp_path / "out"
    latest = []

    def save():
        with staged_publish(out, overwrite=False, after_publish=latest.append) as st:
            for i in range(2):
                w = StreamingSafetensorsWriter(st / f"s{i}.safetensors",
                                               [("t", torch.float32, [2])])
                w.write("t", torch.zeros(2))
                w.close()

    t = threading.Thread(target=save, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not marker.exists():
        assert time.time() < deadline, "no marker"
        time.sleep(0.01)
    where = tmp_path / json.loads(marker.read_text())["where"]
    if point == "mid_write":
        assert where.name == "s0.safetensors" and sorted(p.name for p in where.parent.iterdir()) \
            == ["s0.safetensors"] and not out.exists()
    else:
        assert where == out and sorted(p.name for p in out.iterdir()) == \
            ["s0.safetensors", "s1.safetensors"] and latest == []
    marker.unlink()
    t.join(30)
    assert latest == [out] and sorted(p.name for p in out.iterdir()) == \
        ["s0.safetensors", "s1.safetensors"]
