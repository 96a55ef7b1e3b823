"""Audio / image / text SFT rows for the Qwen2.5-Omni tests (tiny wavs written with the stdlib
``wave`` module, 16 kHz mono int16)."""
from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np


def write_wav(path: Path, seconds: float, seed: int) -> Path:
    """``seconds`` of seeded noise with a tone whose pitch depends on the seed."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    x = 0.3 * np.sin(2 * np.pi * (200 + 100 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((x * 32767).astype(np.int16).tobytes())
    return path


def write_omni_rows(root: Path, n: int = 12) -> Path:
    """``n`` rows cycling audio-only, audio + image, image-only and text-only, with audios of
    0.4-1.6 s (several 40-frame chunks of the tiny audio encoder) and 56/84 px images."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        wav = str(write_wav(root / f"a{i}.wav", 0.4 + 0.1 * i, i))
        img = root / f"i{i}.png"
        rng = np.random.default_rng(100 + i)
        Image.fromarray(rng.integers(0, 255, (56, 56 + 28 * (i % 2), 3), np.uint8)).save(img)
        kind = i % 4
        q = ["<audio>What do you hear?", "<image>Which sound fits the picture?<audio>",
             "<image>Describe the picture.", f"Say the number {i} twice."][kind]
        a = ["A tone.", "The tone.", "A square.", f"{i} {i}"][kind]
        row = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        if kind in (0, 1):
            row["audios"] = [wav]
        if kind in (1, 2):
            row["images"] = [str(img)]
        rows.append(row)
    out = root / "omni.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out
