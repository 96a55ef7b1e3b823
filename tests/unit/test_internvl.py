"""InternVL's template equals ``InternVLProcessor`` (apply_chat_template + processor call) on the
rows of test_data_hf_equality (one image, two images of different sizes, system prompt,
multi-turn, text-only): input_ids, pixel values and tile counts exactly equal, labels exactly the
assistant turns. Also: the tile count predicted from the image header equals the processor's,
truncation never splits an image's ``<img> ... </img>`` run, deferred pixels equal eager ones,
storage keeps the tiles, the tower equals transformers' ``get_image_features``, and a checkpoint
whose config says InternVL but whose weights lack the vision tower (or are LLaVA's) is refused
before any output, the missing tensor named.
"""
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_mvlm
from safetensors.torch import load_file, save_file
from test_data_hf_equality import _hf_messages, _rows
from transformers import AutoProcessor, InternVLForConditionalGeneration

from mvlm.data.template import TemplateConfig, get_template
from mvlm.models.registry import get_family

TOKENS_PER_TILE = 4  # 56 px tiles / 14 px patches = 4 x 4, pixel-shuffled to 2 x 2


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return tiny_ckpt("internvl")


@pytest.mark.parametrize("name", list(_rows()))
def test_encode_equals_hf_processor(ckpt, name):
    row = _rows()[name]
    proc = AutoProcessor.from_pretrained(ckpt)
    text = proc.apply_chat_template(_hf_messages(row["messages"]), tokenize=False)
    ref = proc(text=[text], images=row.get("images") or None, return_tensors="pt")
    tpl = get_template(ckpt)
    assert tpl.backend == "native" and tpl.tokens_per_tile == TOKENS_PER_TILE
    got = tpl.encode(row)
    assert torch.equal(got["input_ids"], ref["input_ids"][0])
    ids = got["input_ids"]
    if "images" in row:
        assert torch.equal(got["pixel_values"], ref["pixel_values"])
        tiles = [int(proc.image_processor(images=[im], return_tensors="pt")["num_patches"][0])
                 for im in row["images"]]
        assert got["pixel_values"].shape[0] == sum(tiles)
        assert [tpl.tiles(im.height, im.width) for im in row["images"]] == tiles
        assert int((ids == proc.image_token_id).sum()) == TOKENS_PER_TILE * sum(tiles)
        assert int((ids == proc.start_image_token_id).sum()) == len(row["images"]) == \
            int((ids == proc.end_image_token_id).sum())
    else:
        assert "pixel_values" not in got
    lab = got["labels"]
    expect = proc.tokenizer("".join(m["content"] + "<|im_end|>" for m in row["messages"]
                                    if m["role"] == "assistant"),
                            add_special_tokens=False)["input_ids"]
    assert lab[lab != -100].tolist() == expect
    assert torch.equal(got["position_ids"], torch.arange(len(lab)).expand(3, -1))


def test_tiles_differ_across_the_rows(ckpt):
    """The rows really exercise dynamic tiling: 1 tile (no thumbnail) up to 6 + thumbnail."""
    tpl = get_template(ckpt)
    counts = {tpl.tiles(h, w) for h, w in ((56, 56), (80, 120), (190, 57), (300, 300))}
    assert counts == {1, 7, 4, 5}


def test_jinja_backend_equals_native(ckpt):
    native = get_template(ckpt)
    jinja = get_template(ckpt, cfg=TemplateConfig(template_backend="jinja"))
    for row in _rows().values():
        a, b = native.encode(row), jinja.encode(row)
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["labels"], b["labels"])


def test_truncation_keeps_whole_images_and_deferred_pixels_match(ckpt):
    row = _rows()["multi_turn"]
    tpl = get_template(ckpt)
    full = tpl.encode(row)
    ids = full["input_ids"].tolist()
    start = tpl.start_id
    second = [i for i, t in enumerate(ids) if t == start][1]  # <img> of the 2nd image
    cut = get_template(ckpt, cfg=TemplateConfig(max_length=second + 5,
                                                truncation_strategy="right")).encode(row)
    n_first = tpl.tiles(row["images"][0].height, row["images"][0].width)
    assert len(cut["input_ids"]) == second
    assert int((cut["input_ids"] == tpl.image_token_id).sum()) == TOKENS_PER_TILE * n_first
    assert torch.equal(cut["pixel_values"], full["pixel_values"][:n_first])
    lazy = tpl.encode(row, with_pixels=False)
    assert "pixel_values" not in lazy and len(lazy["image_refs"]) == 2 and "extra" not in lazy
    assert torch.equal(lazy["input_ids"], full["input_ids"])
    assert torch.equal(tpl.load_pixels(lazy)["pixel_values"], full["pixel_values"])


def test_literal_image_tokens_in_text_are_refused(ckpt):
    from mvlm.data.errors import BadSampleError

    tpl = get_template(ckpt)
    row = {"messages": [{"role": "user", "content": "what is <img> here?"},
                        {"role": "assistant", "content": "nothing"}]}
    with pytest.raises(BadSampleError, match="literal <img>"):
        tpl.encode(row)


def test_storage_round_trip_keeps_tiles(ckpt):
    from mvlm.data.dataset import from_storage, to_storage

    tpl = get_template(ckpt)
    for row in _rows().values():
        enc = tpl.encode(row)
        back = from_storage(to_storage(enc, tpl))
        assert ("pixel_values" in back) == ("pixel_values" in enc)
        if "pixel_values" in enc:
            assert torch.equal(back["pixel_values"], enc["pixel_values"])


def test_tower_equals_hf_image_features(ckpt):
    hf = InternVLForConditionalGeneration.from_pretrained(ckpt).eval()
    cfg = hf.config
    tower = get_family("internvl").vision.build(cfg, torch.float32, "cpu").eval()
    sd = {f"vision_tower.{k}": v for k, v in hf.model.vision_tower.state_dict().items()}
    sd |= {f"multi_modal_projector.{k}": v
           for k, v in hf.model.multi_modal_projector.state_dict().items()}
    tower.load_state_dict(sd, strict=True)
    pv = get_template(ckpt).encode(_rows()["two_images_different_sizes"])["pixel_values"]
    with torch.no_grad():
        ref = hf.model.get_image_features(pixel_values=pv).pooler_output
        got = tower(pv)
    assert torch.equal(got, ref.reshape(-1, ref.shape[-1]))
    assert got.shape == (pv.shape[0] * TOKENS_PER_TILE, cfg.text_config.hidden_size)
    with pytest.raises(ValueError, match="no grid"):
        tower(pv, torch.ones(2, 3, dtype=torch.long))


@pytest.mark.parametrize("top,text", [(True, False), (False, True)])
def test_tying_follows_the_top_level_flag(top, text):
    """transformers ties lm_head to the embeddings by the top-level flag alone; so does the
    family's TextArch (a text config saying otherwise must not tie)."""
    import copy

    from mvlm.testing.tiny_models import tiny_config

    cfg = tiny_config("internvl", tie_word_embeddings=top)
    cfg.text_config.tie_word_embeddings = text
    hf = InternVLForConditionalGeneration(copy.deepcopy(cfg))
    tied = hf.lm_head.weight is hf.model.language_model.embed_tokens.weight
    assert tied == top
    assert get_family("internvl").text_arch(cfg).tie_word_embeddings == tied


def _rewrite(src: Path, dst: Path, fn) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    save_file(fn(sd), dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("case", ["no_vision_tower", "llava_weights"])
def test_wrong_weights_are_refused_by_name(ckpt, tiny_ckpt, tmp_path, case):
    """An ``internvl`` config over weights without the vision tower, or over a LLaVA
    checkpoint's weights (CLIP tower, other projector): refused before any output, naming the
    first InternViT tensor it lacks."""
    if case == "no_vision_tower":
        bad = _rewrite(ckpt, tmp_path / case, lambda sd: {
            k: v for k, v in sd.items() if not k.startswith("vision_tower.")})
    else:
        llava = load_file(tiny_ckpt("llava") / "model.safetensors")
        bad = _rewrite(ckpt, tmp_path / case, lambda sd: llava)
    out = tmp_path / "mc"
    p = run_mvlm(["convert", "--to", "mcore", "--model", str(bad), "--output", str(out)],
                 check=False)
    log = p.stderr + p.stdout
    assert p.returncode != 0
    assert "missing" in log and re.search(r"vision_tower\.embeddings\.cls_token", log), log[-3000:]
    assert "is this a internvl checkpoint" in log and not out.exists()
