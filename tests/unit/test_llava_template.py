"""LLaVA's template equals ``LlavaProcessor`` (apply_chat_template + processor call) on the rows of
test_data_hf_equality (one image, two images of different sizes, system prompt, multi-turn,
text-only): input_ids and pixel_values exactly equal, labels exactly the assistant turns. Also:
truncation never splits an image's token run, deferred pixels equal eager ones, and the tower
module's features equal transformers' ``get_image_features`` on the same weights.
"""
import pytest
import torch
from test_data_hf_equality import _hf_messages, _rows
from transformers import AutoProcessor, LlavaForConditionalGeneration

from mvlm.data.template import TemplateConfig, get_template
from mvlm.models.registry import get_family


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return tiny_ckpt("llava")


@pytest.mark.parametrize("name", list(_rows()))
def test_encode_equals_hf_processor(ckpt, name):
    row = _rows()[name]
    proc = AutoProcessor.from_pretrained(ckpt)
    text = proc.apply_chat_template(_hf_messages(row["messages"]), tokenize=False)
    ref = proc(text=[text], images=row.get("images") or None, return_tensors="pt")
    tpl = get_template(ckpt)
    assert tpl.backend == "native" and tpl.tokens_per_image == 16  # 56 px / 14 = 4 x 4 patches
    got = tpl.encode(row)
    assert torch.equal(got["input_ids"], ref["input_ids"][0])
    if "images" in row:
        assert torch.equal(got["pixel_values"], ref["pixel_values"])
        n_tok = int((got["input_ids"] == proc.image_token_id).sum())
        assert n_tok == 16 * len(row["images"])
    else:
        assert "pixel_values" not in got
    lab = got["labels"]
    expect = proc.tokenizer("".join(m["content"] + "<|im_end|>" for m in row["messages"]
                                    if m["role"] == "assistant"),
                            add_special_tokens=False)["input_ids"]
    assert lab[lab != -100].tolist() == expect
    assert torch.equal(got["position_ids"], torch.arange(len(lab)).expand(3, -1))


def test_jinja_backend_equals_native(ckpt):
    native = get_template(ckpt)
    jinja = get_template(ckpt, cfg=TemplateConfig(template_backend="jinja"))
    for row in _rows().values():
        a, b = native.encode(row), jinja.encode(row)
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["labels"], b["labels"])


def test_truncation_keeps_whole_images_and_deferred_pixels_match(ckpt):
    row = _rows()["multi_turn"]
    full = get_template(ckpt).encode(row)
    ids = full["input_ids"].tolist()
    tok = get_template(ckpt).image_token_id
    second = [i for i, t in enumerate(ids) if t == tok][16]  # first token of the 2nd image
    cut = get_template(ckpt, cfg=TemplateConfig(max_length=second + 5,
                                                truncation_strategy="right")).encode(row)
    assert int((cut["input_ids"] == tok).sum()) == 16 and len(cut["input_ids"]) == second
    assert torch.equal(cut["pixel_values"], full["pixel_values"][:1])
    tpl = get_template(ckpt)
    lazy = tpl.encode(row, with_pixels=False)
    assert "pixel_values" not in lazy and len(lazy["image_refs"]) == 2
    assert torch.equal(tpl.load_pixels(lazy)["pixel_values"], full["pixel_values"])


def test_tower_equals_hf_image_features(ckpt):
    hf = LlavaForConditionalGeneration.from_pretrained(ckpt).eval()
    cfg = hf.config
    tower = get_family("llava").vision.build(cfg, torch.float32, "cpu").eval()
    sd = {f"vision_tower.{k}": v for k, v in hf.model.vision_tower.state_dict().items()}
    sd |= {f"multi_modal_projector.{k}": v
           for k, v in hf.model.multi_modal_projector.state_dict().items()}
    tower.load_state_dict(sd, strict=True)
    pv = get_template(ckpt).encode(_rows()["two_images_different_sizes"])["pixel_values"]
    with torch.no_grad():
        ref = hf.model.get_image_features(
            pv, vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy).pooler_output
        got = tower(pv)
    assert torch.equal(got, torch.cat(list(ref)))
    assert got.shape == (2 * 16, cfg.text_config.hidden_size)
    with pytest.raises(ValueError, match="no grid"):
        tower(pv, torch.ones(2, 3, dtype=torch.long))


def test_storage_round_trip_keeps_gridless_pixels(ckpt):
    """The encoded-dataset storage flattens pixels and restores them from the grid; LLaVA has no
    grid, so the shape column must bring back [n, 3, H, W] (else training sees no image)."""
    from mvlm.data.dataset import from_storage, to_storage

    tpl = get_template(ckpt)
    for row in _rows().values():
        enc = tpl.encode(row)
        back = from_storage(to_storage(enc, tpl))
        assert ("pixel_values" in back) == ("pixel_values" in enc)
        if "pixel_values" in enc:
            assert torch.equal(back["pixel_values"], enc["pixel_values"])
