"""A NaN/inf loss or gradient stops the run at its step, before the update, and breaks nothing.

`mvlm sft` on the tiny Qwen2 (one rank, fp32), run through ``_nan_runner.py``, which injects a
NaN at a known step from the test side (mvlm has no injection hook) and records what the run did:

1. NaN in ONE parameter's gradient at step 3 (the loss stays finite), checkpoints every 2 steps:
   exit code 2, the message names step 3, the grad norm and that parameter; ``latest`` still
   names checkpoint-2, nothing of step 3 was written, and rerunning the command without the NaN
   resumes from checkpoint-2 and finishes (so that checkpoint is intact).
2. NaN loss at step 2 with ``--max_skipped_steps 1``: the run finishes; step 2 is logged as
   skipped, its update was not applied (the parameter checksum is unchanged) and the cosine LR
   schedule did not advance. The same run checks that ``--recompute_*`` and ``--attn_impl`` reach
   the model the trainer builds (Megatron config fields, the kernel the attention layers ran).
3. The same gradient NaN with ``--check_for_nan_in_loss_and_grad false``: no check, the run
   finishes with exit code 0 and the NaN is in the weights (the next loss is NaN).
4. Two ranks (torchrun, DP=2, distributed optimizer), the NaN gradient on rank 1 only: both ranks
   stop at the same step with the same message (no rank left waiting in a collective).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, free_port

HERE = Path(__file__).resolve().parent
PARAM = "language_model.decoder.layers.1.mlp.linear_fc2.weight"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_ckpt):
    tmp = tmp_path_factory.mktemp("nan")
    rows = [{"messages": [{"role": "user", "content": f"Say the number {i} twice."},
                          {"role": "assistant", "content": f"{i} {i}"}]} for i in range(16)]
    data = tmp / "text.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp, tiny_ckpt("qwen2"), data


def argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["sft", "--model", str(model), "--dataset", str(data), "--torch_dtype", "float32",
            "--train_iters", "4", "--micro_batch_size", "1", "--global_batch_size", "2",
            "--lr", "1e-3", "--min_lr", "1e-5", "--lr_decay_style", "cosine",
            "--max_length", "64", "--seed", "0", "--output_dir", str(out),
            "--save_final_checkpoint", "false", "--save_safetensors", "false",
            "--report_to", "none", "--disable_tqdm", "true", *extra]


def run(args: list[str], record: Path | None = None, kind: str | None = None, step: int = 0,
        nproc: int = 1, only_rank: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", NAN_PARAM=PARAM,
               NAN_STEP=str(step))
    for k in ("NAN_KIND", "NAN_RANK", "NAN_RECORD"):
        env.pop(k, None)
    if kind:
        env["NAN_KIND"] = kind
    if record:
        env["NAN_RECORD"] = str(record)
    if only_rank is not None:
        env["NAN_RANK"] = str(only_rank)
    launch = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    return subprocess.run([*launch, str(HERE / "_nan_runner.py"), *args],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


def log_lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "logging.jsonl").read_text().splitlines() if x]


def test_nan_grad_stops_at_its_step_and_the_last_checkpoint_resumes(setup):
    tmp, model, data = setup
    out = tmp / "stop"
    a = argv(model, data, out, "--save_interval", "2")
    p = run(a, tmp / "stop.json", kind="grad", step=3)
    msg = p.stderr
    assert p.returncode == 2, (p.returncode, p.stdout[-3000:], msg[-6000:])
    err = [x for x in msg.splitlines() if "error:" in x]
    assert err, msg[-4000:]
    print(err[-1])
    assert "step 3: the grad norm is not finite" in err[-1], err
    assert PARAM in err[-1] and "--max_skipped_steps 0" in err[-1], err
    assert (out / "latest").read_text().strip() == "checkpoint-2"
    assert sorted(d.name for d in out.iterdir() if "checkpoint-" in d.name) == ["checkpoint-2"]
    assert [r["step"] for r in log_lines(out) if "loss" in r] == [1, 2]
    rec = json.loads((tmp / "stop.json").read_text())
    assert rec["param_found"] and len(rec["param_sums"]) == 3  # the 3rd call raised

    again = run(a)  # the same command, no NaN: resumes from checkpoint-2
    assert again.returncode == 0, again.stderr[-6000:]
    steps = [r["step"] for r in log_lines(out) if "loss" in r]
    assert steps == [1, 2, 3, 4], steps
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
               for r in log_lines(out) if "loss" in r)


def test_nan_loss_is_skipped_within_max_skipped_steps(setup):
    tmp, model, data = setup
    out = tmp / "skip"
    p = run(argv(model, data, out, "--max_skipped_steps", "1", "--recompute_granularity",
                 "full", "--recompute_method", "block", "--recompute_num_layers", "1",
                 "--attn_impl", "eager"), tmp / "skip.json", kind="loss", step=2)
    assert p.returncode == 0, p.stderr[-6000:]
    assert "step 2: the loss is not finite" in p.stderr and "update skipped" in p.stderr
    lines = [r for r in log_lines(out) if "loss" in r]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert lines[1].get("skipped") == "loss" and not any("skipped" in r for r in lines[2:])
    assert math.isnan(lines[1]["loss"]) and math.isfinite(lines[2]["loss"])
    # skipped: the schedule stood still for one step (cosine: it moves on every applied step)
    lrs = [r["lr"] for r in lines]
    print("lrs", lrs)
    assert lrs[2] == lrs[1] and lrs[1] < lrs[0] and lrs[3] < lrs[2], lrs
    rec = json.loads((tmp / "skip.json").read_text())
    sums = rec["param_sums"]
    print("param sums", sums)
    assert rec["param_sum_before_step_1"] != sums[0], rec  # step 1 updated it
    assert sums[1] == sums[0] and sums[2] != sums[1], sums  # step 2 changed nothing
    # the trainer wired --recompute_* and --attn_impl into the model it built
    assert (rec["recompute_granularity"], rec["recompute_method"],
            rec["recompute_num_layers"]) == ("full", "block", 1), rec
    assert rec["core_attn_impl"] == "eager" and rec["kernels"] == ["eager"], rec


def test_check_false_lets_the_nan_through(setup):
    tmp, model, data = setup
    out = tmp / "nocheck"
    p = run(argv(model, data, out, "--check_for_nan_in_loss_and_grad", "false"),
            kind="grad", step=2)
    assert p.returncode == 0, p.stderr[-6000:]
    lines = [r for r in log_lines(out) if "loss" in r]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert math.isfinite(lines[1]["loss"]) and math.isnan(lines[1]["grad_norm"])
    assert math.isnan(lines[2]["loss"]), lines  # the NaN update reached the weights
    assert "not finite" not in p.stderr


def test_nan_on_one_rank_stops_every_rank_at_the_same_step(setup):
    tmp, model, data = setup
    out = tmp / "dp2"
    p = run(argv(model, data, out, "--use_distributed_optimizer", "true"), kind="grad", step=2,
            nproc=2, only_rank=1)
    assert p.returncode != 0, p.stderr[-6000:]
    # the ranks share one stderr pipe, so two messages can land on one line: split on the prefix
    head = "mvlm sft: error: step 2: the grad norm"
    err = [head + x for x in p.stderr.split(head)[1:]]
    print(err[:1])
    assert len(err) == 2, p.stderr[-6000:]  # one message per rank: both decided, neither hung
    assert all(PARAM in e for e in err), err  # whichever rank holds it after the reduce
    assert [r["step"] for r in log_lines(out) if "loss" in r] == [1]


def test_flag_combinations_are_refused_up_front(setup):
    tmp, model, data = setup
    from mvlm.train.args import parse_train_args

    base = argv(model, data, tmp / "x")[1:]
    with pytest.raises(ValueError, match="--max_skipped_steps"):
        parse_train_args(base + ["--max_skipped_steps", "2",
                                 "--check_for_nan_in_loss_and_grad", "false"], "sft")
