"""`mvlm convert` / `mvlm export` flags, in a light module (standard library only).

Why not in :mod:`mvlm.convert.command`: that module imports torch and Megatron-Core, and
``mvlm --help`` (which builds every sub-command's parser) must not pay 10+ s for them.
``mvlm.convert.command`` re-exports both builders, so older imports keep working.
:class:`ConvertConfig` is what the parsed flags become (the CLI builds it; nothing after the CLI
reads the namespace).
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


@dataclass
class ConvertConfig:
    """`mvlm convert` (and the full-weight half of `mvlm export`): what to convert, the layout
    to load/save at, and the checks. Field names are the flags' (``--output_dir`` = output)."""

    to: str = "hf"  # mcore | hf
    model: str | None = None  # HF dir (--to mcore) or mvlm mcore dir (--to hf)
    output: str = ""
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None
    cp: int = 1
    device: str | None = None
    transformer_impl: str = "auto"
    torch_dtype: str | None = None
    verify: bool = False
    verify_tol: float = 1e-4
    overwrite: bool = False
    max_shard_size: str = "5GB"

    @classmethod
    def from_flags(cls, values: Mapping[str, Any]):  # -> the class it is called on
        """From parsed flags by name (``vars(namespace)`` in the CLI layer)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


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
