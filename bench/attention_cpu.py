"""Causal attention on CPU: torch SDPA (its CPU flash kernel) vs mvlm.runtime.causal_blocks.

    .venv/bin/python bench/attention_cpu.py [--rows 4] [--heads 6] [--kv_heads 2]
        [--head_dim 64] [--seqs 64,256,480] [--rounds 30] [--threads 1] [--block N]
        [--out FILE]

One decoder layer's core attention, forward + backward, on sbhd fp32 tensors as Megatron hands
them to ``SDPACoreAttention``: "sdpa" is what that module ran before (permute to bhsd,
``F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)``, permute back), "blocks" is
:func:`mvlm.runtime.causal_blocks.attention`. The two alternate round by round (order flipped
every round) in one process, so the box's drift hits both alike; reported: the median CPU time
(``time.process_time``) of the rounds after the first two, their ratio, and each kernel's worst
error against an fp64 reference on the same inputs (output and q/k/v gradients, scaled by
``max(1, max|ref|)``), so the speed is shown on the same numbers. ``--block N`` sets
``causal_blocks.BLOCK`` for the run (the sweep behind its value).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from mvlm.runtime import causal_blocks


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    out = F.scaled_dot_product_attention(*(x.permute(1, 2, 0, 3) for x in (q, k, v)),
                                         is_causal=True, scale=scale, enable_gqa=True)
    return out.permute(2, 0, 1, 3).reshape(q.size(0), q.size(1), -1)


def blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return causal_blocks.attention(q, k, v, scale).reshape(q.size(0), q.size(1), -1)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    s, g = q.size(0), q.size(2) // k.size(2)
    qb, kb, vb = (x.permute(1, 2, 0, 3) for x in (q, k, v))
    kb, vb = kb.repeat_interleave(g, dim=1), vb.repeat_interleave(g, dim=1)
    scores = (qb @ kb.transpose(-1, -2) * scale).masked_fill(
        torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ vb).permute(2, 0, 1, 3).reshape(s, q.size(1), -1)


def run(fn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, go: torch.Tensor,
        scale: float) -> list[torch.Tensor]:
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, scale)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), go)]


def one_length(args: argparse.Namespace, s: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(s)
    b, d = args.rows, args.head_dim
    q, k, v = (torch.randn(s, b, n, d, generator=g) for n in
               (args.heads, args.kv_heads, args.kv_heads))
    go = torch.randn(s, b, args.heads * d, generator=g)
    scale = 1 / math.sqrt(d)
    ref = run(reference, *(x.double() for x in (q, k, v, go)), scale)
    fns = {"sdpa": sdpa, "blocks": blocks}
    row: dict[str, Any] = {"seq": s, "applies": causal_blocks.applies(q, k, 0.0)}
    for name, fn in fns.items():
        got = run(fn, q, k, v, go, scale)
        row[f"{name}_err"] = max(float((x.double() - r).abs().max()) / max(1.0, float(
            r.abs().max())) for x, r in zip(got, ref, strict=True))
    times: dict[str, list[float]] = {n: [] for n in fns}
    for r in range(args.rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            c = time.process_time()
            run(fns[name], q, k, v, go, scale)
            times[name].append(time.process_time() - c)
    for name in fns:
        row[f"{name}_ms"] = round(statistics.median(times[name][2:]) * 1e3, 2)
    row["blocks_over_sdpa"] = round(row["blocks_ms"] / row["sdpa_ms"], 3)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--seqs", default="64,256,480")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--block", type=int, default=None, help="query rows per block (default: "
                   "causal_blocks.BLOCK)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.block:
        causal_blocks.BLOCK = args.block
    rows = [one_length(args, int(s)) for s in args.seqs.split(",")]
    summary = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "torch": torch.__version__, "threads": args.threads,
               "shape": {"rows": args.rows, "heads": args.heads, "kv_heads": args.kv_heads,
                         "head_dim": args.head_dim}, "block": causal_blocks.BLOCK,
               "lengths": rows}
    print(json.dumps(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    print("| tokens | kernel taken | sdpa ms | blocks ms | blocks / sdpa | sdpa err | blocks err |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seq']} | {'yes' if r['applies'] else 'no (sdpa)'} | {r['sdpa_ms']} | "
              f"{r['blocks_ms']} | {r['blocks_over_sdpa']} | {r['sdpa_err']:.1e} | "
              f"{r['blocks_err']:.1e} |")


if __name__ == "__main__":
    main()
