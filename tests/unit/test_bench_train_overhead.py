"""bench/train_overhead.py's transformers side builds the AdamW its ``--hf_optim`` names: the fused
kernel by default (transformers' Trainer default ``adamw_torch_fused``), torch's single-tensor
loop with ``adamw_torch``; the two step the same tiny model to values within fp32 rounding of
each other but not to the same bits (they are different kernels)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch


def _bench():
    path = Path(__file__).resolve().parents[2] / "bench" / "train_overhead.py"
    spec = importlib.util.spec_from_file_location("train_overhead_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hf_optim_flag_builds_that_adamw(tmp_path):
    bench = _bench()
    args = bench.parse_args(["--hidden", "32", "--layers", "1", "--heads", "2", "--kv_heads", "1",
                             "--intermediate", "64", "--rows", "2", "--seq", "8",
                             "--work_dir", str(tmp_path)])
    assert args.hf_optim == "adamw_torch_fused"
    hf_dir = bench.build_checkpoint(args, tmp_path)
    ids = bench.make_batches(args, 100)[0]
    params = {}
    for optim in ("adamw_torch_fused", "adamw_torch"):
        side = bench.HFSide(hf_dir, optim)
        assert side.opt.defaults["fused"] is (optim == "adamw_torch_fused")
        for _ in range(3):
            side.step(ids)
        params[optim] = torch.cat([p.detach().reshape(-1) for p in side.model.parameters()])
    fused, loop = params["adamw_torch_fused"], params["adamw_torch"]
    assert not torch.equal(fused, loop)
    assert float((fused - loop).abs().max()) < 1e-5
