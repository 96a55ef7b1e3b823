"""Bad input to `mvlm convert`: each case gets a clear message naming the fix, a non-zero exit,
and no output directory (nor a left-over staging directory that looks complete)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import REPO, run_mvlm


def _no_output(out):
    assert not out.exists()


def test_unknown_model_type(tiny_ckpt, tmp_path):
    src = tmp_path / "weird"
    shutil.copytree(tiny_ckpt("qwen2"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llama"  # transformers knows it, mvlm does not (yet)
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    p = run_mvlm(["convert", "--to", "mcore", "--model", str(src), "--output", str(out)],
                 check=False)
    assert p.returncode == 2
    assert "model_type 'llama' is not supported" in p.stderr
    assert "qwen2_5_vl" in p.stderr and "qwen3_moe" in p.stderr  # lists supported types
    _no_output(out)


@pytest.mark.parametrize("family,flags,needle", [
    ("qwen2", ["--tp", "4"], "num_attention_heads=6"),
    ("qwen2", ["--tp", "2"], "num_key_value_heads=3"),
    ("qwen3_moe", ["--ep", "4"], "num_experts=6"),
])
def test_layout_does_not_divide_model(tiny_ckpt, tmp_path, family, flags, needle):
    out = tmp_path / "out"
    p = run_mvlm(["convert", "--to", "mcore", "--model", str(tiny_ckpt(family, "indivisible")),
                  "--output", str(out), *flags], check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert needle in p.stderr and "Choose --tp" in p.stderr, p.stderr[-2000:]
    _no_output(out)


def test_ranks_do_not_match_layout(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    p = run_mvlm(["convert", "--to", "mcore", "--model", str(tiny_ckpt("qwen2")), "--output",
                  str(out), "--tp", "2"], check=False)
    assert p.returncode == 2
    assert "1 ranks cannot hold TP=2" in p.stderr and "--nproc-per-node 2" in p.stderr
    _no_output(out)


def test_existing_output_needs_overwrite(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["convert", "--to", "mcore", "--model", str(tiny_ckpt("qwen2")), "--output", str(out)]
    p = run_mvlm(args, check=False)
    assert p.returncode == 2 and "--overwrite" in p.stderr
    assert (out / "keep.txt").read_text() == "mine"
    run_mvlm(args + ["--overwrite"])
    assert (out / "mvlm_meta.json").exists() and not (out / "keep.txt").exists()


def _sharded_copy(src, dst):
    """Re-save a tiny checkpoint in several shards with an index, as big downloads are."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.save_pretrained(dst, max_shard_size="150KB")
    for f in src.iterdir():
        if f.suffix == ".json" and f.name != "config.json" and not (dst / f.name).exists():
            shutil.copy(f, dst / f.name)
    shards = sorted(dst.glob("model-*.safetensors"))
    assert len(shards) > 2 and (dst / "model.safetensors.index.json").exists()
    return shards


def test_missing_and_corrupt_shard(tiny_ckpt, tmp_path):
    src = tmp_path / "sharded"
    shards = _sharded_copy(tiny_ckpt("qwen2"), src)
    out = tmp_path / "out"
    # Intact sharded checkpoint converts fine (the index path is exercised).
    run_mvlm(["convert", "--to", "mcore", "--model", str(src), "--output", str(out)])
    shutil.rmtree(out)
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 3])
    p = run_mvlm(["convert", "--to", "mcore", "--model", str(src), "--output", str(out)],
                 check=False)
    assert p.returncode == 2 and shards[1].name in p.stderr and "corrupt" in p.stderr
    shards[1].unlink()
    p = run_mvlm(["convert", "--to", "mcore", "--model", str(src), "--output", str(out)],
                 check=False)
    assert p.returncode == 2 and shards[1].name in p.stderr and "missing" in p.stderr
    _no_output(out)


def test_failed_verification_leaves_nothing(tiny_ckpt, tmp_path):
    """A mapping bug (simulated: noise added to every row-parallel shard) must be caught by
    --verify: non-zero exit and no output directory."""
    out = tmp_path / "out"
    script = tmp_path / "buggy.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        import mvlm.convert.mapping as m
        orig = m.Row.load
        m.Row.load = lambda self, *a: orig(self, *a) + 1e-2
        from mvlm.cli import main
        sys.exit(main(["convert", "--to", "mcore", "--model", {str(tiny_ckpt("qwen2"))!r},
                       "--output", {str(out)!r}, "--verify"]))
    """))
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    assert p.returncode != 0
    assert "does not match the HF model" in p.stderr and "max|dlogits|" in p.stderr
    _no_output(out)
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_interrupted_conversion_never_publishes(tiny_ckpt, tmp_path):
    """SIGKILL in the middle of writing: the final directory must not appear; rerunning the
    same command then succeeds."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "mvlm", "convert", "--to", "mcore", "--model",
            str(tiny_ckpt("qwen2_vl")), "--output", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and not list(tmp_path.glob(".out.tmp-*")):
            assert proc.poll() is None, "conversion ended before it could be interrupted"
            time.sleep(0.05)
        assert list(tmp_path.glob(".out.tmp-*")), "staging directory never appeared"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    run_mvlm(args[3:])
    assert (out / "mvlm_meta.json").exists()
