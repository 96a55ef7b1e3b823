"""`mvlm export --model CKPT --to hf --output DIR`: a training checkpoint -> HF safetensors.

``CKPT`` may be a ``checkpoint-<step>`` directory, a training ``--output_dir`` (its ``latest`` is
used) or any mvlm torch_dist checkpoint. The work is :func:`mvlm.convert.command.run_convert`
(sharded load at the given layout, streaming parallel export, atomic publish), so export and
``mvlm convert --to hf`` are one code path.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_export_args(p: argparse.ArgumentParser) -> None:
    from mvlm.convert.flags import add_layout_args  # light: `mvlm export --help`

    p.add_argument("--model", "--load", dest="model", required=True,
                   help="checkpoint-<step> dir, a training output_dir, or an mvlm mcore dir")
    p.add_argument("--to", default="hf", choices=["hf"])
    p.add_argument("--output", "--output_dir", dest="output", required=True)
    add_layout_args(p)
    p.add_argument("--torch_dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--verify", action="store_true")
    p.add_argument("--verify_tol", type=float, default=1e-4)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--max_shard_size", default="5GB")


def resolve_checkpoint(path: str | Path) -> Path:
    from mvlm.convert.mcore_ckpt import is_mcore_checkpoint
    from mvlm.train.checkpoint import read_latest

    p = Path(path)
    if is_mcore_checkpoint(p):
        return p
    latest = read_latest(p)
    if latest is not None:
        return latest
    raise FileNotFoundError(f"--model {path}: neither an mvlm checkpoint (no mvlm_meta.json) nor a "
                            "training output_dir with a 'latest' checkpoint")


def run_export(args: argparse.Namespace) -> int:
    from mvlm.convert.command import run_convert

    args.model = str(resolve_checkpoint(args.model))
    return run_convert(args)
