"""Preference rows: the guide's format and the other accepted shapes, validation (hand-written
and fuzzed malformed rows), encoding through the family template, and pair packing."""
from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from mvlm.data import preference as P
from mvlm.data.collate import shift_labels
from mvlm.data.errors import BadSampleCounter, BadSampleError
from mvlm.data.template import TemplateConfig, get_template


def _u(c):
    return {"role": "user", "content": c}


def _a(c):
    return {"role": "assistant", "content": c}


GUIDE_ROW = {  # the guide's §5.6 example, image path made local
    "images": ["a.png"],
    "messages": [_u("<image>Describe this image.")],
    "chosen": _a("A beautiful sunset over the ocean."),
    "rejected": _a("I don't know what this is."),
}


@pytest.fixture(scope="module")
def setup(tiny_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("pref")
    Image.fromarray(np.full((30, 40, 3), 128, np.uint8)).save(d / "a.png")
    Image.fromarray(np.full((28, 56, 3), 60, np.uint8)).save(d / "b.png")
    ckpt = tiny_ckpt("qwen2_vl")
    tpl = get_template(ckpt, cfg=TemplateConfig(max_length=160, truncation_strategy="error"))
    return d, tpl


def _sft(tpl, d, messages, images=("a.png",)):
    return tpl.encode({"messages": messages, "images": list(images)}, str(d))


def test_guide_row_encodes_as_two_sft_conversations_sharing_pixels(setup):
    d, tpl = setup
    enc = P.encode_pair(tpl, GUIDE_ROW, str(d))
    c = _sft(tpl, d, GUIDE_ROW["messages"] + [GUIDE_ROW["chosen"]])
    r = _sft(tpl, d, GUIDE_ROW["messages"] + [GUIDE_ROW["rejected"]])
    for k in ("input_ids", "labels", "position_ids"):
        assert torch.equal(enc[k], c[k]), k
        assert torch.equal(enc[f"rejected_{k}"], r[k]), k
    assert enc["rejected_length"] == r["length"]
    assert enc["length"] == c["length"] + r["length"]  # a pair's length: both sequences
    assert torch.equal(enc["pixel_values"], c["pixel_values"])  # stored once per pair
    assert torch.equal(enc["image_grid_thw"], c["image_grid_thw"])
    # the answer is what carries labels: the chosen answer's tokens + <|im_end|>
    trained = tpl.tokenizer.decode(enc["labels"][enc["labels"] != -100])
    assert trained == "A beautiful sunset over the ocean.<|im_end|>"


SAME_PAIR_SHAPES = [
    GUIDE_ROW,
    {**GUIDE_ROW, "chosen": GUIDE_ROW["chosen"]["content"],
     "rejected": GUIDE_ROW["rejected"]["content"]},  # answers as strings
    {**GUIDE_ROW, "chosen": [GUIDE_ROW["chosen"]], "rejected": [GUIDE_ROW["rejected"]]},
    {"images": ["a.png"], "chosen": {"content": "A beautiful sunset over the ocean."},
     "messages": GUIDE_ROW["messages"], "rejected": GUIDE_ROW["rejected"]},  # role omitted
    {"images": ["a.png"], "messages": GUIDE_ROW["messages"] + [GUIDE_ROW["chosen"]],
     "rejected_response": "I don't know what this is."},  # ms-swift's rejected_response
    {"images": "a.png", "query": "<image>Describe this image.",
     "response": "A beautiful sunset over the ocean.",
     "rejected_response": "I don't know what this is."},
    {"images": ["a.png"], "prompt": "<image>Describe this image.",
     "chosen": "A beautiful sunset over the ocean.", "rejected": "I don't know what this is."},
    {"images": ["a.png"],  # TRL's implicit prompt
     "chosen": GUIDE_ROW["messages"] + [GUIDE_ROW["chosen"]],
     "rejected": GUIDE_ROW["messages"] + [GUIDE_ROW["rejected"]]},
    {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                               {"type": "text", "text": "Describe this image."}]}],
     "chosen": GUIDE_ROW["chosen"], "rejected": GUIDE_ROW["rejected"]},  # OpenAI-style parts
]


@pytest.mark.parametrize("i", range(len(SAME_PAIR_SHAPES)))
def test_accepted_shapes_give_the_same_pair(i):
    pr = P.parse_preference_row(SAME_PAIR_SHAPES[i])
    assert pr.prompt == GUIDE_ROW["messages"]
    assert pr.chosen == [GUIDE_ROW["chosen"]] and pr.rejected == [GUIDE_ROW["rejected"]]
    assert pr.images == ["a.png"] and pr.label is None


def test_extra_columns_are_carried():
    pr = P.parse_preference_row({**GUIDE_ROW, "source": "web", "score": 3})
    assert pr.extra == {"source": "web", "score": 3}


def test_multi_turn_prompt_trains_only_the_final_answer(setup):
    d, tpl = setup
    prompt = [_u("<image>Hi"), _a("Hello, what can I do?"), _u("Name the colour.")]
    enc = P.encode_pair(tpl, {"images": ["a.png"], "messages": prompt, "chosen": "Grey.",
                              "rejected": "Blue."}, str(d))
    for key, ans in (("labels", "Grey."), ("rejected_labels", "Blue.")):
        lab = enc[key]
        assert tpl.tokenizer.decode(lab[lab != -100]) == ans + "<|im_end|>"
    sft = _sft(tpl, d, prompt + [_a("Grey.")])
    assert torch.equal(sft["input_ids"], enc["input_ids"])
    n_sft = int((sft["labels"] != -100).sum())  # SFT trains both assistant turns
    assert n_sft > int((enc["labels"] != -100).sum())


def test_multi_message_answer_keeps_all_its_assistant_turns(setup):
    d, tpl = setup
    chosen = [_a("Let me look."), {"role": "tool", "content": "grey"}, _a("Grey.")]
    enc = P.encode_pair(tpl, {"images": ["a.png"], "messages": [_u("<image>Colour?")],
                              "chosen": chosen, "rejected": "Blue."}, str(d))
    assert tpl.tokenizer.decode(enc["labels"][enc["labels"] != -100]) == \
        "Let me look.<|im_end|>Grey.<|im_end|>"


def _image_tokens(tpl, ids):
    return int((ids == tpl.image_token_id).sum())


@pytest.mark.parametrize("cp_size", [1, 2])
def test_collate_pairs_packs_pairs_into_one_row(setup, cp_size):
    d, tpl = setup
    rows = [GUIDE_ROW, {"images": ["b.png"], "messages": [_u("<image>Shape?")],
                        "chosen": "A rectangle.", "rejected": "A circle, surely."},
            {"messages": [_u("2+2?")], "chosen": "4", "rejected": "5"}]
    encs = P.encode_preference_rows(tpl, rows, str(d))
    assert all(isinstance(e, dict) for e in encs)
    items = [encs[0], [encs[1], encs[2]]]  # a plain pair, and a packed row of two pairs
    b = P.collate_pairs(items, tpl.pad_token_id, pad_to_multiple_of=2 * cp_size,
                        cp_size=cp_size)
    assert b["num_pairs"] == 3 and b["num_rows"] == 2 and b["num_samples"] == 6
    assert b["chosen_index"].tolist() == [0, 2, 4] and b["rejected_index"].tolist() == [1, 3, 5]
    cu = b["cu_seqlens"].tolist()
    seqs = [s for e in encs for s in P.pair_sequences(e)]
    assert len(cu) == 7
    for k, s in enumerate(seqs):
        a, e = cu[k], cu[k + 1]
        n = len(s["input_ids"])
        assert e - a == (-(-n // (2 * cp_size)) * 2 * cp_size if cp_size > 1 else n)
        assert torch.equal(b["input_ids"][0, a:a + n], s["input_ids"])
        assert torch.equal(b["labels"][0, a:a + n], shift_labels(s["labels"]))
        assert torch.equal(b["position_ids"][:, 0, a:a + n], s["position_ids"])
    assert sum(P.pair_length(e, cp_size) for e in encs) == cu[-1]
    # every image placeholder of the row has its features: the rejected segments list the
    # pair's pixels again (same tensors), in segment order
    grid = b["image_grid_thw"]
    assert _image_tokens(tpl, b["input_ids"]) == int((grid.prod(-1) // tpl.merge ** 2).sum())
    assert grid.tolist() == [encs[0]["image_grid_thw"][0].tolist()] * 2 + \
        [encs[1]["image_grid_thw"][0].tolist()] * 2
    assert b["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    assert "kto_label" not in b


def test_sequence_sums_over_segments():
    cu = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    x = torch.arange(10, dtype=torch.float32).reshape(1, 10)  # the tail pad is no segment
    assert P.sequence_sums(x, cu).tolist() == [0 + 1 + 2, 3 + 4, 5 + 6 + 7 + 8]


def test_kto_rows_label_and_kl_answer(setup):
    d, tpl = setup
    rows = [{"messages": [_u("<image>Colour?"), _a("Grey.")], "images": ["a.png"],
             "label": True},
            {"prompt": "2+2?", "completion": "5", "label": False},
            {"messages": [_u("Capital of France?"), _a("Paris.")], "label": 1}]
    prs = [P.parse_preference_row(r, "kto") for r in rows]
    assert [p.label for p in prs] == [True, False, True]
    assert [p.chosen[0]["content"] for p in prs] == ["Grey.", "5", "Paris."]
    encs = P.encode_preference_rows(tpl, rows, str(d), kind="kto")
    dec = tpl.tokenizer.decode
    for i, e in enumerate(encs):
        own, kl = e["labels"], e["rejected_labels"]  # KTO's KL sequence: the rejected slot
        assert dec(own[own != -100]) == prs[i].chosen[0]["content"] + "<|im_end|>"
        # KL sequence: this row's prompt, the previous row's answer (cyclic, as TRL's collator)
        assert dec(kl[kl != -100]) == prs[i - 1].chosen[0]["content"] + "<|im_end|>"
        assert _image_tokens(tpl, e["input_ids"]) == _image_tokens(tpl, e["rejected_input_ids"])
        assert e["extra"]["label"] == prs[i].label
    b = P.collate_pairs(encs, tpl.pad_token_id)
    assert b["kto_label"].tolist() == [True, False, True] and b["num_pairs"] == 3
    # a lone row's KL sequence is its own conversation (TRL's shift of a one-row batch)
    one = P.encode_preference_rows(tpl, rows[:1], str(d), kind="kto")[0]
    assert torch.equal(one["rejected_input_ids"], one["input_ids"])
    # the dataset layer tells the kinds apart by the rows: any KTO row makes a batch KTO
    assert P.row_kind(rows) == P.KTO and P.row_kind([GUIDE_ROW]) == P.PAIR
    assert P.row_kind([GUIDE_ROW, rows[1]]) == P.KTO
    batch = [rows[1], GUIDE_ROW]
    mixed = P.encode_preference_rows(tpl, batch, str(d), kind=P.row_kind(batch))
    assert isinstance(mixed[1], BadSampleError) and mixed[1].reason == "paired_row_for_kto"
    pair = P.encode_preference_rows(tpl, [GUIDE_ROW], str(d))
    with pytest.raises(ValueError, match="mixes KTO rows"):
        P.collate_pairs([encs[0], pair[0]], tpl.pad_token_id)


HAND = [  # (row, kind, reason)
    ([1], P.PAIR, "bad_row"), ("text", P.PAIR, "bad_row"), ({}, P.PAIR, "unknown_format"),
    ({"messages": [_u("q")], "chosen": "a"}, P.PAIR, "no_rejected_response"),
    ({"messages": [_u("q"), _a("a")]}, P.PAIR, "no_rejected_response"),
    ({"messages": [_u("q")], "rejected": "b"}, P.PAIR, "no_chosen_answer"),
    ({"prompt": "q", "rejected": "b"}, P.PAIR, "no_chosen_answer"),
    ({"messages": [_u("q"), _a("a")], "chosen": "a", "rejected": "b"}, P.PAIR,
     "ambiguous_answer"),
    ({"messages": [_u("q")], "chosen": "a", "rejected": "b", "rejected_response": "c"}, P.PAIR,
     "ambiguous_answer"),
    ({"messages": [_u("q")], "chosen": 5, "rejected": "b"}, P.PAIR, "bad_answer"),
    ({"messages": [_u("q")], "chosen": [], "rejected": "b"}, P.PAIR, "bad_answer"),
    ({"messages": [_u("q")], "chosen": {"role": "assistant"}, "rejected": "b"}, P.PAIR,
     "bad_answer"),
    ({"messages": [_u("q")], "chosen": _u("a"), "rejected": "b"}, P.PAIR, "bad_answer"),
    ({"messages": [_u("q")], "chosen": [_a("a"), _u("more")], "rejected": "b"}, P.PAIR,
     "bad_answer"),
    ({"messages": [_u("q")], "chosen": {"role": "robot", "content": "a"}, "rejected": "b"},
     P.PAIR, "unknown_role"),
    ({"messages": [_u("q")], "chosen": "a <image>", "rejected": "b", "images": ["a.png"]},
     P.PAIR, "media_in_answer"),
    ({"messages": [_u("<image>q")], "chosen": "a", "rejected": "b"}, P.PAIR,
     "media_count_mismatch"),
    ({"messages": [_u("<image>q")], "chosen": "a", "rejected": "b",
      "images": ["a.png", "a.png"]}, P.PAIR, "media_count_mismatch"),
    ({"messages": [_u("<image>q")], "chosen": "a", "rejected": "b", "images": ["a.png"],
      "rejected_images": ["b.png"]}, P.PAIR, "unsupported_rejected_images"),
    ({"messages": [_u("q")], "chosen": "same", "rejected": "same"}, P.PAIR, "identical_answers"),
    ({"messages": [{"role": "system", "content": "s"}], "chosen": "a", "rejected": "b"}, P.PAIR,
     "bad_prompt"),
    ({"chosen": [_a("a")], "rejected": [_a("b")]}, P.PAIR, "bad_prompt"),
    ({"messages": [_u("q"), _a("a")]}, P.KTO, "bad_label"),
    ({"messages": [_u("q"), _a("a")], "label": "yes"}, P.KTO, "bad_label"),
    ({"messages": [_u("q"), _a("a")], "label": 2}, P.KTO, "bad_label"),
    ({"messages": [_u("q")], "label": True}, P.KTO, "no_chosen_answer"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "label": True}, P.KTO,
     "paired_row_for_kto"),
    ({"completion": "a", "label": True}, P.KTO, "bad_prompt"),
]


@pytest.mark.parametrize("row,kind,reason", HAND)
def test_malformed_rows_name_their_reason(row, kind, reason):
    with pytest.raises(BadSampleError) as e:
        P.parse_preference_row(row, kind)
    assert e.value.reason == reason, (row, e.value)
    assert "--on_bad_sample skip" in str(e.value)


def _mutate(row, rng):
    row = copy.deepcopy(row)
    junk = [None, 0, -1, 3.5, True, "", "<image>", "<video>", [], {}, [None], {"x": 1},
            "x" * 500, ["missing.png"], [{"role": "user"}], [_a("a")], _u("u"), _a("<image>"),
            "<|im_start|>", "\ud800", [_u("q"), _a("a")], {"role": "assistant", "content": 3}]
    keys = ["messages", "chosen", "rejected", "rejected_response", "prompt", "images", "label",
            "completion", "query", "rejected_images"]
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(["set", "drop", "msg"])
        if op == "set":
            row[rng.choice(keys)] = rng.choice(junk)
        elif op == "drop" and row:
            row.pop(rng.choice(sorted(row)))
        elif isinstance(row.get("messages"), list) and row["messages"]:
            i = rng.randrange(len(row["messages"]))
            row["messages"][i] = rng.choice(junk)
    return row


def test_fuzzed_rows_give_a_reason_or_a_valid_pair(setup):
    """300 random mutations of valid rows: parsing and encoding either succeed or raise a
    BadSampleError with a reason -- never another exception, never internal_error."""
    d, tpl = setup
    rng = random.Random(0)
    bases = SAME_PAIR_SHAPES + [{"messages": [_u("q"), _a("a")], "label": True}]
    corpus = [_mutate(rng.choice(bases), rng) for _ in range(300)]
    reasons, ok = {}, 0
    for kind in (P.PAIR, P.KTO):
        for row in corpus:
            try:
                P.parse_preference_row(row, kind)
            except BadSampleError as e:
                reasons[e.reason] = reasons.get(e.reason, 0) + 1
    encs = P.encode_preference_rows(tpl, corpus, str(d))
    for row, e in zip(corpus, encs):
        if isinstance(e, BadSampleError):
            assert e.reason != "internal_error", (row, e)
        else:
            assert isinstance(e, dict) and len(e["input_ids"]) == len(e["labels"])
            assert (e["labels"] != -100).any() and (e["rejected_labels"] != -100).any()
            ok += 1
    assert ok >= 20 and len(reasons) >= 10, (ok, reasons)


def test_file_errors_are_located_and_skips_counted(setup, tmp_path):
    d, tpl = setup
    (tmp_path / "a.png").write_bytes((d / "a.png").read_bytes())
    lines = [json.dumps(GUIDE_ROW), json.dumps({"messages": [_u("q")], "chosen": "a"}),
             "{not json", "", json.dumps(GUIDE_ROW | {"images": ["missing.png"]}),
             json.dumps(SAME_PAIR_SHAPES[4])]
    f = tmp_path / "pref.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadSampleError, match=r"pref\.jsonl, line 2\): no_rejected_response: "
                       r"the row has no rejected answer"):
        P.read_preference_file(str(f), tpl, "error")
    counter = BadSampleCounter("skip")
    out = P.read_preference_file(str(f), tpl, counter)
    assert len(out) == 2
    assert counter.counts == {"no_rejected_response": 1, "bad_json": 1, "missing_media": 1}
    assert "pref.jsonl, line 5: missing_media" in counter.examples["missing_media"]


def test_pair_media_tower_once_equals_both_copies(setup):
    """Packed pairs list each pair's images for both segments; pair_media's dedup runs a
    tower on one copy and repeats its features into the placeholder order -- equal to the
    tower on the duplicated media, rows and gradients (a merge-by-4 stand-in tower)."""
    from types import SimpleNamespace

    from mvlm.train.objectives.pair_media import dedup_media

    d, tpl = setup
    rows = [dict(GUIDE_ROW), {"messages": [_u("2+2?")], "chosen": "4", "rejected": "5"},
            {"images": ["a.png", "a.png"], "messages": [_u("<image><image>Same?")],
             "chosen": "Yes.", "rejected": "No."}]
    encs = P.encode_preference_rows(tpl, rows, str(d))
    b = P.collate_pairs(encs, tpl.pad_token_id)
    info = b["pair_media"]["pixel_values"]
    assert info["items"] == [1, 0, 2]
    assert info["rows"] == [int(e["pixel_values"].shape[0]) if "pixel_values" in e else 0
                            for e in encs]
    w = torch.randn(b["pixel_values"].shape[1], 8, dtype=torch.float64, requires_grad=True)

    def tower(px):  # 4 patch rows -> 1 feature row, items independent (Qwen-VL's merger)
        return (px.double() @ w).reshape(-1, 4, 8).sum(1).tanh()

    kind = SimpleNamespace(name="image", features_key="pixel_values",
                           grid_key="image_grid_thw", extra_keys=())
    px = b["pixel_values"].double()
    want = tower(px)
    unique, expand = dedup_media(b | {"pixel_values": px}, [kind])
    assert unique["pixel_values"].shape[0] * 2 == px.shape[0]
    assert unique["image_grid_thw"].tolist() == [g.tolist() for e in encs
                                                 for g in e.get("image_grid_thw", [])]
    got = expand["image"](tower(unique["pixel_values"]))
    assert torch.equal(got, want)
    g = torch.randn_like(want)
    (gw,) = torch.autograd.grad((want * g).sum(), w)
    (gg,) = torch.autograd.grad((got * g).sum(), w)
    assert torch.allclose(gw, gg, rtol=1e-12, atol=1e-12)


def test_pair_sequences_carry_every_registered_media_key():
    """Both sequences of a pair list the pair's media, whatever the family's keys (audio
    features and masks of Qwen2.5-Omni, LLaVA-NeXT's image sizes...): read off the registry, so
    a family added later cannot silently lose its media in preference training."""
    from mvlm.data.preference import pair_sequences
    from mvlm.models.registry import families

    keys = {k for f in families() for k in f.batch_keys}
    assert {"input_features", "feature_attention_mask", "image_sizes", "pixel_values"} <= keys
    enc = {"input_ids": [1, 2], "labels": [-100, 2], "position_ids": None,
           "rejected_input_ids": [1, 3], "rejected_labels": [-100, 3], "length": 4}
    enc |= {k: object() for k in keys}
    for seq in pair_sequences(enc):
        assert all(seq[k] is enc[k] for k in keys), sorted(keys - set(seq))
