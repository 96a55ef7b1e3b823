"""The rollout engine's sampling flags, with ms-swift's GRPO names and defaults.

Light on purpose (argparse only), so ``mvlm rlhf --help`` does not import torch; the
:class:`~mvlm.rl.rollout.base.SamplingParams` they build are made in :func:`sampling_params`.
Defaults are ms-swift's GRPO defaults: 8 generations of up to 512 tokens, temperature 0.9,
top-k 50, top-p 0.9, no repetition penalty.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mvlm.rl.rollout.base import SamplingParams


def add_rollout_args(p: argparse._ActionsContainer) -> None:
    """Register the sampling flags on ``p`` (a parser or an argument group)."""
    a = p.add_argument
    a("--num_generations", type=int, default=8,
      help="completions per prompt (the GRPO group size)")
    a("--max_completion_length", type=int, default=512,
      help="new tokens per completion at most (stop reason 'length')")
    a("--temperature", type=float, default=0.9,
      help="sampling temperature; 0 = greedy. Trainer log-probs are scaled by it too")
    a("--top_k", type=int, default=50, help="keep the k most likely tokens; -1 or 0 = off")
    a("--top_p", type=float, default=0.9, help="nucleus sampling mass; 1.0 = off")
    a("--repetition_penalty", type=float, default=1.0,
      help="transformers/vLLM repetition penalty over prompt + completion tokens; 1.0 = off")


def sampling_params(ns: Any, *, seed: int | None = None,
                    suppress_token_ids: tuple[int, ...] | list[int] = ()) -> SamplingParams:
    """SamplingParams from parsed flags (validation errors name the flag)."""
    from mvlm.rl.rollout.base import SamplingParams

    return SamplingParams(
        num_generations=ns.num_generations, max_completion_length=ns.max_completion_length,
        temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k,
        repetition_penalty=ns.repetition_penalty, seed=seed,
        suppress_token_ids=tuple(suppress_token_ids))
