"""Conversion benchmark: wall time and peak memory of HF -> mcore -> HF on a ~1.5 GB model.

Builds a random Qwen2.5-VL-shaped bf16 checkpoint (real vocabulary size, so the embedding is the
largest tensor, as in real checkpoints), then in separate processes:

* baseline: ``transformers`` ``from_pretrained`` + a full ``state_dict()`` (what a naive
  converter does before it can reshape anything);
* ``mvlm convert --to mcore`` on 2 ranks (TP=2) and ``mvlm convert --to hf`` on 1 rank.

Memory is peak RSS per process above its own post-import RSS. The Megatron model itself has to
live in memory (a rank's parameters), so the figure of merit is the overhead: peak above
(baseline + the rank's own parameter bytes), compared with the largest single tensor.

    python bench/convert.py [--workdir /tmp/mvlm_bench_convert] [--record]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BASELINE = textwrap.dedent("""
    import resource, sys, time, psutil, torch, transformers
    start = psutil.Process().memory_info().rss / 2**20
    t = time.time()
    m = transformers.AutoModelForImageTextToText.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    n = sum(v.numel() for v in sd.values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"BASELINE start_mb={start:.0f} peak_mb={peak:.0f} params={n} "
          f"seconds={time.time() - t:.1f}")
""")

RX = re.compile(r"rank (\d+) memory start_mb=(\d+) peak_mb=(\d+) params_mb=(\d+) "
                r"seconds=([\d.]+)")


def build(workdir: Path, args) -> Path:
    import torch

    from mvlm.testing.tiny_models import build_tiny_checkpoint

    hf = workdir / "hf"
    if not (hf / "config.json").exists():
        t = time.time()
        build_tiny_checkpoint(
            "qwen2_5_vl", hf, variant="bench", dtype=torch.bfloat16,
            hidden_size=args.hidden, num_hidden_layers=args.layers,
            intermediate_size=args.ffn, vocab_size=args.vocab,
            num_attention_heads=args.hidden // 128, num_key_value_heads=2,
        )
        print(f"built checkpoint in {time.time() - t:.0f}s")
    return hf


def largest_tensor_mb(hf: Path) -> tuple[float, float]:
    from safetensors import safe_open

    sizes = []
    for f in hf.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                shape = h.get_slice(k).get_shape()
                n = 1
                for s in shape:
                    n *= s
                sizes.append(n * 2 / 2**20)  # bf16
    return max(sizes), sum(sizes)


def run(cmd: list[str]) -> tuple[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stdout}\n{p.stderr[-4000:]}")
    return p.stdout, time.time() - t


def mvlm(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "mvlm", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "mvlm", *args]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/mvlm_bench_convert")
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=6144)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--record", action="store_true", help="append to docs/benchmarks.md")
    args = ap.parse_args()
    wd = Path(args.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    hf = build(wd, args)
    big, total = largest_tensor_mb(hf)
    print(f"checkpoint: {total:.0f} MB bf16, largest tensor {big:.0f} MB")

    out, wall = run([sys.executable, "-c", BASELINE, str(hf)])
    m = re.search(r"start_mb=(\d+) peak_mb=(\d+) params=(\d+) seconds=([\d.]+)", out)
    base = dict(wall=wall, start=int(m.group(1)), peak=int(m.group(2)),
                work=float(m.group(4)))
    rows = [("baseline: transformers from_pretrained + state_dict()", 0, base["wall"],
             base["work"], base["peak"] - base["start"], total, None)]

    mc = wd / "mcore"
    out, wall = run(mvlm(2, ["convert", "--to", "mcore", "--model", str(hf), "--output",
                             str(mc), "--tp", "2", "--torch_dtype", "bfloat16",
                             "--overwrite"]))
    for r, start, peak, params, sec in RX.findall(out):
        rows.append((f"mvlm convert --to mcore (TP=2), rank {r}", int(r), wall, float(sec),
                     int(peak) - int(start), int(params), None))
    back = wd / "hf_back"
    out, wall = run(mvlm(1, ["convert", "--to", "hf", "--model", str(mc), "--output",
                             str(back), "--overwrite"]))
    for r, start, peak, params, sec in RX.findall(out):
        rows.append((f"mvlm convert --to hf (TP=1), rank {r}", int(r), wall, float(sec),
                     int(peak) - int(start), int(params), None))

    lines = ["| step | wall s (process) | convert s | peak RSS above start, MB | rank's "
             "params, MB | overhead above params, MB (x largest tensor) |",
             "|---|---|---|---|---|---|"]
    for name, _, wall, work, above, params, _ in rows:
        over = above - params
        lines.append(f"| {name} | {wall:.1f} | {work:.1f} | {above:.0f} | {params:.0f} | "
                     f"{over:.0f} ({over / big:.2f}x) |")
    table = "\n".join(lines)
    print(table)
    result = {"total_mb": total, "largest_tensor_mb": big, "rows": rows,
              "date": str(date.today())}
    (wd / "result.json").write_text(json.dumps(result, indent=2))
    if args.record:
        doc = REPO / "docs" / "benchmarks.md"
        doc.parent.mkdir(exist_ok=True)
        text = doc.read_text() if doc.exists() else "# Benchmarks\n"
        section = (
            f"\n## Conversion ({date.today()}, 2-core CPU, no GPU)\n\n"
            f"Command: `python bench/convert.py --record` (Qwen2.5-VL-shaped, hidden "
            f"{args.hidden}, {args.layers} layers, vocab {args.vocab}; {total:.0f} MB bf16, "
            f"largest tensor {big:.0f} MB). Peak RSS is per process, above its RSS after "
            "imports; 'overhead' subtracts the rank's own parameters, which any converter "
            "must hold.\n\n" + table + "\n")
        doc.write_text(text + section)


if __name__ == "__main__":
    main()
