"""A training job that is killed, or told to stop, loses nothing.

Tiny Qwen2.5-VL, `mvlm sft` on 2 ranks (TP=2, gloo), checkpoints every SAVE_INTERVAL steps. Each
test interrupts the same command in several ways in a row, reruns it unchanged after each
interruption, and at the end compares `logging.jsonl` with an uninterrupted run: every step's loss,
grad norm, lr and consumed samples equal, bit for bit.

* kill -9 of one rank mid-training: torchrun ends the job; `latest` names the last complete
  checkpoint; the rerun resumes from it.
* kill -9 of every process inside a checkpoint save, made deterministic by the save's pause
  point (MVLM_FAULT_PAUSE_AT=staged: all ranks wrote, nothing published): the partial
  `.checkpoint-N.tmp-*` is never named by `latest`, the previous checkpoint stays valid, the rerun
  resumes from it and removes the partial directory.
* SIGTERM to torchrun, then SIGUSR1 to torchrun launched through scripts/torchrun_multinode.sh:
  the ranks finish the current step, save a checkpoint of *that* step within the grace time, and
  exit 143; the rerun resumes from it.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, free_port

TRAIN_ITERS = 12
SAVE_INTERVAL = 4  # signals land between interval saves: the stop saves its own step
GRACE_S = 60  # what the test allows between the signal and a clean exit (the scripts give 110)
TIMING = ("tokens_per_sec", "elapsed_s", "eta_s", "step_time_s")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from mvlm.demo_data import write_demo_dataset
    from mvlm.testing.tiny_models import build_tiny_checkpoint

    d = tmp_path_factory.mktemp("ft_inputs")
    hf = build_tiny_checkpoint("qwen2_5_vl", d / "hf")
    data = write_demo_dataset(d / "data", n_train=64, n_val=8)
    return hf, data.train


def _args(inputs, out: Path) -> list[str]:
    hf, data = inputs
    return ["sft", "--model", str(hf), "--dataset", str(data), "--output_dir", str(out),
            "--tp", "2", "--train_iters", str(TRAIN_ITERS), "--save_interval", str(SAVE_INTERVAL),
            "--micro_batch_size", "2", "--global_batch_size", "4", "--lr", "1e-3",
            "--max_length", "256", "--seed", "0"]


def _env(**kw) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO),
               MVLM_PYTHON=sys.executable)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES",
              "NODE_RANK", "MVLM_STOP_FILE", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS",
              "MVLM_FAULT_PAUSE_AT", "MVLM_FAULT_MARKER"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in kw.items()})
    return env


class Job:
    """`torchrun -m mvlm ARGS` (or the launcher script) in the background, output to a file."""

    def __init__(self, args: list[str], log: Path, launcher: bool = False, **env_kw):
        self.log = log
        if launcher:
            cmd = ["bash", str(REPO / "scripts" / "torchrun_multinode.sh"), *args]
            env = _env(NPROC_PER_NODE=2, MASTER_PORT=free_port(), **env_kw)
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                   "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                   "-m", "mvlm", *args]
            env = _env(**env_kw)
        self._f = open(log, "w")
        self.p = subprocess.Popen(cmd, stdout=self._f, stderr=subprocess.STDOUT, env=env,
                                  cwd=log.parent, start_new_session=True)

    def workers(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.p.pid)], capture_output=True, text=True)
        return [int(x) for x in out.stdout.split()]

    def wait(self, timeout: float) -> int:
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait()
            raise AssertionError(f"job did not end in {timeout}s:\n{self.text()[-4000:]}") from None
        finally:
            self._f.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def _records(out: Path) -> list[dict]:
    f = out / "logging.jsonl"
    if not f.exists():
        return []
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in f.read_text().splitlines() if line.strip()]


def _steps_logged(out: Path) -> int:
    return max((r["step"] for r in _records(out) if "loss" in r), default=0)


def _latest(out: Path) -> str | None:
    f = out / "latest"
    return f.read_text().strip() if f.exists() else None


def _wait_for(cond, job: Job, timeout: float = 300, poll: float = 0.05, what: str = ""):
    t0 = time.time()
    while not cond():
        assert job.p.poll() is None, f"job ended before {what}:\n{job.text()[-4000:]}"
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(poll)


def _run_to_end(args, log: Path) -> str:
    job = Job(args, log)
    rc = job.wait(600)
    assert rc == 0, job.text()[-6000:]
    return job.text()


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    d = tmp_path_factory.mktemp("ft_ref")
    _run_to_end(_args(inputs, d / "run"), d / "ref.log")
    recs = _records(d / "run")
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, TRAIN_ITERS + 1))
    return recs


def _resumed_from(text: str) -> str:
    m = re.search(r"resumed from \S*/(checkpoint-\d+) at step", text)
    assert m, text[-4000:]
    return m.group(1)


def test_kill9_rank_and_kill9_during_save(inputs, reference, tmp_path):
    out = tmp_path / "run"
    args = _args(inputs, out)

    # 1. kill -9 one rank in the middle of training (after the first checkpoint).
    job = Job(args, tmp_path / "a.log")
    _wait_for(lambda: _latest(out) is not None and _steps_logged(out) >= SAVE_INTERVAL + 1, job,
              what="a checkpoint and one more step")
    os.kill(job.workers()[1], signal.SIGKILL)
    rc = job.wait(120)
    assert rc != 0  # torchrun saw the rank die and ended the job
    latest_a = _latest(out)
    assert latest_a is not None and (out / latest_a / "trainer_state.json").exists()

    # 2. the same command resumes; kill -9 everything inside its next checkpoint save, at the
    #    named pause point "staged" (mvlm.convert.publish): every rank has written its files,
    #    nothing is published. The save waits there for us, so the kill cannot miss it.
    marker = tmp_path / "paused.json"
    job = Job(args, tmp_path / "b.log", MVLM_FAULT_PAUSE_AT="staged", MVLM_FAULT_MARKER=marker)
    _wait_for(marker.exists, job, what="the next checkpoint save to pause at 'staged'")
    partial = Path(json.loads(marker.read_text())["where"])
    m = re.fullmatch(r"\.checkpoint-(\d+)\.tmp-\w+", partial.name)
    assert partial.parent == out and m, partial
    partial_step = int(m.group(1))
    assert partial_step > int(latest_a.split("-")[1])
    assert (partial / "trainer_state.json").exists() and (partial / "mvlm_meta.json").exists()
    assert sorted(p.name for p in (partial / "rng").iterdir()) == \
        ["rank_00000.pt", "rank_00001.pt"]  # every rank has written ...
    assert not (out / f"checkpoint-{partial_step}").exists()  # ... nothing is published
    assert _latest(out) == latest_a
    for pid in job.workers():
        os.kill(pid, signal.SIGKILL)
    os.killpg(job.p.pid, signal.SIGKILL)
    job.wait(60)
    assert _resumed_from(job.text()) == latest_a
    assert partial.is_dir(), "the kill left the staging dir behind (the rerun must remove it)"
    assert not (out / f"checkpoint-{partial_step}").exists()
    assert _latest(out) == latest_a, "latest must still name the previous complete checkpoint"
    assert (out / latest_a / "trainer_state.json").exists()

    # 3. the rerun resumes from the previous checkpoint, removes the partial one, finishes.
    text = _run_to_end(args, tmp_path / "c.log")
    assert _resumed_from(text) == latest_a
    assert not list(out.glob(".checkpoint-*.tmp-*")), "partial checkpoint dir not cleaned up"
    assert _latest(out) == f"checkpoint-{TRAIN_ITERS}"
    assert _records(out) == reference


def test_sigterm_and_sigusr1_checkpoint_at_current_step(inputs, reference, tmp_path):
    out = tmp_path / "run"
    args = _args(inputs, out)
    stopped = []
    for i, (sig, launcher) in enumerate([(signal.SIGTERM, False), (signal.SIGUSR1, True)]):
        job = Job(args, tmp_path / f"{sig.name}.log", launcher=launcher)
        start = max([0, *stopped])
        _wait_for(lambda s=start: _steps_logged(out) >= s + 2, job,
                  what=f"two steps before {sig.name}")
        t0 = time.time()
        job.p.send_signal(sig)  # to torchrun, as srun / Slurm / k8s deliver it
        job.wait(GRACE_S + 30)
        took = time.time() - t0
        text = job.text()
        assert f"caught {sig.name}" in text, text[-4000:]
        assert "rank0]: Traceback" not in text and "rank1]: Traceback" not in text, text[-4000:]
        if launcher:
            assert "torch.distributed.run --standalone --nproc-per-node 2" in text
        step = _steps_logged(out)
        assert _latest(out) == f"checkpoint-{step}", (sig.name, step, _latest(out))
        assert took < GRACE_S, f"{sig.name}: {took:.1f}s to checkpoint and exit"
        if i > 0:
            assert _resumed_from(text) == f"checkpoint-{stopped[-1]}"
        stopped.append(step)
    text = _run_to_end(args, tmp_path / "final.log")
    assert _resumed_from(text) == f"checkpoint-{stopped[-1]}"
    assert _records(out) == reference
