"""Text families, pretraining/RL rendering, and truncation that never cuts an image."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from mvlm.data.errors import BadSampleError
from mvlm.data.template import SkipSample, TemplateConfig, get_template
from mvlm.testing.tiny_models import build_tiny_checkpoint

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("tpl")
    return {f: build_tiny_checkpoint(f, d / f) for f in ("qwen2", "qwen3_moe", "qwen2_vl")}


@pytest.mark.parametrize("family", ["qwen2", "qwen3_moe"])
@pytest.mark.parametrize("conv", [CONV, CONV[1:3]])
def test_text_family_equals_hf_chat_template(ckpts, family, conv):
    tok = AutoTokenizer.from_pretrained(ckpts[family])
    tpl = get_template(ckpts[family])
    ref = tok.apply_chat_template(conv, tokenize=True)
    ref = ref["input_ids"] if hasattr(ref, "keys") else ref
    got = tpl.encode({"messages": conv})
    assert got["input_ids"].tolist() == list(ref)
    assert got["position_ids"].shape == (3, len(ref))
    trained = got["labels"][got["labels"] != -100].tolist()
    want = tok("".join(m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant"),
               add_special_tokens=False)["input_ids"]
    assert trained == want


def test_pretrain_and_rl_rendering(ckpts):
    tok = AutoTokenizer.from_pretrained(ckpts["qwen2"])
    pt = get_template(ckpts["qwen2"], cfg=TemplateConfig(task="pt"))
    out = pt.encode({"text": "The quick brown fox."})
    assert tok.decode(out["input_ids"]) == "The quick brown fox.<|im_end|>"
    assert (out["labels"] == out["input_ids"]).all()  # loss on everything
    rl = get_template(ckpts["qwen2"], cfg=TemplateConfig(task="rl"))
    out = rl.encode({"messages": [{"role": "user", "content": "2+2?"}], "solution": "4"})
    ref = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=True,
                                  add_generation_prompt=True)
    ref = ref["input_ids"] if hasattr(ref, "keys") else ref
    assert out["input_ids"].tolist() == list(ref) and (out["labels"] == -100).all()
    assert out["extra"] == {"solution": "4"}


def _vl_row():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (112, 112, 3), np.uint8))
    return {"messages": [{"role": "user", "content": "word " * 30 + "<image>" + " tail" * 30},
                         {"role": "assistant", "content": "answer " * 20}], "images": [img]}


@pytest.mark.parametrize("strategy", ["left", "right"])
def test_truncation_never_cuts_an_image(ckpts, strategy):
    full = get_template(ckpts["qwen2_vl"]).encode(_vl_row())
    n = len(full["input_ids"])
    img_id = get_template(ckpts["qwen2_vl"]).image_token_id
    pads = torch.nonzero(full["input_ids"] == img_id).flatten()
    # cut points inside the image block, just around it, and far from it
    for cut_len in range(n - 10, 10, -7):
        tpl = get_template(ckpts["qwen2_vl"], cfg=TemplateConfig(
            max_length=cut_len, truncation_strategy=strategy))
        try:
            out = tpl.encode(_vl_row())
        except BadSampleError as e:
            assert e.reason in ("too_long", "no_trainable_tokens")
            continue
        ids = out["input_ids"]
        assert len(ids) <= cut_len
        n_pad = int((ids == img_id).sum())
        assert n_pad in (0, len(pads))  # whole image or none
        if n_pad:
            assert out["pixel_values"].shape[0] == int(out["image_grid_thw"].prod())
        else:
            assert "pixel_values" not in out and "image_grid_thw" not in out
        assert out["position_ids"].shape[1] == len(ids)


def test_truncation_delete_and_error(ckpts):
    for strat, exc in (("delete", SkipSample), ("error", BadSampleError)):
        tpl = get_template(ckpts["qwen2"], cfg=TemplateConfig(max_length=8,
                                                               truncation_strategy=strat))
        with pytest.raises(exc, match="too_long"):
            tpl.encode({"messages": CONV})


def test_preference_rows_encode_both_conversations(ckpts):
    tpl = get_template(ckpts["qwen2_vl"], cfg=TemplateConfig(task="preference"))
    img = _vl_row()["images"][0]
    row = {"messages": [{"role": "user", "content": "<image>Which?"},
                        {"role": "assistant", "content": "The left one."}],
           "rejected_response": "No idea.", "images": [img]}
    out = tpl.encode(row)
    chosen = get_template(ckpts["qwen2_vl"]).encode(
        {"messages": row["messages"], "images": [img]})
    rejected = get_template(ckpts["qwen2_vl"]).encode(
        {"messages": [row["messages"][0], {"role": "assistant", "content": "No idea."}],
         "images": [img]})
    assert torch.equal(out["input_ids"], chosen["input_ids"])
    assert torch.equal(out["rejected_input_ids"], rejected["input_ids"])
    assert torch.equal(out["rejected_labels"], rejected["labels"])
    assert torch.equal(out["rejected_position_ids"], rejected["position_ids"])
    assert torch.equal(out["pixel_values"], chosen["pixel_values"])


def test_preference_storage_and_collate(ckpts, tmp_path):
    import json

    from mvlm.data.collate import Collator
    from mvlm.data.dataset import EncodedDataset, encode_all
    from mvlm.data.dataset_spec import load_datasets
    from mvlm.data.errors import BadSampleCounter

    rows = [{"messages": [{"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": "good" * (i + 1)}],
             "rejected_response": "bad"} for i in range(3)]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tpl = get_template(ckpts["qwen2"], cfg=TemplateConfig(task="preference"))
    ds = EncodedDataset(encode_all(load_datasets([str(tmp_path / "p.jsonl")])[0], tpl,
                                   BadSampleCounter()), tpl)
    direct = tpl.encode(rows[1])
    assert torch.equal(ds[1]["rejected_input_ids"], direct["rejected_input_ids"])
    # a micro-batch of pairs is ONE packed row: [c0, r0, c1, r1] segments (mvlm.data.preference)
    b = Collator(tpl.pad_token_id)([ds[0], ds[1]])
    assert b["input_ids"].shape[0] == 1 and b["num_samples"] == 4 and b["num_pairs"] == 2
    assert b["chosen_index"].tolist() == [0, 2] and b["rejected_index"].tolist() == [1, 3]
    s, e = b["cu_seqlens"][3].item(), b["cu_seqlens"][4].item()
    assert torch.equal(b["input_ids"][0, s:e], direct["rejected_input_ids"])
