"""`mvlm rlhf --rlhf_type grpo --use_vllm true --vllm_mode server` against a rollout server,
without vLLM (CI has no vLLM venv): the server is the real ``RolloutService`` and HTTP front
with a transformers model as its engine (tests/e2e/_hf_rollout_server.py), in its own process.
The same run against real vLLM is in tests/e2e/test_vllm_server.py (skipped without the venv).

Tiny Qwen2, fp32, one trainer rank, reward = the plugin's fraction of even token ids:

* full training, 3 steps + an evaluation after the last: the server's weights are pushed before
  every rollout whose policy changed (version = steps + 1: the start, after steps 1 and 2, and
  the evaluation's after step 3), in buckets of 0.05 MB, each sync read back and compared
  (``--check_weight_sync``); at the end the engine's weights equal the exported model exactly;
  engine vs trainer ``token_mult_prob_error`` from logging.jsonl;
* LoRA: the server is killed mid-run -> the trainer stops (exit 1) naming the server and the
  checkpoint it saved at the step it reached; the server restarted, the same command resumes
  from that checkpoint and finishes; the engine then holds the merged weights (base + the
  exported PEFT adapter, merged by peft);
* a server that never comes up -> the command stops naming host:port and
  --vllm_server_timeout; flags refused with their names (colocate on CPU, server flags without
  server mode, two servers).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

PLUGIN = '''from swift.plugin import ORM, orms


class EvenTokens(ORM):
    def __call__(self, completions, response_token_ids, **kwargs):
        return [sum(t % 2 == 0 for t in ids) / max(1, len(ids)) for ids in response_token_ids]


orms['even_tokens'] = EvenTokens
'''
PROMPTS = ("Count to five.", "Name a colour.", "2+2?", "Say hi.")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def start_server(hf: Path, port: int, log: Path) -> subprocess.Popen:
    from mvlm.rl.rollout.vllm_server import VLLMServerConfig, wait_for_server

    f = open(log, "a")
    proc = subprocess.Popen([sys.executable, str(HERE / "_hf_rollout_server.py"), str(hf),
                             str(port)], stdout=f, stderr=subprocess.STDOUT, env=ENV)
    try:
        wait_for_server(VLLMServerConfig(vllm_server_port=port, vllm_server_timeout=120))
    except Exception:
        proc.kill()
        raise AssertionError(log.read_text()[-3000:]) from None
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


def grpo_cmd(tmp: Path, hf: Path, out: Path, port: int, *extra: str) -> list[str]:
    (tmp / "plugin.py").write_text(PLUGIN)
    data = tmp / "rl.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n"
                            for q in PROMPTS))
    return [sys.executable, "-m", "mvlm", "rlhf", "--rlhf_type", "grpo", "--model", str(hf),
            "--dataset", str(data), "--val_dataset", str(data),
            "--external_plugins", str(tmp / "plugin.py"), "--reward_funcs", "even_tokens",
            "--num_generations", "4", "--max_completion_length", "6", "--temperature", "1.0",
            "--top_k", "3", "--top_p", "1.0", "--beta", "0",
            "--use_vllm", "true", "--vllm_mode", "server", "--vllm_server_host", "127.0.0.1",
            "--vllm_server_port", str(port), "--vllm_server_timeout", "60",
            "--weight_sync_bucket_mb", "0.05", "--check_weight_sync", "true",
            "--torch_dtype", "float32", "--micro_batch_size", "2", "--global_batch_size", "2",
            "--lr", "5e-3", "--lr_decay_style", "constant", "--lr_warmup_iters", "0",
            "--max_length", "128", "--seed", "0", "--output_dir", str(out),
            "--report_to", "none", "--disable_tqdm", "true", *extra]


def engine_weights(port: int, names: list[str]) -> dict[str, torch.Tensor]:
    from mvlm.rl.rollout.vllm_server import VLLMServerConfig, VLLMServerEngine

    return VLLMServerEngine(VLLMServerConfig(vllm_server_port=port)).read_weights(names)


def health(port: int) -> dict:
    from mvlm.rl.rollout.vllm_server import VLLMServerConfig, wait_for_server

    return wait_for_server(VLLMServerConfig(vllm_server_port=port, vllm_server_timeout=10))


def train_records(out: Path) -> list[dict]:
    f = out / "logging.jsonl"
    if not f.exists():
        return []
    return [r for r in (json.loads(x) for x in f.read_text().splitlines() if x.strip())
            if "reward" in r]


@pytest.fixture
def qwen(tiny_ckpt):
    return tiny_ckpt("qwen2")


def test_server_mode_full_syncs_every_step(tmp_path, qwen):
    from helpers import free_port
    from safetensors.torch import load_file

    port = free_port()
    server = start_server(qwen, port, tmp_path / "server.log")
    try:
        out = tmp_path / "out"
        cmd = grpo_cmd(tmp_path, qwen, out, port, "--train_iters", "3", "--eval_interval", "3",
                       "--save_final_checkpoint", "false", "--save_safetensors", "true")
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
        assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
        recs = train_records(out)
        print("token_mult_prob_error", [r["token_mult_prob_error"] for r in recs],
              "logp_abs_diff_max", [r["logp_abs_diff_max"] for r in recs])
        assert [r["step"] for r in recs] == [1, 2, 3]
        for r in recs:  # transformers fp32 engine vs the Megatron fp32 trainer
            assert 1.0 <= r["token_mult_prob_error"] <= 1.00001, r
            assert r["logp_abs_diff_max"] <= 2e-5, r
        h = health(port)
        # pushed at the start, after steps 1 and 2 (before their rollouts) and after step 3
        # (the evaluation's rollouts): every push a complete, read-back-checked sync
        assert h["weight_version"] == 4 and h["stale"] is None, h
        assert h["last_sync"]["buckets"] >= 3, h
        assert "read back equal" in p.stderr
        want = load_file(out / "hf" / "model.safetensors")
        got = engine_weights(port, sorted(want))
        diff = max(float((got[n] - want[n]).abs().max()) for n in want)
        moved = max(float((want[n] - t).abs().max())
                    for n, t in load_file(qwen / "model.safetensors").items())
        print("engine vs exported model max|diff|", diff, "trained weights moved by", moved)
        assert diff == 0.0 and moved > 1e-3
    finally:
        stop(server)


def test_server_mode_lora_server_killed_then_resume(tmp_path, qwen):
    from helpers import free_port
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mvlm.train.checkpoint import read_latest

    port = free_port()
    slog = tmp_path / "server.log"
    server = start_server(qwen, port, slog)
    out = tmp_path / "out"
    cmd = grpo_cmd(tmp_path, qwen, out, port, "--train_iters", "5", "--eval_interval", "5",
                   "--train_type", "lora", "--lora_rank", "4", "--lora_alpha", "8",
                   "--save_final_checkpoint", "false", "--save_safetensors", "true")
    try:
        with open(tmp_path / "train1.log", "w") as f:
            trainer = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV)
        deadline = time.monotonic() + 600
        while (not train_records(out) or train_records(out)[-1]["step"] < 2):
            assert trainer.poll() is None, (tmp_path / "train1.log").read_text()[-6000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        stop(server)  # SIGKILL mid-run
        rc = trainer.wait(600)
        log1 = (tmp_path / "train1.log").read_text()
        assert rc == 1, log1[-6000:]
        reached = train_records(out)[-1]["step"]
        ckpt = read_latest(out)
        assert ckpt is not None and ckpt.name == f"checkpoint-{reached}", (ckpt, reached)
        assert f"rollout server at 127.0.0.1:{port}" in log1
        assert f"the last checkpoint is {ckpt}" in log1 and "rerun the same command" in log1
        assert "Traceback" not in log1

        server = start_server(qwen, port, slog)  # restarted: the same command resumes
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
        assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
        assert f"resumed from {ckpt} at step {reached}" in p.stderr
        assert train_records(out)[-1]["step"] == 5
        # the engine holds base + adapters merged (pushed by the evaluation after step 5)
        adir = next(d.parent for d in out.rglob("adapter_config.json"))
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(qwen, dtype=torch.float32), adir)
        want = {n: t for n, t in model.merge_and_unload().state_dict().items()
                if n != "lm_head.weight"}
        got = engine_weights(port, sorted(want))
        base = AutoModelForCausalLM.from_pretrained(qwen, dtype=torch.float32).state_dict()
        diff = max(float((got[n] - want[n]).abs().max()) for n in want)
        moved = max(float((want[n] - base[n]).abs().max()) for n in want)
        print("engine vs peft-merged max|diff|", diff, "adapters moved weights by", moved)
        assert moved > 1e-4 and diff <= 1e-6
    finally:
        stop(server)


def test_server_never_up_stops_the_command(tmp_path, qwen):
    from helpers import free_port

    port = free_port()
    out = tmp_path / "out"
    cmd = grpo_cmd(tmp_path, qwen, out, port, "--train_iters", "1")
    cmd[cmd.index("--vllm_server_timeout") + 1] = "1"
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert p.returncode == 1, (p.stdout + p.stderr)[-4000:]
    assert f"no rollout server answered at 127.0.0.1:{port} within 1 s " \
           "(--vllm_server_timeout" in p.stderr, p.stderr[-3000:]
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("flags,needle", [
    (["--use_vllm", "true"], "needs GPUs and this machine has none"),
    (["--use_vllm", "true", "--vllm_mode", "colocate"], "--vllm_mode server"),
    (["--vllm_server_port", "8000"], "--vllm_server_port"),
    (["--use_vllm", "false", "--check_weight_sync", "true"], "--check_weight_sync"),
    (["--use_vllm", "true", "--vllm_mode", "server", "--vllm_server_host", "a", "b"],
     "one rollout server"),
    (["--use_vllm", "true", "--vllm_mode", "server", "--weight_sync_bucket_mb", "0"],
     "--weight_sync_bucket_mb"),
    (["--use_vllm", "true", "--vllm_mode", "server", "--vllm_server_base_url", "localhost"],
     "--vllm_server_base_url"),
])
def test_vllm_flags_refused(flags, needle):
    from mvlm.rl.grpo_cli import grpo_objective, grpo_parser

    if torch.cuda.is_available() and "GPUs" in needle:
        pytest.skip("CPU-only message")
    ns, _ = grpo_parser().parse_known_args(["--reward_funcs", "format", *flags])
    with pytest.raises(ValueError, match=needle):
        grpo_objective(ns)


def test_server_flags_build_the_engine_config():
    from mvlm.rl.grpo_cli import grpo_objective, grpo_parser, server_config

    ns, _ = grpo_parser().parse_known_args([
        "--reward_funcs", "format", "--use_vllm", "true", "--vllm_mode", "server",
        "--vllm_server_base_url", "http://10.0.0.7:8123", "--vllm_server_timeout", "30",
        "--weight_sync_bucket_mb", "64", "--check_weight_sync", "true"])
    c = server_config(ns)
    assert (c.address, c.vllm_server_timeout, c.weight_sync_bucket_mb, c.check_weight_sync) == \
        ("10.0.0.7:8123", 30.0, 64.0, True)
    assert grpo_objective(ns).engine_factory is not None
    ns, _ = grpo_parser().parse_known_args(["--reward_funcs", "format", "--use_vllm", "true",
                                            "--vllm_mode", "server"])
    c = server_config(ns)  # ms-swift's defaults
    assert (c.address, c.vllm_server_timeout, c.weight_sync_bucket_mb, c.check_weight_sync) == \
        ("127.0.0.1:8000", 240.0, 512.0, False)
