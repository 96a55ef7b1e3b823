"""Qwen3-VL pieces that need no process group: the template against HF's Qwen3VLProcessor
(timestamped video frames, positions), interleaved mRoPE against HF's rotary module, the layouts
DeepStack refuses, and a checkpoint whose weights are not Qwen3-VL's.

Images (one, two of different sizes, system prompt, multi-turn, text-only) are checked for this
family by test_data_hf_equality.py; logits against transformers are
tests/dist/test_qwen3_vl_layouts.py and test_convert_roundtrip.py.
"""
from __future__ import annotations

import re
import shutil
import types

import numpy as np
import pytest
import torch
from helpers import run_mvlm
from PIL import Image


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from mvlm.testing.tiny_models import build_tiny_checkpoint

    return build_tiny_checkpoint("qwen3_vl", tmp_path_factory.mktemp("q3vl") / "hf")


def _frames(tmp_path, n=4):
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 255, (n, 64, 96, 3), dtype=np.uint8)
    paths = []
    for i, a in enumerate(arr):
        p = tmp_path / f"f{i}.png"
        Image.fromarray(a).save(p)
        paths.append(str(p))
    return arr, paths


def test_video_row_equals_hf_processor(ckpt, tmp_path):
    """A 4-frame video (frame list, 2 fps) plus an image: ids with the ``<t seconds>`` frame
    timestamps, pixels, grids and mRoPE positions equal HF's; labels are the answer only;
    truncation never cuts the video."""
    import transformers
    from transformers import AutoProcessor
    from transformers.video_utils import VideoMetadata

    from mvlm.data.template import TemplateConfig, get_template

    arr, paths = _frames(tmp_path)
    image = Image.fromarray(np.random.default_rng(4).integers(0, 255, (80, 48, 3),
                                                               dtype=np.uint8))
    proc = AutoProcessor.from_pretrained(ckpt)
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "And"},
                                         {"type": "image"}, {"type": "text", "text": "?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A ball rolls."}]}]
    text = proc.apply_chat_template(msgs, tokenize=False)
    ref = proc(text=[text], images=[image], videos=[arr], do_sample_frames=False,
               video_metadata=[VideoMetadata(total_num_frames=4, fps=2.0,
                                             frames_indices=[0, 1, 2, 3])],
               return_tensors="pt")
    assert "<0.2 seconds>" in proc.tokenizer.decode(ref["input_ids"][0])
    tpl = get_template(ckpt)
    row = {"messages": [{"role": "user", "content": "<video>And<image>?"},
                        {"role": "assistant", "content": "A ball rolls."}],
           "videos": [paths], "images": [image]}
    got = tpl.encode(row)
    assert torch.equal(got["input_ids"], ref["input_ids"][0])
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        assert torch.equal(got[key], ref[key]), key
    lab = got["labels"]
    assert lab[lab != -100].tolist() == proc.tokenizer("A ball rolls.<|im_end|>")["input_ids"]
    m = transformers.Qwen3VLModel
    stub = types.SimpleNamespace(config=transformers.AutoConfig.from_pretrained(ckpt),
                                 get_vision_position_ids=lambda *a, **k:
                                 m.get_vision_position_ids(None, *a, **k))
    pos, _ = m.get_rope_index(stub, ref["input_ids"], ref["mm_token_type_ids"],
                              ref["image_grid_thw"], ref["video_grid_thw"].clone())
    assert torch.equal(got["position_ids"], pos[:, 0])
    # left truncation starting inside the video drops the whole video block (timestamps,
    # frames and the rendered markers around them) and keeps the image
    ids = got["input_ids"]
    first_pad = int((ids == tpl.video_token_id).nonzero()[0])
    block_end = int((ids == tpl.video_token_id).nonzero()[-1]) + 3  # frame end + outer end
    short = get_template(ckpt, cfg=TemplateConfig(max_length=len(ids) - first_pad,
                                                   truncation_strategy="left"))
    cut = short.encode(row)
    assert torch.equal(cut["input_ids"], ids[block_end:])
    assert "pixel_values_videos" not in cut and "video_grid_thw" not in cut
    assert torch.equal(cut["pixel_values"], ref["pixel_values"])


def test_interleaved_mrope_equals_hf_rotary(ckpt):
    """Megatron-Core's multimodal rotary module, given the per-channel section list, yields
    HF's interleaved cos (Qwen3-VL sizes and the tiny's) for 3 different position rows."""
    import transformers
    from megatron.core.models.common.embeddings.rotary_pos_embedding import (
        MultimodalRotaryEmbedding,
    )

    from mvlm.models.qwen3_vl import interleaved_sections

    pos = torch.stack([torch.arange(12), torch.arange(12) * 3 % 7, torch.arange(12) % 5])
    for head_dim, section in ((128, [24, 20, 20]), (16, [2, 3, 3])):
        tc = transformers.Qwen3VLTextConfig(
            head_dim=head_dim, hidden_size=64, num_attention_heads=4,
            rope_parameters={"rope_type": "default", "rope_theta": 5e5,
                             "mrope_section": section, "mrope_interleaved": True})
        hf = transformers.models.qwen3_vl.modeling_qwen3_vl.Qwen3VLTextRotaryEmbedding(tc)
        cos, _ = hf(torch.zeros(1, dtype=torch.float32), pos[:, None, :])
        mc = MultimodalRotaryEmbedding.__new__(MultimodalRotaryEmbedding)
        torch.nn.Module.__init__(mc)
        mc.rotary_interleaved, mc.seq_len_interpolation_factor, mc.cp_group = False, None, None
        mc.inv_freq = 1.0 / (5e5 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        emb = mc(pos[:, None, :], interleaved_sections(section))  # [s, b, 1, head_dim]
        assert torch.equal(emb[:, 0, 0].cos(), cos[0]), head_dim
        blocks = mc(pos[:, None, :], section)  # the non-interleaved layout differs
        assert not torch.equal(blocks[:, 0, 0].cos(), cos[0])


def test_deepstack_layouts_refused():
    """A pipeline split that leaves a DeepStack layer off the tower's stage, and full
    recompute, are refused naming the flag."""
    from mvlm.models.deepstack import check_layout

    layers = [types.SimpleNamespace(layer_number=n) for n in (2, 3)]  # global layers 1, 2
    with pytest.raises(ValueError, match=r"layer\(s\) \[1\].*--pipeline_model_parallel_size"):
        check_layout(2, layers, pre_process=False, recompute_granularity=None)
    check_layout(1, layers, pre_process=False, recompute_granularity=None)
    with pytest.raises(ValueError, match="--recompute_granularity selective"):
        check_layout(2, layers, pre_process=True, recompute_granularity="full")


@pytest.mark.parametrize("case", ["no_vision_tower", "qwen2_5_vl_weights"])
def test_wrong_weights_are_refused_by_name(ckpt, tiny_ckpt, tmp_path, case):
    """A qwen3_vl config over weights without the vision tower, or over Qwen2.5-VL's weights:
    refused before any output, naming the tensors it lacks."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path / case
    shutil.copytree(ckpt, bad)
    sd = load_file(ckpt / "model.safetensors")
    if case == "no_vision_tower":
        sd = {k: v for k, v in sd.items() if not k.startswith("model.visual.")}
        needle = r"model\.visual\."
    else:
        sd = load_file(tiny_ckpt("qwen2_5_vl") / "model.safetensors")
        needle = r"model\.language_model\."
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "mc"
    p = run_mvlm(["convert", "--to", "mcore", "--model", str(bad), "--output", str(out)],
                 check=False)
    log = p.stderr + p.stdout
    assert p.returncode != 0 and not out.exists()
    assert "missing" in log and re.search(needle, log), log[-3000:]
