"""The `mvlm demo` dataset: rendered coloured shapes with one-word questions about them.

Why this dataset: the demo has to show a *measurable* gain from training a tiny random model on
two CPU cores in a couple of minutes. Every answer here is a function of the image alone (colour
or shape of the single drawn figure), the answer set is small and fixed, so exact-match accuracy
has a known chance level (1/4 for colour, 1/3 for shape) that an untrained model cannot beat, and
a model that learnt to look at the image gets close to 100%. Nothing is downloaded: images are
drawn with PIL, deterministically from a seed, so the held-out split is the same on every run.

Rows are written in ms-swift's format, the one ``mvlm sft --dataset`` reads::

    {"messages": [{"role": "user", "content": "<image>What colour is the shape?"},
                  {"role": "assistant", "content": "red"}],
     "images": ["img/train_00001.png"]}

Image paths are relative to the JSONL file (the data pipeline resolves them against it), so the
dataset directory can be moved as a whole.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "QUESTIONS",
    "SHAPES",
    "DemoData",
    "chance_accuracy",
    "draw_shape",
    "write_demo_dataset",
]

# Saturated, far-apart colours: a two-layer vision tower on 14-px patches separates them at once.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Question kind -> prompt. Answers are single words of the class names above.
QUESTIONS: dict[str, str] = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
}

BACKGROUND = (245, 245, 245)


@dataclass(frozen=True)
class DemoData:
    """Where a generated dataset lives and what is in it."""

    root: Path
    train: Path
    val: Path
    n_train: int
    n_val: int
    image_size: int
    kinds: tuple[str, ...]


def chance_accuracy(kinds: tuple[str, ...] = tuple(QUESTIONS)) -> float:
    """Expected exact-match accuracy of uniform guessing over each kind's answer set.

    Questions are drawn with equal probability per kind, so chance is the mean over kinds.
    """
    sizes = {"colour": len(COLOURS), "shape": len(SHAPES)}
    return sum(1.0 / sizes[k] for k in kinds) / len(kinds)


def draw_shape(shape: str, colour: str, size: int, rng: random.Random) -> Image.Image:
    """One ``size`` x ``size`` RGB image with a single filled ``shape`` in ``colour``.

    Position, scale and (for triangles) orientation vary, and the colour is jittered a little, so
    the model has to generalise rather than memorise pixels; the figure always covers a good part
    of the image so it spans several vision patches.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; choose one of {tuple(COLOURS)}")
    img = Image.new("RGB", (size, size), BACKGROUND)
    d = ImageDraw.Draw(img)
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    r = rng.uniform(0.34, 0.42) * size  # half-extent of the figure
    cx = rng.uniform(r + 1, size - r - 1)
    cy = rng.uniform(r + 1, size - r - 1)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        rot = rng.uniform(-0.3, 0.3)  # radians around "pointing up"
        pts = [(cx + r * math.sin(rot + k * 2 * math.pi / 3),
                cy - r * math.cos(rot + k * 2 * math.pi / 3)) for k in range(3)]
        d.polygon(pts, fill=fill)
    return img


def _rows(split: str, n: int, rng: random.Random, img_dir: Path, size: int,
          kinds: tuple[str, ...]) -> list[dict]:
    rows = []
    for i in range(n):
        # Cycle through (kind, colour, shape) so every class is equally represented in each split
        # (the held-out accuracy is then not skewed by an unlucky class mix).
        kind = kinds[i % len(kinds)]
        colour = list(COLOURS)[(i // len(kinds)) % len(COLOURS)]
        shape = SHAPES[(i // (len(kinds) * len(COLOURS))) % len(SHAPES)]
        name = f"{split}_{i:05d}.png"
        draw_shape(shape, colour, size, rng).save(img_dir / name)
        answer = colour if kind == "colour" else shape
        rows.append({
            "messages": [
                {"role": "user", "content": "<image>" + QUESTIONS[kind]},
                {"role": "assistant", "content": answer},
            ],
            "images": [f"img/{name}"],
        })
    rng.shuffle(rows)
    return rows


def write_demo_dataset(out_dir: str | Path, *, n_train: int = 480, n_val: int = 48,
                       image_size: int = 56, seed: int = 0,
                       kinds: tuple[str, ...] = tuple(QUESTIONS)) -> DemoData:
    """Write ``train.jsonl`` / ``val.jsonl`` and their PNGs under ``out_dir``.

    The same arguments always give byte-identical files. Train and validation images are drawn
    from different random streams, so no held-out image is a copy of a training one.
    """
    unknown = [k for k in kinds if k not in QUESTIONS]
    if unknown or not kinds:
        raise ValueError(f"unknown question kinds {unknown or kinds!r}; choose from "
                         f"{tuple(QUESTIONS)}")
    if image_size < 28:
        raise ValueError(f"image_size={image_size} is below one merged vision patch; use >= 28")
    root = Path(out_dir)
    img_dir = root / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n, offset in (("train", n_train, 0), ("val", n_val, 1)):
        rows = _rows(split, n, random.Random(seed * 1000 + offset), img_dir, image_size, kinds)
        path = root / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[split] = path
    return DemoData(root=root, train=paths["train"], val=paths["val"], n_train=n_train,
                    n_val=n_val, image_size=image_size, kinds=tuple(kinds))
