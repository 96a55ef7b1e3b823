"""ms-swift's --add_non_thinking_prefix and --loss_scale ignore_empty_think (issue 9).

ms-swift 4 (swift/template/base.py ``_add_non_thinking_prefix``, loss_scale
``ignore_empty_think``): under loss_scale default every assistant turn that opens with neither
``<think>`` nor the family's empty think block gets that block prepended; ignore_empty_think gives
no loss to an empty think block (or a lone ``</think>``) at the start of a response, the rest of
the response (and its ``<|im_end|>``) keeps loss 1. Checked here on the tiny Qwen3 (MoE)
checkpoint, whose family is hybrid thinking, with both renderers and through packing.
"""
import argparse

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from mvlm.config import EncodeConfig
from mvlm.data.collate import collate_packed, shift_labels
from mvlm.data.encode import add_encode_args, build_train_dataset, template_config
from mvlm.data.template import TemplateConfig, get_template
from mvlm.models.qwen3_moe.template import Qwen3MoeTemplate
from mvlm.testing.tiny_models import build_tiny_checkpoint

PRE = "<think>\n\n</think>\n\n"
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("think")
    return {f: build_tiny_checkpoint(f, d / f) for f in ("qwen2", "qwen3_moe")}


def _tpl(ckpts, backend="native", **kw):
    return get_template(ckpts["qwen3_moe"], cfg=TemplateConfig(template_backend=backend, **kw))


def _runs(labels: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of labelled tokens (one run per assistant turn here)."""
    on = np.concatenate([[False], labels != -100, [False]]).astype(int)
    d = np.diff(on)
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def test_prefix_added_exactly_when_missing():
    assert Qwen3MoeTemplate.non_thinking_prefix == PRE  # ms-swift's qwen3 template
    conv = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "plain"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "<think>\nstep</think>\n\nA"},
            {"role": "user", "content": "q3"},
            {"role": "assistant", "content": PRE + "B"},
            {"role": "user", "content": "<think>not an answer"},
            {"role": "assistant", "content": " <think>x</think>C"}]
    got = Qwen3MoeTemplate.add_think_prefix(Qwen3MoeTemplate, conv)
    want = [PRE + "plain", "<think>\nstep</think>\n\nA", PRE + "B", PRE + " <think>x</think>C"]
    assert [m["content"] for m in got if m["role"] == "assistant"] == want
    assert [m for m in got if m["role"] == "user"] == [m for m in conv if m["role"] == "user"]
    assert conv[1]["content"] == "plain"  # the caller's messages are not modified


@pytest.mark.parametrize("backend", ["native", "jinja"])
def test_prefixed_ids_equal_direct_render(ckpts, backend):
    """Flag on == the prefixed text written into the data (ids and labels, every turn)."""
    on = _tpl(ckpts, backend, add_non_thinking_prefix=True).encode({"messages": CONV})
    direct = [{**m, "content": PRE + m["content"]} if m["role"] == "assistant" else m
              for m in CONV]
    ref = _tpl(ckpts, backend).encode({"messages": direct})
    assert on["input_ids"].tolist() == ref["input_ids"].tolist()
    assert on["labels"].tolist() == ref["labels"].tolist()
    tok = AutoTokenizer.from_pretrained(ckpts["qwen3_moe"])
    hf = tok.apply_chat_template(direct, tokenize=True)
    hf = hf["input_ids"] if hasattr(hf, "keys") else hf
    assert on["input_ids"].tolist() == list(hf)


@pytest.mark.parametrize("backend", ["native", "jinja"])
def test_empty_think_has_no_loss_rest_keeps_it(ckpts, backend):
    """Loss-free: exactly the tokens that start inside an empty think block; every other token
    keeps the label it had without the flag (the tiny tokenizer has no special <think>, so a
    token may straddle the block's start: the rule is the token's first character)."""
    tpl = _tpl(ckpts, backend, add_non_thinking_prefix=True)
    tok = tpl.tokenizer
    base = tpl.encode({"messages": CONV})
    got = _tpl(ckpts, backend, add_non_thinking_prefix=True,
               ignore_empty_think=True).encode({"messages": CONV})
    assert got["input_ids"].tolist() == base["input_ids"].tolist()
    text, spans = tpl.render(CONV)
    assert [text[s:e] for s, e in spans] == [PRE + "Hello.<|im_end|>", PRE + "4<|im_end|>"]
    starts = np.asarray([o[0] for o in tok(text, add_special_tokens=False,
                                           return_offsets_mapping=True)["offset_mapping"]])
    in_think = np.zeros(len(starts), dtype=bool)
    for s, _ in spans:
        in_think |= (starts >= s) & (starts < s + len(PRE))
    lab0, lab = base["labels"].numpy(), got["labels"].numpy()
    assert in_think.sum() >= 2 * 4 and (lab0[in_think] != -100).all()  # trained without flag
    assert (lab[in_think] == -100).all()
    assert lab[~in_think].tolist() == lab0[~in_think].tolist()
    ids = got["input_ids"].numpy()
    runs = _runs(lab)
    assert len(runs) == 2  # both turns trained (loss_scale default: every turn)
    for (s, e), content in zip(runs, ("Hello.", "4")):
        assert tok.decode(ids[s:e]) == content + "<|im_end|>"
        assert (lab[s:e] == ids[s:e]).all()


def test_lone_close_tag_and_nonempty_think(ckpts):
    """ms-swift's ``^</think>\\s*`` pattern too; a think block with content keeps its loss."""
    tok = AutoTokenizer.from_pretrained(ckpts["qwen3_moe"])
    conv = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "<think>\nabc\n</think>\n\nX"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "</think>\n\nY"}]
    off = _tpl(ckpts).encode({"messages": conv})
    on = _tpl(ckpts, ignore_empty_think=True).encode({"messages": conv})
    (s0, e0), (s1, e1) = _runs(off["labels"].numpy())
    lab = on["labels"].numpy()
    assert lab[s0:e0].tolist() == off["labels"].numpy()[s0:e0].tolist()
    ids = on["input_ids"].numpy()
    (t0, u0), (t1, u1) = _runs(lab)
    assert (t0, u0) == (s0, e0) and u1 == e1 and t1 > s1
    assert tok.decode(ids[s1:t1]) == "</think>\n\n"  # no loss on the lone close tag
    assert (lab[s1:t1] == -100).all()
    assert tok.decode(ids[t1:e1]) == "Y<|im_end|>"
    assert (lab[t1:e1] == ids[t1:e1]).all()


@pytest.mark.parametrize("backend", ["native", "jinja"])
def test_flags_off_nothing_changes(ckpts, backend):
    """Flags off: the HF chat template's ids, loss on exactly the assistant turns (as before);
    ignore_empty_think on data without empty think blocks changes nothing either."""
    tok = AutoTokenizer.from_pretrained(ckpts["qwen3_moe"])
    ref = tok.apply_chat_template(CONV, tokenize=True)
    ref = ref["input_ids"] if hasattr(ref, "keys") else ref
    for kw in ({}, {"ignore_empty_think": True}):
        got = _tpl(ckpts, backend, **kw).encode({"messages": CONV})
        assert got["input_ids"].tolist() == list(ref)
        trained = got["labels"][got["labels"] != -100].tolist()
        assert trained == tok("Hello.<|im_end|>4<|im_end|>", add_special_tokens=False)[
            "input_ids"]


def test_bad_combinations_are_refused(ckpts):
    with pytest.raises(ValueError, match="--add_non_thinking_prefix true: the qwen2 family has "
                                         "no thinking mode"):
        get_template(ckpts["qwen2"], cfg=TemplateConfig(add_non_thinking_prefix=True))
    for kw, flag in (({"add_non_thinking_prefix": True}, "--add_non_thinking_prefix true"),
                     ({"ignore_empty_think": True}, "--loss_scale ignore_empty_think")):
        for task in ("pt", "rl"):
            with pytest.raises(ValueError, match=f"{flag} acts on chat-rendered"):
                TemplateConfig(task=task, **kw)


def test_through_packing(ckpts, tmp_path):
    """The flags reach the dataset builder (args -> TemplateConfig); packed rows carry the same
    labels as samples encoded one by one."""
    import json

    rows = [{"messages": CONV}, {"messages": CONV[1:3]},
            {"messages": [{"role": "user", "content": "x"},
                          {"role": "assistant", "content": "<think>\nr\n</think>\n\nZ"}]}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = argparse.ArgumentParser()
    add_encode_args(p)
    args = EncodeConfig.from_flags(vars(p.parse_args([
        "--model", str(ckpts["qwen3_moe"]), "--dataset", str(tmp_path / "d.jsonl"),
        "--output_dir", str(tmp_path / "o"), "--max_length", "512", "--packing", "true",
        "--dataset_shuffle", "false"])))
    args.add_non_thinking_prefix, args.ignore_empty_think = True, True
    data = build_train_dataset(args, str(ckpts["qwen3_moe"]))
    tpl = _tpl(ckpts, add_non_thinking_prefix=True, ignore_empty_think=True)
    single = {tuple(e["input_ids"].tolist()): e["labels"]
              for e in (tpl.encode(r) for r in rows)}
    seen = 0
    for i in range(len(data.train)):
        pack = data.train[i]
        batch = collate_packed(pack, data.pad_token_id)
        want = torch.cat([shift_labels(single[tuple(s["input_ids"].tolist())]) for s in pack])
        assert torch.equal(batch["labels"][0, :len(want)], want)
        seen += len(pack)
    assert seen == len(rows)


def test_train_flags(tmp_path):
    """mvlm sft: the ms-swift spellings parse; refusals name the flag and the fix."""
    from mvlm.train.args import parse_train_args

    (tmp_path / "m").mkdir()
    (tmp_path / "d.jsonl").write_text("{}\n")
    base = ["--model", str(tmp_path / "m"), "--output_dir", str(tmp_path / "o")]
    data = ["--dataset", str(tmp_path / "d.jsonl")]
    ns = parse_train_args(base + data + ["--add_non_thinking_prefix", "true", "--loss_scale",
                                         "ignore_empty_think"], "sft").data
    assert ns.add_non_thinking_prefix is True and ns.ignore_empty_think is True
    assert ns.task == "sft"
    tc = template_config(ns)
    assert tc.add_non_thinking_prefix is True and tc.ignore_empty_think is True
    off = parse_train_args(base + data, "sft").data
    tc = template_config(off)
    assert tc.add_non_thinking_prefix is False and tc.ignore_empty_think is False
    with pytest.raises(ValueError, match="--add_non_thinking_prefix: true acts on chat-rendered"):
        parse_train_args(base + data + ["--add_non_thinking_prefix", "true", "--loss_scale",
                                        "all"], "sft")
    cache = ["--cached_dataset", str(tmp_path)]
    for extra, flag in ((["--add_non_thinking_prefix", "true"], "--add_non_thinking_prefix"),
                        (["--loss_scale", "ignore_empty_think"], "--loss_scale")):
        with pytest.raises(ValueError, match=f"{flag}: .*--cached_dataset was encoded without"):
            parse_train_args(base + cache + extra, "sft")
