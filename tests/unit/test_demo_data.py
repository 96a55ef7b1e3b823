"""The demo dataset and the demo's pure helpers (no training: that is tests/e2e/test_demo.py).

Why: the demo's accuracy claim is only meaningful if the held-out split is deterministic,
class-balanced, disjoint from training, and encoded by mvlm's own data pipeline with the answer
(and only the answer) as the training target.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from mvlm.demo import loss_summary, read_losses
from mvlm.demo_data import COLOURS, QUESTIONS, SHAPES, chance_accuracy, write_demo_dataset


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "data", n_train=48, n_val=24,
                              image_size=112, seed=3)


def test_deterministic_from_seed(data, tmp_path):
    again = write_demo_dataset(tmp_path / "a", n_train=48, n_val=24, image_size=112, seed=3)
    other = write_demo_dataset(tmp_path / "b", n_train=48, n_val=24, image_size=112, seed=4)
    assert _digest(data.root) == _digest(again.root)
    assert _digest(data.root) != _digest(other.root)


def test_rows_are_ms_swift_format_and_balanced(data):
    from mvlm.data.formats import parse_row

    rows = [json.loads(x) for x in data.val.read_text().splitlines()]
    assert len(rows) == 24
    answers = Counter()
    for r in rows:
        s = parse_row(r)  # the data pipeline's own validation
        assert s.count_tags("images") == 1 and len(s.images) == 1
        q, a = r["messages"][0]["content"], r["messages"][1]["content"]
        assert q.startswith("<image>") and q[len("<image>"):] in QUESTIONS.values()
        assert a in COLOURS or a in SHAPES
        answers[a] += 1
        img = Image.open(data.val.parent / r["images"][0])
        assert img.size == (112, 112) and img.mode == "RGB"
    # 24 rows = every (question kind, colour, shape) combination once
    assert all(answers[c] == 3 for c in COLOURS) and all(answers[s] == 4 for s in SHAPES)


def test_held_out_images_differ_from_training(data):
    train_imgs = {(data.train.parent / json.loads(x)["images"][0]).read_bytes()
                  for x in data.train.read_text().splitlines()}
    for x in data.val.read_text().splitlines():
        assert (data.val.parent / json.loads(x)["images"][0]).read_bytes() not in train_imgs


def test_image_colour_matches_label(data):
    """The answer is really in the pixels: the dominant non-background colour is the label."""
    for x in data.val.read_text().splitlines():
        r = json.loads(x)
        if "colour" not in r["messages"][0]["content"]:
            continue
        img = Image.open(data.val.parent / r["images"][0]).convert("RGB")
        counts = Counter(p for p in img.getdata() if p != (245, 245, 245))
        px = counts.most_common(1)[0][0]
        nearest = min(COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLOURS[c], px)))
        assert nearest == r["messages"][1]["content"]


def test_template_trains_only_the_answer(data, tmp_path):
    """mvlm's template encodes a demo row with labels on exactly the answer + <|im_end|>."""
    from mvlm.data.template import get_template
    from mvlm.testing.tiny_models import build_tiny_checkpoint

    hf = build_tiny_checkpoint("qwen2_5_vl", tmp_path / "hf")
    tpl = get_template(hf)
    row = json.loads(data.val.read_text().splitlines()[0])
    enc = tpl.encode(row, base_dir=str(data.val.parent))
    labels = [int(t) for t in enc["labels"] if int(t) != -100]
    text = tpl.tokenizer.decode(labels)
    assert text.strip() == row["messages"][1]["content"] + "<|im_end|>"


def test_chance_and_argument_checks(tmp_path):
    assert chance_accuracy(("colour",)) == pytest.approx(0.25)
    assert chance_accuracy() == pytest.approx((1 / 4 + 1 / 3) / 2)
    with pytest.raises(ValueError, match="kinds"):
        write_demo_dataset(tmp_path, kinds=("count",))
    with pytest.raises(ValueError, match="image_size"):
        write_demo_dataset(tmp_path, image_size=20)


def test_loss_helpers(tmp_path):
    log = tmp_path / "logging.jsonl"
    log.write_text("".join(json.dumps({"step": i, "loss": 10.0 / i}) + "\n"
                           for i in range(1, 21)) + json.dumps({"step": 21, "eval": 1}) + "\n")
    losses = read_losses(log)
    assert len(losses) == 20 and losses[0] == (1, 10.0)
    s = loss_summary(losses, points=4)
    assert s.startswith("1:10.000") and s.endswith("20:0.500") and s.count(":") == 4
