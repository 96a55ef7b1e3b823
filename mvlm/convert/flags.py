"""`mvlm convert` / `mvlm export` flags, in a light module (standard library only).

Why not in :mod:`mvlm.convert.command`: that module imports torch and Megatron-Core, and
``mvlm --help`` (which builds every sub-command's parser) must not pay 10+ s for them.
``mvlm.convert.command`` re-exports both builders, so older imports keep working.
"""
from __future__ import annotations

import argparse


def add_layout_args(p: argparse.ArgumentParser) -> None:
    """The layout to load/save at (Megatron names as aliases); shared with `mvlm export`."""
    p.add_argument("--tp", "--tensor_model_parallel_size", dest="tp", type=int, default=1)
    p.add_argument("--pp", "--pipeline_model_parallel_size", dest="pp", type=int, default=1)
    p.add_argument("--ep", "--expert_model_parallel_size", dest="ep", type=int, default=1)
    p.add_argument("--etp", "--expert_tensor_parallel_size", dest="etp", type=int, default=None)
    p.add_argument("--cp", "--context_parallel_size", dest="cp", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available")
    p.add_argument("--transformer_impl", choices=["auto", "te", "local"], default="auto",
                   help="layer spec: Transformer Engine (GPU, when installed) or local+SDPA")


def add_convert_args(p: argparse.ArgumentParser) -> None:
    """All `mvlm convert` flags (see :mod:`mvlm.convert.command` for what they do)."""
    p.add_argument("--to", required=True, choices=["mcore", "hf"])
    p.add_argument("--model", required=True, help="HF dir (--to mcore) or MCORE dir (--to hf)")
    p.add_argument("--output", "--output_dir", dest="output", required=True)
    add_layout_args(p)
    p.add_argument("--torch_dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the Megatron model (default: the checkpoint's)")
    p.add_argument("--verify", action="store_true",
                   help="compare logits/loss with the HF model; fail (no output) on mismatch")
    p.add_argument("--verify_tol", type=float, default=1e-4)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--max_shard_size", default="5GB", help="HF shard size limit, e.g. 2GB")
