"""Malformed rows: every row yields a valid encoding or a BadSampleError with a reason.

A fuzz corpus (hand-written malformed rows + seeded random mutations of valid rows) goes through
Template.encode; nothing but BadSampleError may escape, and "internal_error" (an unexpected
exception converted at the boundary) counts as a failure of this test. Then the same corpus goes
through `mvlm encode` with --on_bad_sample error (stops naming file, row and reason) and skip
(counts by reason).
"""
import argparse
import base64
import copy
import io
import json
import random

import numpy as np
import pytest
from PIL import Image

from mvlm.config import EncodeConfig
from mvlm.data.encode import add_encode_args, run_encode
from mvlm.data.errors import BadSampleError
from mvlm.data.formats import parse_row
from mvlm.data.template import TemplateConfig, get_template
from mvlm.testing.tiny_models import build_tiny_checkpoint


def _png_bytes(w=40, h=30):
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    ckpt = build_tiny_checkpoint("qwen2_vl", d / "ckpt")
    (d / "ok.png").write_bytes(_png_bytes())
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    (d / "thin.png").write_bytes(_png_bytes(1, 400))
    tpl = get_template(ckpt, cfg=TemplateConfig(max_length=200, truncation_strategy="error"))
    return d, ckpt, tpl


def _valid():
    return {"messages": [{"role": "system", "content": "Be nice."},
                         {"role": "user", "content": "<image>What is it?"},
                         {"role": "assistant", "content": "A gray square."}],
            "images": ["ok.png"]}


def _u(c):
    return {"role": "user", "content": c}


def _a(c):
    return {"role": "assistant", "content": c}


HAND = [
    ([1, 2], "bad_row"), ("just text", "bad_row"), ({}, "unknown_format"),
    ({"messages": []}, "bad_messages"), ({"messages": "hi"}, "bad_messages"),
    ({"messages": [1]}, "bad_messages"),
    ({"messages": [{"role": "robot", "content": "x"}, _a("y")]}, "unknown_role"),
    ({"messages": [_u("x"), {"role": "system", "content": "s"}, _a("y")]}, "misplaced_system"),
    ({"messages": [_u(5), _a("y")]}, "bad_content"),
    ({"messages": [_u([{"type": "weird"}]), _a("y")]}, "bad_content"),
    ({"messages": [_u("hi")]}, "no_assistant_turn"),
    ({"messages": [_u("hi"), _a("a"), _u("more?")]}, "last_turn_not_assistant"),
    ({"messages": [_u("<image><image>x"), _a("y")], "images": ["ok.png"]},
     "media_count_mismatch"),
    ({"messages": [_u("x"), _a("y")], "images": ["ok.png"]}, "media_count_mismatch"),
    ({"messages": [_u("<image>x"), _a("y")], "images": ["missing.png"]}, "missing_media"),
    ({"messages": [_u("<image>x"), _a("y")], "images": ["corrupt.png"]}, "corrupt_media"),
    ({"messages": [_u("<image>x"), _a("y")], "images": ["data:image/png;base64,@@@"]},
     "corrupt_media"),
    ({"messages": [_u("<image>x"), _a("y")], "images": [12]}, "missing_media"),
    ({"messages": [_u("<image>x"), _a("y")], "images": [{"bytes": b"nope"}]}, "corrupt_media"),
    ({"messages": [_u("<image>x"), _a("y")], "images": ["thin.png"]}, "bad_aspect_ratio"),
    ({"messages": [_u("<video>x"), _a("y")], "videos": ["missing.mp4"]}, "missing_media"),
    ({"messages": [_u("<audio>x"), _a("y")], "audios": ["a.wav"]}, "unsupported_media"),
    ({"messages": [_u("x <|image_pad|>"), _a("y")]}, "media_count_mismatch"),
    ({"messages": [_u("word " * 400), _a("y")]}, "too_long"),
    ({"query": "q", "history": [["only one"]], "response": "r"}, "bad_history"),
    ({"messages": [_u("<image>hi"), _a("x")],
      "images": ["data:image/png;base64," + base64.b64encode(_png_bytes()).decode()]}, None),
    ({"query": "<image>q", "response": "r", "images": "ok.png"}, None),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, None),
]


def _mutate(row, rng):
    row = copy.deepcopy(row)
    junk = [None, 0, -1, 3.5, "", "<image>", "<video>", [], {}, [None], {"x": 1}, b"\x00",
            "x" * 1000, ["missing.png"], [{"role": "user"}], "<|im_start|>", "\ud800"]
    for _ in range(rng.randint(1, 3)):
        target = rng.choice(["row", "msg", "content", "role", "images", "drop"])
        if target == "row":
            row[rng.choice(["messages", "images", "videos", "query", "extra"])] = rng.choice(junk)
        elif target in ("msg", "content", "role") and isinstance(row.get("messages"), list) \
                and row["messages"]:
            i = rng.randrange(len(row["messages"]))
            if target == "msg":
                row["messages"][i] = rng.choice(junk)
            elif isinstance(row["messages"][i], dict):
                key = "content" if target == "content" else "role"
                row["messages"][i][key] = rng.choice(junk + ["user", "assistant", "tool"])
        elif target == "images":
            row["images"] = rng.choice(junk + [["ok.png", "ok.png"], ["corrupt.png"]])
        elif target == "drop" and isinstance(row.get("messages"), list) and row["messages"]:
            row["messages"].pop(rng.randrange(len(row["messages"])))
    return row


def test_fuzz_only_bad_sample_errors_escape(setup):
    d, _, tpl = setup
    rng = random.Random(0)
    corpus = [(r, reason) for r, reason in HAND] + \
        [(_mutate(_valid(), rng), "?") for _ in range(300)]
    seen, ok = {}, 0
    for row, expected in corpus:
        try:
            out = tpl.encode(row, base_dir=str(d))
        except BadSampleError as e:
            assert e.reason != "internal_error", (row, e)
            assert expected in ("?", e.reason), (row, e.reason, expected)
            seen[e.reason] = seen.get(e.reason, 0) + 1
            continue
        assert expected in ("?", None), (row, expected)
        assert len(out["input_ids"]) == len(out["labels"]) == out["position_ids"].shape[1]
        assert len(out["input_ids"]) <= 200
        ok += 1
    assert ok >= 10 and len(seen) >= 12, (ok, seen)


def test_parse_row_preference_and_rl():
    s = parse_row({"messages": [_u("q"), _a("good")], "rejected_response": "bad"}, "preference")
    assert s.rejected_messages[-1]["content"] == "bad"
    s = parse_row({"prompt": "q", "chosen": "good", "rejected": "bad"}, "preference")
    assert s.messages[-1]["content"] == "good" and s.rejected_messages[-1]["content"] == "bad"
    with pytest.raises(BadSampleError, match="no_rejected_response"):
        parse_row({"messages": [_u("q"), _a("good")]}, "preference")
    s = parse_row({"messages": [_u("2+2?")], "solution": "4", "level": 3}, "rl")
    assert s.extra == {"solution": "4", "level": 3} and s.messages[-1]["role"] == "user"
    s = parse_row({"text": "plain text"}, "pt")
    assert s.messages == [{"role": "assistant", "content": "plain text"}]


def _run(d, ckpt, policy):
    p = argparse.ArgumentParser()
    add_encode_args(p)
    return run_encode(EncodeConfig.from_flags(vars(p.parse_args([
        "--model", str(ckpt), "--dataset", str(d / "mixed.jsonl"), "--output_dir",
        str(d / f"out_{policy}"), "--max_length", "200", "--truncation_strategy", "error",
        "--on_bad_sample", policy]))))


def test_encode_cli_error_and_skip(setup, capsys):
    d, ckpt, _ = setup
    lines = [json.dumps(_valid()), json.dumps(_valid()), "{not json",
             json.dumps({"messages": [_u("<image>x"), _a("y")], "images": ["missing.png"]}),
             json.dumps({"messages": [_u("hi")]}), json.dumps(_valid())]
    (d / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    assert _run(d, ckpt, "error") == 2
    err = capsys.readouterr().err
    assert "mixed.jsonl, line 3" in err and "bad_json" in err and "--on_bad_sample skip" in err
    assert _run(d, ckpt, "skip") == 0
    out = capsys.readouterr().out
    assert "skipped samples: 3 (bad_json=1, missing_media=1, no_assistant_turn=1)" in out
    stats = json.loads((d / "out_skip" / "stats.json").read_text())
    assert stats["samples"] == 3


def test_image_broken_after_encoding_is_handled_in_the_loader(setup, tmp_path):
    """Pixels are decoded in the loader: a file that breaks later is skipped or reported."""
    import datasets

    from mvlm.data.dataset import EncodedDataset, encode_all
    from mvlm.data.errors import BadSampleCounter
    from mvlm.data.textrows import load_datasets

    d, _, tpl = setup
    (tmp_path / "x.png").write_bytes(_png_bytes())
    (tmp_path / "y.png").write_bytes(_png_bytes(50, 20))
    rows = [{"messages": [_u("<image>q"), _a("a")], "images": [f]} for f in ("x.png", "y.png")]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    enc = encode_all(load_datasets([str(tmp_path / "d.jsonl")])[0], tpl, BadSampleCounter())
    assert isinstance(enc, datasets.Dataset) and len(enc) == 2
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    skip = EncodedDataset(enc, tpl, "skip")
    assert skip[0]["image_grid_thw"].tolist() == skip[1]["image_grid_thw"].tolist()  # y
    assert skip.counter.counts == {"corrupt_media": 1}
    with pytest.raises(BadSampleError, match=r"d\.jsonl, line 1\b.*corrupt_media"):
        EncodedDataset(enc, tpl, "error")[0]
