"""Bad input to `mvlm convert`: each case gets a clear message naming the fix, a non-zero exit,
and no output directory (nor a left-over staging directory that looks complete)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import REPO, assert_same_tensors, run_mvlm
from safetensors.torch import load_file


def _no_output(out):
    assert not out.exists()


def test_unknown_model_type(tiny_ckpt, tmp_path):
    src = tmp_path / "weird"
    shutil.copytree(tiny_ckpt("qwen2"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "phi3"  # transformers knows it, mvlm does not (yet)
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    p = run_mvlm(["convert", "--to", "mcore", "--model", str(src), "--output", str(out)],
                 check=False)
    assert p.returncode == 2
    assert "model_type 'phi3' is not supported" in p.stderr
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
        orig = m.Row.load_into  # the loader reads into the parameter with load_into
        m.Row.load_into = lambda self, *a: (orig(self, *a), a[-1].add_(1e-2))
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


def _kill_at_pause(args: list[str], marker, point: str) -> dict:
    """Run `mvlm ARGS` with the save told to pause at ``point`` (mvlm.convert.publish), wait for
    the marker it writes there, then SIGKILL the whole process group: the kill provably lands
    at that point of the save. Returns the marker (point, rank, pid, where)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MVLM_FAULT_PAUSE_AT=point,
               MVLM_FAULT_MARKER=str(marker))
    proc = subprocess.Popen([sys.executable, "-m", "mvlm", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"conversion ended (rc {proc.returncode}) before pausing "
                                     f"at {point}:\n{proc.stderr.read()[-4000:]}")
            assert time.time() < deadline, f"no pause at {point} within 300 s"
            time.sleep(0.05)  # only how soon we notice; the process waits at the point
        info = json.loads(marker.read_text())
        assert proc.poll() is None, "the paused process must still be alive when it is killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    return info


def test_interrupted_conversion_to_mcore_never_publishes(tiny_ckpt, tmp_path):
    """SIGKILL after the torch_dist weights are on disk but before the metadata: the final
    directory must not appear; rerunning the same command then succeeds."""
    out = tmp_path / "out"
    args = ["convert", "--to", "mcore", "--model", str(tiny_ckpt("qwen2_vl")), "--output",
            str(out)]
    info = _kill_at_pause(args, tmp_path / "paused.json", "mid_write")
    staging = Path(info["where"])
    assert staging.parent == tmp_path and staging.name.startswith(".out.tmp-"), staging
    assert (staging / "model" / ".metadata").exists()  # the weights were written ...
    assert not (staging / "mvlm_meta.json").exists()  # ... the rest was not
    assert not out.exists()
    run_mvlm(args)
    assert (out / "mvlm_meta.json").exists() and (out / "model" / ".metadata").exists()


def test_interrupted_conversion_to_hf_never_publishes(tiny_ckpt, tmp_path):
    """SIGKILL with the first safetensors shard complete and the others not written: no
    output directory; the rerun succeeds and writes the same tensors as an uninterrupted run."""
    mcore = tmp_path / "mcore"
    run_mvlm(["convert", "--to", "mcore", "--model", str(tiny_ckpt("qwen2_vl")), "--output",
              str(mcore)])
    out = tmp_path / "out"
    args = ["convert", "--to", "hf", "--model", str(mcore), "--output", str(out),
            "--max_shard_size", "150KB"]
    info = _kill_at_pause(args, tmp_path / "paused.json", "mid_write")
    shard = Path(info["where"])
    staging = shard.parent
    assert staging.parent == tmp_path and staging.name.startswith(".out.tmp-"), staging
    assert re.fullmatch(r"model-00001-of-(\d{5})\.safetensors", shard.name), shard.name
    n_shards = int(shard.name[-17:-12])
    assert n_shards > 2, "the export must span several shards for the kill to be mid-write"
    assert sorted(p.name for p in staging.iterdir()) == [shard.name]  # one shard, no config
    assert len(load_file(shard)) > 0  # the complete shard is readable
    assert not out.exists()
    run_mvlm(args)
    assert len(list(out.glob("model-*-of-*.safetensors"))) == n_shards
    assert (out / "config.json").exists() and (out / "model.safetensors.index.json").exists()
    ref = tmp_path / "ref"
    run_mvlm(["convert", "--to", "hf", "--model", str(mcore), "--output", str(ref)])
    assert assert_same_tensors(ref, out) > 0
