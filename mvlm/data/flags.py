"""The data flags (``mvlm encode`` and the data half of ``mvlm pt|sft``), in a light module.

Why a module of its own: ``mvlm --help`` and ``mvlm sft --help`` build these parsers, and a help
screen must not pay for torch, datasets or Megatron-Core (10+ s, and CUDA warnings on a CPU box).
So this module imports the standard library and :mod:`mvlm.data.errors` only;
``tests/unit/test_cli_help.py`` fails if that ever changes. :mod:`mvlm.data.encode` re-exports
everything here, so ``from mvlm.data.encode import add_data_args`` keeps working.
"""
from __future__ import annotations

import argparse
from typing import Any

from mvlm.data.errors import ON_BAD_SAMPLE_CHOICES

# What ``Template`` does with a sample longer than --max_length (mvlm.data.template checks it).
TRUNCATION_STRATEGIES = ("delete", "left", "right", "error")


def str2bool(v: Any) -> bool:
    """ms-swift style booleans ("true"/"false"/"1"/"0"/...); shared by the trainer's flags."""
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "y", "on"):
        return True
    if s in ("0", "false", "no", "n", "off", "none"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


_DATA_FLAGS: list[tuple[str, dict]] = [
    ("--dataset", {"nargs": "+", "default": [],
                   "help": "files, dirs or hub IDs (ORG/NAME[:SUBSET], mvlm.hub); "
                           "'SPEC#N' samples N rows"}),
    ("--val_dataset", {"nargs": "*", "default": []}),
    ("--split_dataset_ratio", {"type": float, "default": 0.0}),
    ("--cached_dataset", {"default": None, "help": "directory written by mvlm encode"}),
    ("--task", {"default": "sft", "choices": ("pt", "sft", "preference", "rl")}),
    ("--max_length", {"type": int, "default": None}),
    ("--truncation_strategy", {"default": "delete", "choices": TRUNCATION_STRATEGIES}),
    ("--packing", {"type": str2bool, "nargs": "?", "const": True, "default": False}),
    ("--streaming", {"type": str2bool, "nargs": "?", "const": True, "default": False}),
    ("--lazy_tokenize", {"type": str2bool, "nargs": "?", "const": True, "default": False}),
    ("--dataset_num_proc", {"type": int, "default": 1}),
    ("--dataset_shuffle", {"type": str2bool, "nargs": "?", "const": True, "default": True}),
    ("--seed", {"type": int, "default": 42}),
    ("--system", {"default": None, "help": "system prompt ('' for none); default: the family's"}),
    ("--template_backend", {"default": "native", "choices": ("native", "jinja")}),
    ("--max_pixels", {"type": int, "default": None}),
    ("--min_pixels", {"type": int, "default": None}),
    ("--image_max_token_num", {"type": int, "default": None}),
    ("--video_max_pixels", {"type": int, "default": None}),
    ("--video_max_token_num", {"type": int, "default": None}),
    ("--fps", {"type": float, "default": None}),
    ("--fps_max_frames", {"type": int, "default": None}),
    ("--image_backend", {"default": "pil", "choices": ("pil", "dali")}),
    ("--on_bad_sample", {"default": "error", "choices": ON_BAD_SAMPLE_CHOICES}),
]


def parse_columns(value: Any) -> dict[str, str] | None:
    """``--columns`` as ms-swift takes it: a JSON object ``{"src": "dst"}`` (or a dict)."""
    import json

    if value is None or value == {} or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"--columns {value!r}: expected a JSON object like "
                             f"'{{\"text1\": \"query\"}}' ({e})") from e
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in value.items()):
        raise ValueError(f"--columns: expected a JSON object of column -> new name, got "
                         f"{value!r}")
    return dict(value)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Add the data flags (skipping any the parser already defines)."""
    group = parser.add_argument_group("data")
    for flag, kw in _DATA_FLAGS:
        if flag not in parser._option_string_actions:
            group.add_argument(flag, **kw)


def add_encode_args(parser: argparse.ArgumentParser) -> None:
    add_data_args(parser)
    for flag, kw in [("--model", {"required": True, "help": "HF checkpoint dir (tokenizer, "
                                      "processor, config)"}),
                     ("--output_dir", {"required": True}),
                     ("--dump", {"type": int, "default": 0,
                                 "help": "also write N samples as JSONL"})]:
        if flag not in parser._option_string_actions:
            parser.add_argument(flag, **kw)
