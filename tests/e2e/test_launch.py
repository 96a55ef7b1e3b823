"""Launch scripts: syntax/lint, scripts/torchrun_multinode.sh as two "nodes" on this machine, and
mvlm.train.signals' all-ranks-agree stop under torchrun (signal forwarding included)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import REPO, free_port

SCRIPTS = sorted([REPO / "scripts" / "torchrun_multinode.sh",
                  *(REPO / "scripts" / "slurm").glob("*.sbatch"),
                  REPO / "scripts" / "slurm" / "lib.sh",
                  *(REPO / "scripts" / "ci").glob("*.sh")])
LAUNCHER = REPO / "scripts" / "torchrun_multinode.sh"


def _env(**kw) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               MVLM_PYTHON=sys.executable, PYTHONPATH=str(REPO))
    for k in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "RANK",
              "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in kw.items()})
    return env


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    p = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    p = subprocess.run(["shellcheck", "-x", "-P", "scripts/slurm",
                        *[str(s.relative_to(REPO)) for s in SCRIPTS]],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr


def test_launcher_validates_its_variables():
    p = subprocess.run(["bash", str(LAUNCHER), "convert"], capture_output=True, text=True,
                       timeout=30, env=_env(NNODES=2, NODE_RANK=2))
    assert p.returncode == 2 and "NODE_RANK=2 must be < NNODES=2" in p.stderr, p.stderr
    p = subprocess.run(["bash", str(LAUNCHER), "convert"], capture_output=True, text=True,
                       timeout=30, env=_env(NPROC_PER_NODE="eight"))
    assert p.returncode == 2 and "NPROC_PER_NODE must be" in p.stderr, p.stderr
    p = subprocess.run(["bash", str(LAUNCHER)], capture_output=True, text=True, timeout=30,
                       env=_env())
    assert p.returncode == 2 and "NNODES" in p.stdout


def test_two_nodes_on_localhost(tiny_ckpt, tmp_path):
    """NNODES=2 x NPROC_PER_NODE=1 through the launcher, rendezvous on MASTER_ADDR:MASTER_PORT:
    a TP=2 conversion whose two ranks live on different "nodes", logits verified against HF."""
    hf = tiny_ckpt("qwen2_5_vl")
    out = tmp_path / "mcore"
    port = free_port()
    procs = []
    for node in (0, 1):
        env = _env(NNODES=2, NODE_RANK=node, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   NPROC_PER_NODE=1)
        procs.append(subprocess.Popen(
            ["bash", str(LAUNCHER), "convert", "--to", "mcore", "--model", str(hf), "--output",
             str(out), "--tp", "2", "--verify"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]
    assert "--nnodes 2 --node-rank 1 --master-addr 127.0.0.1" in logs[1]
    assert "verify text" in logs[0] and (out / "mvlm_meta.json").exists()


WORKER = textwrap.dedent("""
    import os, sys, time
    import torch.distributed as dist
    from mvlm.train.signals import EXIT_PREEMPTED, PreemptionHandler
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    stopper = PreemptionHandler().install()
    open(os.path.join(sys.argv[1], f"ready{rank}"), "w").close()
    for step in range(1, 10000):
        time.sleep(0.05)  # "the step"
        if stopper.should_stop():
            with open(os.path.join(sys.argv[1], f"stopped{rank}"), "w") as f:
                f.write(f"{step} {stopper.received.name if stopper.received else 'file'}")
            dist.barrier()
            dist.destroy_process_group()  # as mvlm's own exit does (train/setup.py)
            sys.exit(EXIT_PREEMPTED)
    sys.exit(1)
""")


def _start_workers(tmp_path, env_extra=None):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = _env(**(env_extra or {}))
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                          str(script), str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    t0 = time.time()
    while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)):
        assert p.poll() is None, p.communicate()[0][-3000:]
        assert time.time() - t0 < 120, "workers did not start"
        time.sleep(0.1)
    return p


def _worker_pids(torchrun_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(torchrun_pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def _stops(tmp_path):
    return [(tmp_path / f"stopped{r}").read_text().split() for r in (0, 1)]


def test_signal_to_one_rank_stops_all_at_the_same_step(tmp_path):
    """SIGUSR1 delivered to rank 1 only: both ranks agree (all-reduce) and stop after the same
    step, exiting 143."""
    p = _start_workers(tmp_path)
    time.sleep(0.5)
    pids = _worker_pids(p.pid)
    assert len(pids) == 2, pids
    os.kill(pids[1], signal.SIGUSR1)
    out = p.communicate(timeout=60)[0]
    assert p.returncode != 0
    (s0, how0), (s1, how1) = _stops(tmp_path)
    assert s0 == s1, out[-3000:]
    assert "SIGUSR1" in (how0, how1)  # rank 1 caught it; rank 0 stopped on the all-reduce
    assert re.search(r"exitcode\s*:\s*143", out), out[-3000:]


def test_torchrun_forwards_sigusr1_with_launcher_env(tmp_path):
    """torchrun itself gets SIGUSR1 (what srun hands it): with PET_SIGNALS_TO_HANDLE as
    torchrun_multinode.sh sets it, torchrun forwards it and the ranks checkpoint-and-stop."""
    p = _start_workers(tmp_path, {"PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGUSR1",
                                  "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "60"})
    time.sleep(0.5)
    p.send_signal(signal.SIGUSR1)
    out = p.communicate(timeout=90)[0]
    (s0, how0), (s1, how1) = _stops(tmp_path)
    assert s0 == s1 and how0 == how1 == "SIGUSR1", out[-3000:]


def test_stop_file_stops_all_ranks(tmp_path):
    """MVLM_STOP_FILE (what the sbatch trap touches) stops every rank after the same step."""
    stop = tmp_path / "STOP"
    p = _start_workers(tmp_path, {"MVLM_STOP_FILE": stop})
    time.sleep(0.5)
    stop.touch()
    out = p.communicate(timeout=60)[0]
    (s0, how0), (s1, how1) = _stops(tmp_path)
    assert s0 == s1 and how0 == how1 == "file", out[-3000:]


def test_handler_single_process(tmp_path):
    from mvlm.train.signals import EXIT_PREEMPTED, PreemptionHandler

    assert EXIT_PREEMPTED == 143
    h = PreemptionHandler(signals=("USR1", signal.SIGTERM), stop_file=tmp_path / "s")
    prev = signal.getsignal(signal.SIGUSR1)
    with h:
        assert not h.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert h.should_stop() and h.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == prev
    h2 = PreemptionHandler(stop_file=tmp_path / "s")
    assert not h2.should_stop()
    (tmp_path / "s").touch()
    assert h2.should_stop() and h2.received is None
    h2.clear_stop_file()
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="unknown signal"):
        PreemptionHandler(signals=("SIGNOPE",))
