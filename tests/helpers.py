"""Shared test helpers: launching mvlm under torchrun, caching tiny checkpoints per session."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mvlm(args: list[str], nproc: int = 1, timeout: int = 600, check: bool = True,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `mvlm ARGS` as a user would: plain python for one rank, torchrun for several."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "mvlm", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "mvlm", *args]
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n"
                             f"{p.stderr[-8000:]}")
    return p


def launch_worker(worker: Path | str, nproc: int, args: list[str] | tuple = (), timeout: int = 840,
                  env: dict | None = None, expect: str | None = "WORKER OK",
                  tail: int = 12000, plain_single: bool = False) -> subprocess.CompletedProcess:
    """Run a test worker script under torchrun on `nproc` local ranks.

    `plain_single` runs one rank as plain python (no RANK/WORLD_SIZE env) for workers that
    take that path; otherwise one rank still goes through torchrun, as env:// init needs.

    Every dist test launches its worker the same way: a free local port, one OpenMP thread per
    rank (2 cores are shared by all ranks), unbuffered output so a hang shows where it stopped.
    Fails with the last `tail` characters of stdout+stderr when the launch exits non-zero or,
    with `expect` set, when rank 0 never printed that marker (a worker that returned early).
    """
    if nproc == 1 and plain_single:
        cmd = [sys.executable, str(worker), *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(worker),
               *map(str, args)]
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=REPO)
    if p.returncode != 0 or (expect is not None and expect not in p.stdout):
        missing = "" if p.returncode != 0 else f", no {expect!r} in stdout"
        raise AssertionError(f"{' '.join(cmd)} failed (rc={p.returncode}{missing}):\n"
                             f"{(p.stdout + p.stderr)[-tail:]}")
    return p


def load_all_safetensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_tensors(a_dir: Path, b_dir: Path) -> int:
    a, b = load_all_safetensors(a_dir), load_all_safetensors(b_dir)
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))
    for k in a:
        assert a[k].dtype == b[k].dtype, (k, a[k].dtype, b[k].dtype)
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
        assert torch.equal(a[k], b[k]), f"{k} differs"
    return len(a)
