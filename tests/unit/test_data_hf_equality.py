"""Template encodings equal the HF processor's (apply_chat_template + processor call).

Checked for Qwen2-VL, Qwen2.5-VL and Qwen3-VL on: one image, two images of different sizes, a system
prompt, multi-turn with images in several turns, and text-only. input_ids, pixel_values and
image_grid_thw must be exactly equal; labels cover exactly the assistant turns (+ <|im_end|>).
"""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from mvlm.data.template import TemplateConfig, get_template
from mvlm.testing.tiny_models import build_tiny_checkpoint

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def _img(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=FAMILIES)
def ckpt(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    return build_tiny_checkpoint(request.param, d / "ckpt")


def _rows():
    a, b, c = _img(120, 80, 0), _img(57, 190, 1), _img(300, 300, 2)
    return {
        "single_image": {"messages": [
            {"role": "user", "content": "<image>What is in the picture?"},
            {"role": "assistant", "content": "A red square."}], "images": [a]},
        "two_images_different_sizes": {"messages": [
            {"role": "user", "content": "Compare <image> and <image>, please."},
            {"role": "assistant", "content": "The first is wider."}], "images": [a, b]},
        "system_prompt": {"messages": [
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "<image>\nColor?"},
            {"role": "assistant", "content": "Blue."}], "images": [c]},
        "multi_turn": {"messages": [
            {"role": "user", "content": "<image>Describe it."},
            {"role": "assistant", "content": "Two cats on a table."},
            {"role": "user", "content": "And this one? <image>"},
            {"role": "assistant", "content": "A dog in the park."},
            {"role": "user", "content": "Which is nicer?"},
            {"role": "assistant", "content": "The cats."}], "images": [b, c]},
        "text_only": {"messages": [
            {"role": "user", "content": "What is two plus two?"},
            {"role": "assistant", "content": "Four."}]},
    }


def _hf_messages(messages):
    out = []
    for m in messages:
        parts = []
        for i, piece in enumerate(m["content"].split("<image>")):
            if i:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": m["role"], "content": parts})
    return out


@pytest.mark.parametrize("name", list(_rows()))
def test_encode_equals_hf_processor(ckpt, name):
    row = _rows()[name]
    proc = AutoProcessor.from_pretrained(ckpt)
    text = proc.apply_chat_template(_hf_messages(row["messages"]), tokenize=False)
    ref = proc(text=[text], images=row.get("images") or None, return_tensors="pt")
    tpl = get_template(ckpt)
    assert tpl.backend == "native"  # the fast path was validated against the chat template
    got = tpl.encode(row)
    assert torch.equal(got["input_ids"], ref["input_ids"][0])
    if "images" in row:
        assert torch.equal(got["image_grid_thw"], ref["image_grid_thw"])
        assert torch.equal(got["pixel_values"], ref["pixel_values"])
    else:
        assert "pixel_values" not in got and "image_grid_thw" not in got
    # Labels: exactly the assistant contents + <|im_end|>, decoded back.
    tok = proc.tokenizer
    lab = got["labels"]
    trained = lab[lab != -100].tolist()
    expect = tok("".join(m["content"] + "<|im_end|>" for m in row["messages"]
                         if m["role"] == "assistant"), add_special_tokens=False)["input_ids"]
    assert trained == expect
    # mRoPE positions equal HF's for the same sample.
    import transformers
    model_cls = {"qwen2_vl": transformers.Qwen2VLModel, "qwen2_5_vl": transformers.Qwen2_5_VLModel,
                 "qwen3_vl": transformers.Qwen3VLModel}[tpl.family]
    import functools
    import types
    stub = types.SimpleNamespace(config=transformers.AutoConfig.from_pretrained(ckpt),
                                 get_vision_position_ids=functools.partial(
                                     model_cls.get_vision_position_ids, None))
    if "images" in row:
        pos, _ = model_cls.get_rope_index(stub, ref["input_ids"], ref["mm_token_type_ids"],
                                          ref["image_grid_thw"], None)
        assert torch.equal(got["position_ids"], pos[:, 0])


def test_jinja_backend_equals_native(ckpt):
    native = get_template(ckpt)
    jinja = get_template(ckpt, cfg=TemplateConfig(template_backend="jinja"))
    for row in _rows().values():
        a, b = native.encode(row), jinja.encode(row)
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["labels"], b["labels"])


def test_batch_encode_equals_single(ckpt):
    tpl = get_template(ckpt)
    rows = list(_rows().values())
    batch = tpl.encode_batch(rows)
    for row, b in zip(rows, batch):
        a = tpl.encode(row)
        assert set(a) == set(b)
        for k in a:
            if isinstance(a[k], torch.Tensor):
                assert torch.equal(a[k], b[k]), k
