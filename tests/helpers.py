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


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A loopback port for a launcher to listen on, chosen below the kernel's ephemeral range.

    A port the kernel hands out for `bind(0)` sits in the ephemeral range (32768-60999 here),
    where gloo's own listeners and every outgoing connection of the other xdist worker's jobs
    also land: between this probe and torchrun's listen one of them could take it (CI saw
    EADDRINUSE). Below that range only explicit binds compete, so each xdist worker draws
    from its own slice of 20000-32767 and never hands the same port out twice.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    slot = int(worker[2:]) if worker[2:].isdigit() else 0
    lo = 20000 + (slot % 6) * 2000
    start = lo + (os.getpid() * 7919) % 2000
    for i in range(2000):
        port = lo + (start - lo + i) % 2000
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {lo}-{lo + 1999} for xdist worker {worker}")


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


def rel_diff(a: float, b: float) -> float:
    """|a - b| relative to |a| with a floor of 1: fp32 rounding scales with the value."""
    return abs(a - b) / max(1.0, abs(a))


def assert_verify_checks(checks: list[dict], logits_tol: float, loss_tol: float) -> None:
    """The ``verify.json`` records of a layout worker (case, check, dlogits, loss_mcore,
    loss_hf): printed, then max |dlogits| <= ``logits_tol`` and the losses within ``loss_tol``
    relative (:func:`rel_diff`)."""
    for r in checks:
        print(f"  {r['case']} {r['check']}: max|dlogits|={r['dlogits']:.3e} "
              f"loss mcore={r['loss_mcore']:.6f} hf={r['loss_hf']:.6f}")
        assert r["dlogits"] <= logits_tol, r
        assert rel_diff(r["loss_hf"], r["loss_mcore"]) <= loss_tol, r


def assert_sft_parity(a: list[dict], b: list[dict], label: str, steps: int, loss_tol: float,
                      gnorm_tol: float) -> None:
    """Two runs' training lines (``a`` the reference): the same ``steps`` steps, every step's
    loss and grad norm within the bounds (relative, :func:`rel_diff`), and the reference's loss
    fell (parity between runs that do not train would be vacuous)."""
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1)), label
    dl = max(rel_diff(x["loss"], y["loss"]) for x, y in zip(a, b, strict=True))
    dg = max(rel_diff(x["grad_norm"], y["grad_norm"]) for x, y in zip(a, b, strict=True))
    print(f"{label}: max rel |dloss| {dl:.2e}  max rel |dgrad_norm| {dg:.2e}")
    assert dl <= loss_tol, f"{label}: loss differs by {dl}: {a} vs {b}"
    assert dg <= gnorm_tol, f"{label}: grad norm differs by {dg}"
    assert a[-1]["loss"] < a[0]["loss"], a


def peft_vs_merged(load, base: Path, run: Path, merged: Path, inputs: dict
                   ) -> tuple[float, float, list[str]]:
    """A LoRA run's adapter loaded by peft onto ``load(base)`` against its merged export
    (``mvlm export --merge_lora true`` into ``merged``) and the base model, on ``inputs``:
    (max |dlogits| peft vs merged, max |dlogits| peft vs base, peft's lora_A parameter names)."""
    import peft

    run_mvlm(["export", "--model", str(run), "--merge_lora", "true", "--output", str(merged)])
    adapted = peft.PeftModel.from_pretrained(load(base), str(run / "adapter")).eval()
    names = [n for n, _ in adapted.named_parameters() if "lora_A" in n]
    with torch.no_grad():
        a, m, b = (x(**inputs).logits for x in (adapted, load(merged), load(base)))
    return (a - m).abs().max().item(), (a - b).abs().max().item(), names
