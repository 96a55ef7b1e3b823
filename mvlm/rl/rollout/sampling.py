"""Next-token selection from logits: the processors of transformers / vLLM in their order.

Kept free of Megatron-Core so it can be unit-tested (and reused by any engine) in one process.
Order, as transformers' ``generate`` and vLLM apply them: repetition penalty (on every token
already in the prompt or completion: a positive logit is divided by the penalty, a negative one
multiplied), suppressed tokens (-inf), temperature, top-k, top-p (nucleus: keep the most likely
tokens whose preceding cumulative probability is below ``top_p``; the most likely token always
stays). Greedy (``temperature == 0``) is the argmax after penalty and suppression.
"""
from __future__ import annotations

import torch

from mvlm.rl.rollout.base import SamplingParams


def processed_logits(logits: torch.Tensor, params: SamplingParams,
                     seen: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 logits [b, V] -> the logits the next token is drawn from (-inf = never drawn).

    ``seen`` [b, V] bool marks the tokens the repetition penalty applies to. Greedy stops after
    penalty and suppression (temperature, top-k and top-p cannot change an argmax)."""
    proc = logits.float()
    if seen is not None and params.repetition_penalty != 1.0:
        pen = params.repetition_penalty
        proc = torch.where(seen, torch.where(proc > 0, proc / pen, proc * pen), proc)
    if params.suppress_token_ids:
        proc = proc.clone()
        proc[:, list(params.suppress_token_ids)] = float("-inf")
    if params.greedy:
        return proc
    proc = proc / params.temperature
    if 0 < params.top_k < proc.shape[-1]:
        kth = torch.topk(proc, params.top_k, dim=-1).values[:, -1:]
        proc = proc.masked_fill(proc < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_, idx = torch.sort(proc, dim=-1, descending=True)
        probs = torch.softmax(sorted_, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the more likely tokens
        drop_sorted = before >= params.top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        proc = proc.masked_fill(drop, float("-inf"))
    return proc


def sample_next(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator,
                seen: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next tokens [b] from fp32 logits [b, V], with (trainer-view log-prob, sampling log-prob)
    per token as float64; see :mod:`mvlm.rl.rollout.base` for the two log-probabilities."""
    logits = logits.float()
    scaled = logits if params.greedy else logits / params.temperature
    full_lp = torch.log_softmax(scaled, dim=-1)
    proc = processed_logits(logits, params, seen)
    if params.greedy:
        tok = proc.argmax(dim=-1)
        slp = torch.zeros(tok.shape, dtype=torch.float64, device=logits.device)
    else:
        probs = torch.softmax(proc, dim=-1)
        tok = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        slp = torch.log_softmax(proc, dim=-1).gather(-1, tok[:, None]).squeeze(-1).double()
    lp = full_lp.gather(-1, tok[:, None]).squeeze(-1).double()
    return tok, lp, slp
