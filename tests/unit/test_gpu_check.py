"""CPU-runnable parts of the GPU check: arguments, parameter/FLOP arithmetic, table, no-CUDA exit.

Why: the check itself only runs on a GPU box that CI does not have, and it may be all that is read
of a GPU run -- so the numbers it derives (model size, FLOPs, MFU) and its failure modes are
pinned down here where they can be.
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod
    spec.loader.exec_module(mod)
    return mod


gc = _load()


def _hf_param_count(shape) -> int:
    """Build the real HF model for ``shape`` on the meta device (no memory) and count."""
    import transformers

    from mvlm.testing.tiny_models import tiny_config

    cfg = tiny_config("qwen2_5_vl", variant="bench", **shape.tiny_model_overrides())
    with torch.device("meta"):
        model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("shape", [gc.DEFAULT_SHAPE,
                                   gc.Shape(hidden=256, layers=2, heads=4, kv_heads=2,
                                            intermediate=512, vocab=1000, vision_depth=2,
                                            vision_hidden=64, vision_heads=4,
                                            vision_intermediate=128, vision_fullatt=[1])])
def test_param_count_matches_hf_model(shape):
    assert gc.param_counts(shape)["total"] == _hf_param_count(shape)


def test_default_model_is_about_one_billion():
    total = gc.param_counts(gc.DEFAULT_SHAPE)["total"]
    assert 0.8e9 < total < 1.3e9, total


def test_train_flops_by_hand():
    s = gc.Shape(hidden=64, layers=1, heads=4, kv_heads=2, intermediate=128, vocab=100,
                 vision_depth=2, vision_hidden=32, vision_heads=2, vision_intermediate=64,
                 vision_fullatt=[1], window_size=56, seq_len=64, micro_batch_size=2,
                 image_size=112)
    # decoder: q 64x64, k/v 64x32 each, o 64x64, mlp 3x64x128, lm head 64x100
    text_w = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 64 * 100
    text = 3 * 2 * 64 * (2 * text_w + 1 * 2 * 2 * 32 * 64)  # causal: half of s=64 keys
    # vision: 112px -> 8x8 = 64 patches/image; window 56px -> 4x4 = 16 patches
    vis_w = 1176 * 32 + 2 * (4 * 32 * 32 + 3 * 32 * 64)
    ctx = 1 * 64 + 1 * 16  # one full-attention block, one windowed block
    merger_w = 128 * 128 + 128 * 64
    vision = 3 * (2 * 64 * (2 * vis_w + 2 * 2 * ctx * 32) + (2 * 64 // 4) * 2 * merger_w)
    f = gc.train_flops(s)
    assert f["text"] == pytest.approx(text)
    assert f["vision"] == pytest.approx(vision)
    assert f["total"] == pytest.approx(text + vision)


def test_flops_scale_with_batch_and_dominate_as_6n():
    s = gc.DEFAULT_SHAPE
    f1 = gc.train_flops(s)["total"]
    s2 = gc.Shape(micro_batch_size=2 * s.micro_batch_size)
    assert gc.train_flops(s2)["total"] == pytest.approx(2 * f1)
    # 6 * N * tokens is the bulk of it (attention and vision add the rest)
    p = gc.param_counts(s)
    six_n = 6 * (p["text_matmul"] + p["lm_head"]) * s.micro_batch_size * s.seq_len
    assert six_n < f1 < 1.5 * six_n


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0),
                                        ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H200", 989.0),
                                        ("NVIDIA GeForce RTX 4090", None)])
def test_peak_tflops(name, peak):
    assert gc.peak_tflops(name)[0] == peak
    assert gc.peak_tflops(name, 500.0) == (500.0, "--peak_tflops")


def test_parse_args_defaults_and_errors():
    a = gc.parse_args([])
    assert a.sides == ["mcore", "hf"] and a.steps >= 1
    s = gc.shape_from_args(a)
    assert s == gc.DEFAULT_SHAPE
    assert gc.parse_args(["--sides", "hf"]).sides == ["hf"]
    for bad in (["--sides", "deepspeed"], ["--image_size", "100"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            gc.parse_args(bad)
    with pytest.raises(ValueError, match="seq_len"):
        gc.shape_from_args(gc.parse_args(["--seq_len", "128"]))


def test_synthetic_batch_matches_hf_positions():
    """Megatron-side mRoPE positions of the synthetic batch equal HF's get_rope_index."""
    import transformers

    from mvlm.testing.tiny_models import tiny_config

    s = gc.Shape(hidden=64, layers=1, heads=4, kv_heads=2, intermediate=128, vocab=1000,
                 vision_depth=1, vision_hidden=32, vision_heads=2, vision_intermediate=64,
                 vision_fullatt=[0], seq_len=96, micro_batch_size=2, image_size=112)
    cfg = tiny_config("qwen2_5_vl", variant="bench", **s.tiny_model_overrides())
    b = gc.synthetic_batch(s, cfg, seed=0, device="cpu")
    assert b["input_ids"].shape == (2, 96) and b["position_ids"].shape == (3, 2, 96)
    assert int((b["input_ids"] == cfg.image_token_id).sum()) == 2 * s.image_tokens
    assert b["pixel_values"].shape[0] == 2 * s.patches_per_image
    assert (b["labels"][b["input_ids"] == cfg.image_token_id] == -100).all()
    model = transformers.Qwen2_5_VLModel(cfg)
    ref, _ = model.get_rope_index(b["input_ids"], b["mm_token_type_ids"],
                                  image_grid_thw=b["image_grid_thw"],
                                  attention_mask=torch.ones_like(b["input_ids"]))
    assert torch.equal(ref, b["position_ids"])


def test_table_is_last_and_readable():
    rows = [{"label": "mvlm", "tokens_per_s": 50000.0, "tflops": 400.0, "mfu": 0.404,
             "peak_mem_gib": 20.0, "step_s": 0.16, "losses": [7.0]},
            {"label": "hf", "error": "CUDA OOM"}]
    t = gc.format_table(rows, 989.0, "H100 bf16 dense spec", "NVIDIA H100")
    assert "989" in t and "40.4%" in t and "FAILED" in t


def test_script_is_bash_clean_and_fails_fast_without_cuda(tmp_path):
    script = ROOT / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the no-CUDA path cannot be exercised")
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path)}
    p = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 3, p.stderr
    assert "no CUDA device" in p.stderr
    assert not (tmp_path / "site").exists()  # failed before installing anything
    if shutil.which("shellcheck"):
        assert subprocess.run(["shellcheck", str(script)]).returncode == 0


def test_cpu_smoke_run_both_sides_agree(tmp_path):
    """The whole driver on CPU (tiny fp32 model): HF checkpoint build, in-memory conversion into
    the Megatron model, Megatron-Core DDP + distributed optimizer steps, and the HF + AdamW steps
    in separate processes. Same weights, batches, clipping and Adam: the losses must agree."""
    import json
    import os

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu_smoke",
                        "--steps", "2", "--warmup", "1", "--work_dir", str(tmp_path / "w"),
                        "--out", str(tmp_path / "r.json")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    last = p.stdout.strip().splitlines()[-3:]
    assert last[0].startswith("side") and "mvlm" in last[1] and "transformers" in last[2]
    r = json.loads((tmp_path / "r.json").read_text())
    mcore, hf = (s["losses"] for s in r["sides"])
    assert len(mcore) == len(hf) == 3
    print("max |dloss|", max(abs(a - b) for a, b in zip(mcore, hf, strict=True)))
    assert mcore == pytest.approx(hf, abs=5e-6)  # measured max |dloss| 8.5e-7
