"""safetensors streaming writer/reader, error messages for bad checkpoints, atomic outputs,
launcher environment parsing."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mvlm.convert.hf_io import (
    CheckpointError,
    SafetensorsReader,
    StreamingSafetensorsWriter,
    staged_output,
)
from mvlm.runtime.env import first_slurm_host, read_dist_env


def test_streaming_writer_matches_safetensors(tmp_path):
    ts = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16),
          "c": torch.arange(6, dtype=torch.int64).reshape(2, 3), "e": torch.zeros(0, 2)}
    w = StreamingSafetensorsWriter(tmp_path / "x.safetensors",
                                   [(k, v.dtype, list(v.shape)) for k, v in ts.items()])
    for k, v in ts.items():
        w.write(k, v)
    w.close()
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == ts.keys()
    for k in ts:
        assert back[k].dtype == ts[k].dtype and torch.equal(back[k], ts[k])


def test_streaming_writer_rejects_out_of_order(tmp_path):
    w = StreamingSafetensorsWriter(tmp_path / "x.safetensors",
                                   [("a", torch.float32, [2]), ("b", torch.float32, [2])])
    with pytest.raises(RuntimeError, match="expected a"):
        w.write("b", torch.zeros(2))


def _sharded(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    save_file({"x": torch.randn(4, 4)}, d / "model-00001-of-00002.safetensors")
    save_file({"y": torch.randn(2)}, d / "model-00002-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}))
    return d


def test_reader_slices_and_errors(tmp_path):
    d = _sharded(tmp_path)
    r = SafetensorsReader(d)
    full = load_file(d / "model-00001-of-00002.safetensors")["x"]
    assert torch.equal(r.read("x", 0, 1, 3), full[1:3])
    assert torch.equal(r.read("x", 1, 2, 4), full[:, 2:4])
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*missing"):
        SafetensorsReader(d)
    (tmp_path / "c").mkdir()
    d2 = _sharded(tmp_path / "c")
    p = d2 / "model-00001-of-00002.safetensors"
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        SafetensorsReader(d2)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        SafetensorsReader(tmp_path)


def test_staged_output_is_atomic(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_output(out, overwrite=False) as st:
            (st / "half.txt").write_text("x")
            raise RuntimeError("killed")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with staged_output(out, overwrite=False) as st:
        (st / "ok.txt").write_text("x")
    assert (out / "ok.txt").exists()
    with pytest.raises(FileExistsError, match="--overwrite"):
        with staged_output(out, overwrite=False):
            pass


def test_launcher_env():
    assert first_slurm_host("gpu-[003-005,010],cpu1") == "gpu-003"
    assert first_slurm_host("node7") == "node7"
    e = read_dist_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                       "SLURM_NODELIST": "n[10-11]", "SLURM_JOB_ID": "42"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.launcher) == (
        3, 8, 1, "n10", "slurm")
    e = read_dist_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                       "MASTER_ADDR": "h", "MASTER_PORT": "1234", "SLURM_PROCID": "0",
                       "SLURM_NTASKS": "2"})
    assert e.launcher == "torchrun" and e.rank == 1
    assert read_dist_env({}).launcher == "single"
