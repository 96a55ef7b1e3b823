"""mvlm.rl.chord: the mu schedule equals ms-swift's (warm-up, cosine decay, valley) written out
here, CHORD-phi weights tokens by p(1-p), the SFT term is split-invariant, flags are checked."""
from __future__ import annotations

import argparse
import math

import pytest
import torch

from mvlm.rl.chord import ChordConfig, chord_mix, chord_sft_loss
from mvlm.rl.flags import add_grpo_args, grpo_configs
from mvlm.rl.grpo_loss import LossDenominators

TOL = 1e-6


def _mu_ref(step, warm, decay, peak, valley):
    if step < warm:
        return step / warm * peak
    if step >= warm + decay:
        return valley
    return (peak - valley) * 0.5 * (1 + math.cos(math.pi * (step - warm) / decay)) + valley


def test_mu_schedule():
    c = ChordConfig(chord_sft_dataset=["expert.jsonl"], chord_mu_warmup_steps=4,
                    chord_mu_decay_steps=10, chord_mu_peak=0.9, chord_mu_valley=0.05)
    got = [c.mu(s) for s in range(20)]
    assert got == pytest.approx([_mu_ref(s, 4, 10, 0.9, 0.05) for s in range(20)], abs=1e-12)
    assert got[0] == 0.0 and got[4] == pytest.approx(0.9) and got[14:] == [0.05] * 6
    assert ChordConfig().mu(3) == 0.0  # off without expert data
    const = ChordConfig(chord_sft_dataset=["e"], chord_mu_peak=0.1, chord_mu_valley=0.1)
    assert {const.mu(s) for s in range(5)} == {0.1}


def _expert(seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(6, 5, generator=g) * 2
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    return logps.masked_fill(mask == 0, -float("inf")), mask


@pytest.mark.parametrize("phi", [False, True])
def test_sft_term_and_split_invariance(phi):
    logps, mask = _expert()
    lp = logps.clone().requires_grad_(True)
    whole = chord_sft_loss(lp, mask, float(mask.sum()), enable_phi=phi)
    whole.backward()
    valid = mask.bool()
    p = logps[valid].exp()
    w = p * (1 - p) if phi else torch.ones_like(p)
    assert abs(float(whole) - float((-logps[valid] * w).sum() / mask.sum())) <= TOL
    # phi carries no gradient: d/dlogp = -phi / N
    assert torch.allclose(lp.grad[valid], -w / mask.sum(), atol=TOL)
    n = LossDenominators.from_masks([mask[:2], mask[2:]]).num_tokens
    parts = sum(chord_sft_loss(logps[s], mask[s], n, phi) for s in (slice(0, 2), slice(2, 6)))
    assert abs(float(parts - whole)) <= TOL


def test_mix():
    g, s = torch.tensor(2.0), torch.tensor(6.0)
    assert float(chord_mix(g, s, 0.25)) == 3.0
    assert chord_mix(g, None, 0.0) is g
    with pytest.raises(ValueError, match="mu = 0.5"):
        chord_mix(g, None, 0.5)


def test_flags_and_errors():
    p = argparse.ArgumentParser()
    add_grpo_args(p)
    ns = p.parse_args(["--chord_sft_dataset", "expert.jsonl", "--chord_mu_peak", "0.9",
                       "--chord_mu_valley", "0.05", "--chord_mu_warmup_steps", "2",
                       "--chord_mu_decay_steps", "8", "--chord_enable_phi_function", "true",
                       "--reward_funcs", "format"])
    c = grpo_configs(ns, num_generations=2, max_completion_length=16).chord
    assert c.enabled and c.chord_enable_phi_function and c.mu(2) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="--chord_mu_peak is a CHORD flag.*--chord_sft_dataset"):
        ChordConfig(chord_mu_peak=0.5)
    with pytest.raises(ValueError, match="--chord_mu_valley None"):
        ChordConfig(chord_sft_dataset=["e"], chord_mu_peak=0.5)
    with pytest.raises(ValueError, match="--chord_mu_peak 0.5 is never reached"):
        ChordConfig(chord_sft_dataset=["e"], chord_mu_peak=0.5, chord_mu_valley=0.1)
