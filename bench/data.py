"""Data pipeline benchmark: encode throughput vs a per-sample HF processor baseline, packing.

    .venv/bin/python bench/data.py --num_samples 3000 --dataset_num_proc 1 2

Builds a tiny Qwen2-VL checkpoint (tokenizer + processor; weights irrelevant here) and a mixed
synthetic JSONL dataset (text-only, one image, two images; image sizes drawn from a realistic
spread of shapes; images stored as PNG files), then times:

* baseline: for each row, load its images with PIL, ``processor.apply_chat_template`` and
  ``processor(text=..., images=...)`` -- what a straightforward HF-based pipeline does per sample
  (no label masking or storage at all, so the baseline is favoured);
* mvlm: the real ``mvlm encode`` path (load_datasets + encode_all: parse, validate, template,
  labels, mRoPE positions, Arrow storage) with ``--dataset_num_proc`` N;

and reports samples/s, the speedup, and the packing efficiency of the encoded lengths at
``--max_length``. Results go to stdout and ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time

import numpy as np
from PIL import Image

from mvlm.data.dataset import EncodedDataset, encode_all
from mvlm.data.dataset_spec import load_datasets
from mvlm.data.errors import BadSampleCounter
from mvlm.data.media import load_image
from mvlm.data.packing import pack_lengths, packing_efficiency
from mvlm.data.template import get_template
from mvlm.testing.tiny_models import build_tiny_checkpoint

WORDS = ("the a picture shows two cats red blue square table window sky model image token "
         "describe answer question what where how many objects in on under next to").split()
SIZES = [(640, 480), (480, 640), (512, 512), (800, 600), (1024, 768), (320, 240), (448, 448),
         (1280, 720), (300, 500), (224, 224)]


def make_dataset(root: str, n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    img_dir = os.path.join(root, "images")
    os.makedirs(img_dir, exist_ok=True)
    nprng = np.random.default_rng(seed)
    files = []
    for k in range(40):
        w, h = SIZES[k % len(SIZES)]
        arr = nprng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(arr).resize((w, h)).save(os.path.join(img_dir, f"{k}.png"))
        files.append(f"images/{k}.png")

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    path = os.path.join(root, "data.jsonl")
    with open(path, "w") as f:
        for _ in range(n):
            kind = rng.random()
            n_img = 0 if kind < 0.25 else (1 if kind < 0.85 else 2)
            q = "<image>" * n_img + text(5, 40) + "?"
            msgs = [{"role": "user", "content": q},
                    {"role": "assistant", "content": text(5, 200)}]
            if rng.random() < 0.2:
                msgs += [{"role": "user", "content": text(3, 20)},
                         {"role": "assistant", "content": text(5, 100)}]
            f.write(json.dumps({"messages": msgs,
                                "images": [rng.choice(files) for _ in range(n_img)]}) + "\n")
    return path


def _hf_messages(messages: list[dict]) -> list[dict]:
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


def baseline(path: str, processor, limit: int) -> tuple[float, int]:
    base = os.path.dirname(path)
    with open(path) as f:
        rows = [json.loads(x) for x in f][:limit]
    t = time.perf_counter()
    for row in rows:
        imgs = [load_image(r, base) for r in row["images"]] or None
        text = processor.apply_chat_template(_hf_messages(row["messages"]), tokenize=False)
        processor(text=[text], images=imgs, return_tensors="pt")
    return time.perf_counter() - t, len(rows)


def ours(path: str, template, num_proc: int):
    t = time.perf_counter()
    train, _ = load_datasets([path])
    counter = BadSampleCounter("error")
    ds = encode_all(train, template, counter, num_proc=num_proc)
    lengths = ds["length"]
    return time.perf_counter() - t, lengths, ds


def with_pixels(ds, template, limit: int, workers: int) -> tuple[float, int]:
    """Encoded cache -> full samples with pixel_values, as the training DataLoader does."""
    import torch.utils.data

    view = torch.utils.data.Subset(EncodedDataset(ds, template), range(min(limit, len(ds))))
    loader = torch.utils.data.DataLoader(view, batch_size=None, num_workers=workers)
    t = time.perf_counter()
    n = sum(1 for _ in loader)
    return time.perf_counter() - t, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num_samples", type=int, default=3000)
    p.add_argument("--baseline_samples", type=int, default=1000,
                   help="rows timed for the (slow) baseline; its rate is per sample")
    p.add_argument("--dataset_num_proc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--max_length", type=int, default=4096)
    p.add_argument("--family", default="qwen2_vl", choices=("qwen2_vl", "qwen2_5_vl"))
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from datasets.utils.logging import disable_progress_bar
    disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_tiny_checkpoint(args.family, os.path.join(tmp, "ckpt"))
        path = make_dataset(tmp, args.num_samples)
        from transformers import AutoProcessor
        # The tiny checkpoint has a test-sized pixel budget; benchmark with Qwen2-VL's real
        # default (3136..1003520 px) by re-saving its processor, so both sides load the same one.
        proc = AutoProcessor.from_pretrained(ckpt)
        proc.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
        proc.save_pretrained(ckpt)
        processor = AutoProcessor.from_pretrained(ckpt)
        template = get_template(ckpt)
        b_time, b_n = baseline(path, processor, args.baseline_samples)
        results = {"machine": f"{os.cpu_count()}-core CPU ({platform.processor() or 'x86_64'})",
                   "num_samples": args.num_samples, "family": args.family,
                   "baseline_samples_per_s": round(b_n / b_time, 1), "mvlm": {}}
        print(f"baseline (HF processor per sample): {b_n / b_time:8.1f} samples/s "
              f"({b_n} rows)")
        lengths = ds = None
        for npr in args.dataset_num_proc:
            t, lengths, ds = ours(path, template, npr)
            rate = args.num_samples / t
            results["mvlm"][f"num_proc={npr}"] = {
                "samples_per_s": round(rate, 1),
                "speedup_vs_baseline": round(rate / (b_n / b_time), 2)}
            print(f"mvlm encode, --dataset_num_proc {npr}: {rate:8.1f} samples/s "
                  f"({rate / (b_n / b_time):.2f}x baseline)")
        for workers in (0, 2):
            t, n = with_pixels(ds, template, args.baseline_samples, workers)
            rate = n / t
            results["mvlm"][f"pixels_loader_workers={workers}"] = {
                "samples_per_s": round(rate, 1),
                "speedup_vs_baseline": round(rate / (b_n / b_time), 2)}
            print(f"cache -> pixel_values in DataLoader, num_workers {workers}: {rate:8.1f} "
                  f"samples/s ({rate / (b_n / b_time):.2f}x baseline)")
        packs = pack_lengths(lengths, args.max_length)
        eff = packing_efficiency(lengths, packs, args.max_length)
        results["tokens"] = int(sum(lengths))
        results["mean_length"] = round(float(np.mean(lengths)), 1)
        results["packing"] = {"max_length": args.max_length, "rows": len(packs),
                              "efficiency": round(eff, 4)}
        print(f"packing at max_length {args.max_length}: {len(lengths)} samples "
              f"(mean {np.mean(lengths):.0f} tokens) -> {len(packs)} rows, "
              f"efficiency {eff:.2%}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
