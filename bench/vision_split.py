"""Wall time and counted FLOPs of the vision part per rank: TP1 vs TP2 (and CP2), split on/off.

    .venv/bin/python bench/vision_split.py [--reps 5] [--family qwen2_5_vl] [--out result.json]

Launches itself under torchrun on two ranks (one thread each) and, in one process group, runs
the same micro-batches through ``VLMModel.vision_features`` (the tower + the all-gather of
:mod:`mvlm.models.vision_parallel`) forward and backward (a fixed linear functional of the
features), on these layouts in turn:

* ``TP1``: world of two as two data-parallel ranks: each rank runs every image (what one rank
  does at TP1, under the same CPU sharing as the other rows);
* ``TP2`` and ``CP2``: the split (the default), each next to ``build_model(...,
  vit_parallel=False)`` ("split off", mvlm before the split: every rank runs every image) in
  the same process group, the two timed in alternation so that both see the same load.

Per row: the fastest of ``--reps`` timed repetitions (after one warm-up; other jobs sharing
the CPU only ever add time) of the slower rank's wall time, and the FLOPs each rank counts
(``torch.utils.flop_counter``, max over ranks). The model is the tiny-Qwen2.5-VL ``bench``
vision tower (depth 4, width 512, 8 heads, MLP 1376, fp32) under a small decoder the timing
does not touch. Cases: four 224x112 images; three images of different sizes (112x112,
224x112, 112x168); one 224x224 image (one item cannot be divided: one rank idles).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "4 x 224x112": [(1, 16, 8)] * 4,
    "112x112 + 224x112 + 112x168": [(1, 8, 8), (1, 16, 8), (1, 8, 12)],
    "1 x 224x224": [(1, 16, 16)],
}
LAYOUTS = (("TP1", {}), ("TP2", {"tp": 2}), ("CP2", {"cp": 2}))


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.utils.flop_counter import FlopCounterMode

    from mvlm.models.vlm import build_model
    from mvlm.runtime.parallel import ParallelLayout
    from mvlm.runtime.startup import startup
    from mvlm.testing.tiny_models import tiny_config

    torch.set_num_threads(1)
    cfg = tiny_config(args.family, variant="bench", hidden_size=128, num_attention_heads=8,
                      num_key_value_heads=4, intermediate_size=256, num_hidden_layers=1)
    gen = torch.Generator().manual_seed(0)
    batches = {}
    for case, grids in CASES.items():
        rows = sum(t * h * w for t, h, w in grids)
        batches[case] = {"pixel_values": torch.randn(rows, 3 * 2 * 14 * 14, generator=gen),
                         "image_grid_thw": torch.tensor(grids)}
    w = torch.randn(cfg.text_config.hidden_size, generator=gen)

    def step(model, media):
        for p in model.vision_model.parameters():
            p.grad = None
        feats = model.vision_features(media)
        sum((f * w).sum() for f in feats.values()).backward()

    results = []
    for name, sizes in LAYOUTS:
        layout = ParallelLayout(**sizes)
        startup(layout, seed=0, device="cpu")
        modes = {name: True} if not sizes else {f"{name} split off": False, name: True}
        models = {m: build_model(cfg, layout, dtype=torch.float32, device="cpu",
                                 vit_parallel=split).models[0] for m, split in modes.items()}
        for case, media in batches.items():
            flops, times = {}, {m: [] for m in models}
            for m, model in models.items():
                with FlopCounterMode(display=False) as fc:
                    step(model, media)  # also the warm-up
                most = torch.tensor([fc.get_total_flops()], dtype=torch.float64)
                dist.all_reduce(most, op=dist.ReduceOp.MAX)  # the busiest rank
                flops[m] = int(most.item())
            for _ in range(args.reps):  # the modes alternate: the same load on both
                for m, model in models.items():
                    dist.barrier()
                    t0 = time.perf_counter()
                    step(model, media)
                    t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slower rank
                    times[m].append(t.item())
            for m in models:
                results.append({"layout": m, "case": case, "wall_s": min(times[m]),
                                "flops": flops[m]})
                if dist.get_rank() == 0:
                    print(f"{m:14s} {case:30s} {min(times[m]):.3f} s", flush=True)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=1))


def table(results: list[dict]) -> str:
    base = {r["case"]: r for r in results if r["layout"] == "TP1"}
    off = {(r["layout"].split()[0], r["case"]): r for r in results if "off" in r["layout"]}
    lines = ["| case | layout | vision wall s per rank (fwd+bwd) | vs TP1 | vs split off, same "
             "layout (interleaved) | FLOPs per rank | vs TP1 |", "|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: list(CASES).index(r["case"])):
        b = base[r["case"]]
        o = off.get((r["layout"], r["case"]))
        vs_off = f"{r['wall_s'] / o['wall_s']:.2f}x" if o else "-"
        lines.append(f"| {r['case']} | {r['layout']} | {r['wall_s']:.3f} | "
                     f"{r['wall_s'] / b['wall_s']:.2f}x | {vs_off} | "
                     f"{r['flops'] / 1e9:.2f} G | {r['flops'] / b['flops']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--family", default="qwen2_5_vl", choices=("qwen2_vl", "qwen2_5_vl"))
    ap.add_argument("--out", default=None, help="write the JSON results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or Path(tmp) / "vision_split.json")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
               "--master-addr=127.0.0.1", f"--master-port={port}", __file__, "--worker",
               "--reps", str(args.reps), "--family", args.family, "--out", str(out)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        subprocess.run(cmd, check=True, env=env)
        print(table(json.loads(out.read_text())))


if __name__ == "__main__":
    main()
