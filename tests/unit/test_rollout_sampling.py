"""``mvlm.rl.rollout.sampling``: the logits processors equal transformers' own, sampling draws
from the processed distribution, and the two log-probabilities mean what base.py says.

One process, no Megatron-Core: fp32 random logits [6, 300].
"""
from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mvlm.rl.rollout.base import SamplingParams, token_mult_prob_error
from mvlm.rl.rollout.sampling import processed_logits, sample_next

V = 300


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, V, generator=g) * 3
    history = torch.randint(0, V, (6, 12), generator=g)
    seen = torch.zeros(6, V, dtype=torch.bool)
    seen[torch.arange(6)[:, None], history] = True
    return logits, history, seen


@pytest.mark.parametrize("rp,temp,top_k,top_p", [
    (1.0, 0.7, -1, 1.0), (1.3, 1.0, 20, 1.0), (1.0, 0.9, -1, 0.8), (1.2, 0.6, 50, 0.9),
    (0.8, 1.5, 5, 0.5)])
def test_processors_equal_transformers(rp, temp, top_k, top_p):
    logits, history, seen = _inputs()
    params = SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, repetition_penalty=rp)
    ours = processed_logits(logits, params, seen)
    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(rp)] if rp != 1.0 else [])
    procs.append(TemperatureLogitsWarper(temp))
    if top_k > 0:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    ref = procs(history, logits.clone())
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    fin = torch.isfinite(ref)
    assert (ours[fin] - ref[fin]).abs().max() <= 1e-6
    if top_k > 0 or top_p < 1.0:
        assert int((~fin).sum()) > 0  # the filters removed something


def test_greedy_is_argmax_after_penalty_and_topk1_agrees():
    logits, _, seen = _inputs(1)
    g = torch.Generator().manual_seed(0)
    greedy = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    tok, lp, slp = sample_next(logits, greedy, g, seen)
    pen = torch.where(seen, torch.where(logits > 0, logits / 1.5, logits * 1.5), logits)
    assert torch.equal(tok, pen.argmax(-1))
    assert torch.equal(slp, torch.zeros(6, dtype=torch.float64))
    want = torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)
    assert torch.allclose(lp, want.double(), atol=0, rtol=0)
    tok1, _, slp1 = sample_next(logits, SamplingParams(temperature=0.8, top_k=1,
                                                       repetition_penalty=1.5), g, seen)
    assert torch.equal(tok1, tok)
    assert slp1.abs().max() == 0  # one candidate left: drawn with probability 1


def test_logprob_views_and_suppression():
    logits, _, _ = _inputs(2)
    g = torch.Generator().manual_seed(3)
    plain = SamplingParams(temperature=0.7)
    tok, lp, slp = sample_next(logits, plain, g)
    want = torch.log_softmax(logits / 0.7, -1).gather(-1, tok[:, None]).squeeze(-1).double()
    assert torch.equal(lp, want) and torch.equal(slp, lp)  # no processor: the same number
    banned = logits.argmax(-1).tolist()
    p = SamplingParams(temperature=0.7, top_p=0.9, suppress_token_ids=banned)
    for seed in range(20):
        tok, lp, slp = sample_next(logits, p, torch.Generator().manual_seed(seed))
        assert not any(t in banned for t in tok.tolist())
        assert bool((slp > lp).all())  # truncation renormalises onto fewer tokens


def test_draws_follow_the_processed_distribution():
    """Empirical frequencies of 20000 draws of one row vs softmax(processed): max gap < 0.015
    (5 standard errors at p = 0.25)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    p = SamplingParams(temperature=0.8, top_k=4)
    probs = torch.softmax(processed_logits(logits, p), -1)[0]
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(6)
    rows = logits.expand(20000, -1)
    tok, _, _ = sample_next(rows, p, g)
    counts += torch.bincount(tok, minlength=6).float()
    freq = counts / counts.sum()
    assert freq[4:].sum() == 0  # outside top-4: never drawn
    assert (freq - probs).abs().max() < 0.015, (freq, probs)


def test_same_seed_same_draws():
    logits, _, _ = _inputs(4)
    p = SamplingParams(temperature=1.0, top_p=0.95)
    a = sample_next(logits, p, torch.Generator().manual_seed(7))[0]
    b = sample_next(logits, p, torch.Generator().manual_seed(7))[0]
    c = sample_next(logits, p, torch.Generator().manual_seed(8))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_token_mult_prob_error_and_bad_params():
    e = torch.tensor([[-1.0, -2.0, -3.0]])
    t = torch.tensor([[-1.0, -2.5, -3.0]])
    mult, mx = token_mult_prob_error(e, t, torch.tensor([[1, 1, 0]]))
    assert mult == pytest.approx((1 + math.exp(0.5)) / 2) and mx == pytest.approx(0.5)
    with pytest.raises(ValueError, match="zero tokens"):
        token_mult_prob_error(e, t, torch.zeros(1, 3))
    for kw, flag in (({"temperature": -1}, "--temperature"), ({"top_p": 0}, "--top_p"),
                     ({"top_k": -5}, "--top_k"), ({"num_generations": 0}, "--num_generations"),
                     ({"max_completion_length": 0}, "--max_completion_length"),
                     ({"repetition_penalty": 0}, "--repetition_penalty")):
        with pytest.raises(ValueError, match=flag):
            SamplingParams(**kw)


def test_flags_build_sampling_params():
    import argparse

    from mvlm.rl.rollout.flags import add_rollout_args, sampling_params

    p = argparse.ArgumentParser()
    add_rollout_args(p)
    sp = sampling_params(p.parse_args([]))
    assert (sp.num_generations, sp.max_completion_length, sp.temperature, sp.top_k, sp.top_p,
            sp.repetition_penalty) == (8, 512, 0.9, 50, 0.9, 1.0)  # ms-swift's GRPO defaults
    sp = sampling_params(p.parse_args(["--num_generations", "4", "--temperature", "0",
                                       "--top_k", "0", "--repetition_penalty", "1.1"]),
                         seed=3, suppress_token_ids=[7])
    assert sp.greedy and sp.top_k == -1 and sp.seed == 3 and sp.suppress_token_ids == (7,)
    with pytest.raises(ValueError, match="--top_p"):
        sampling_params(p.parse_args(["--top_p", "1.5"]))
