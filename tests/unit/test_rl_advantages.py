"""mvlm.rl.advantages against references computed here: TRL 1.16's GRPO advantage (its own
``nanstd``, its sum-then-normalize steps) and the RLOO / REINFORCE++ formulas written out
element by element. fp32, tolerance 1e-6."""
from __future__ import annotations

import pytest
import torch

from mvlm.rl.advantages import (
    STD_EPS,
    AdvantageConfig,
    DynamicSampleBuffer,
    compute_advantages,
    dynamic_sample,
    overlong_filter,
    sequence_kl_for_reward,
    weighted_rewards,
    zero_std_groups,
)

K = 4
TOL = 1e-6


def _rewards(n_groups: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n_groups * K, generator=g)
    r[K:2 * K] = 0.5  # one group without signal
    return r


def _trl_grpo(rewards_per_func: torch.Tensor, weights: torch.Tensor, scale: str) -> torch.Tensor:
    """TRL 1.16 GRPOTrainer._generate_and_score_completions, sum_then_normalize branch."""
    from trl.trainer.utils import nanstd

    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = torch.nan
    mean = torch.nanmean(rewards.view(-1, K), dim=1).repeat_interleave(K)
    if scale in ("group", "none"):
        std = nanstd(rewards.view(-1, K), dim=1).repeat_interleave(K)
    else:
        std = nanstd(rewards).expand_as(rewards)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_equals_trl(scale):
    g = torch.Generator().manual_seed(1)
    rpf = torch.randn(6 * K, 3, generator=g)
    rpf[3, 1] = float("nan")           # one function declined one completion
    rpf[9, :] = float("nan")           # a completion nobody scored
    rpf[K:2 * K] = 1.0                 # a group without signal
    w = torch.tensor([1.0, 0.5, -2.0])
    cfg = AdvantageConfig(num_generations=K, advantage_estimator="grpo", scale_rewards=scale)
    out = compute_advantages(weighted_rewards(rpf, w), cfg)
    ref = _trl_grpo(rpf, w, scale)
    assert torch.allclose(out.advantages, ref, atol=TOL, rtol=0), (out.advantages - ref).abs().max()
    assert out.num_unscorable == 1 and out.advantages[9] == 0
    assert out.zero_std_groups.tolist() == [False, True, False, False, False, False]


def _loo(r: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(r)
    for i in range(r.numel()):
        g0 = i // K * K
        others = [r[j] for j in range(g0, g0 + K) if j != i]
        out[i] = r[i] - torch.stack(others).mean()
    return out


@pytest.mark.parametrize("scale", ["none", "group", "batch"])
def test_rloo_is_leave_one_out(scale):
    r = _rewards()
    cfg = AdvantageConfig(num_generations=K, advantage_estimator="rloo", scale_rewards=scale,
                          kl_in_reward=False)
    ref = _loo(r)
    if scale == "group":
        ref = ref / (r.view(-1, K).std(dim=1).repeat_interleave(K) + STD_EPS)
    elif scale == "batch":
        ref = ref / (r.std() + STD_EPS)
    out = compute_advantages(r, cfg).advantages
    assert torch.allclose(out, ref, atol=TOL, rtol=0), (out - ref).abs().max()


@pytest.mark.parametrize("scale", ["batch", "group", "none"])
def test_reinforce_plus_plus_scales_by_advantage_std(scale):
    r = _rewards(seed=3) * 3 + 1
    cfg = AdvantageConfig(num_generations=K, advantage_estimator="reinforce_plus_plus",
                          scale_rewards=scale, kl_in_reward=False)
    base = torch.stack([r[i] - r[i // K * K: i // K * K + K].mean() for i in range(r.numel())])
    if scale == "batch":
        ref = base / (base.std() + STD_EPS)  # std of the advantages, not of the rewards
        assert abs(base.std() - r.std()) > 0.1  # the two differ on this batch
    elif scale == "group":
        ref = base / (base.view(-1, K).std(dim=1).repeat_interleave(K) + STD_EPS)
    else:
        ref = base
    out = compute_advantages(r, cfg).advantages
    assert torch.allclose(out, ref, atol=TOL, rtol=0), (out - ref).abs().max()


def test_defaults_follow_ms_swift():
    assert AdvantageConfig(K).scale_rewards == "group" and AdvantageConfig(K).kl_in_reward is False
    c = AdvantageConfig(K, advantage_estimator="rloo")
    assert (c.scale_rewards, c.kl_in_reward) == ("none", True)
    c = AdvantageConfig(K, advantage_estimator="reinforce_plus_plus")
    assert (c.scale_rewards, c.kl_in_reward) == ("batch", True)
    assert not AdvantageConfig(K, advantage_estimator="rloo", beta=0.0).kl_enters_reward


def test_kl_in_reward_subtracts_beta_times_sequence_kl():
    g = torch.Generator().manual_seed(5)
    n, t = 2 * K, 7
    old, ref = torch.randn(n, t, generator=g), torch.randn(n, t, generator=g)
    mask = (torch.rand(n, t, generator=g) > 0.3).float()
    old_pad = old.masked_fill(mask == 0, -1e10)  # padding garbage must not leak in
    kl = sequence_kl_for_reward(old_pad, ref, mask)
    assert torch.allclose(kl, ((old - ref) * mask).sum(-1), atol=TOL)
    r = _rewards(n_groups=2)
    cfg = AdvantageConfig(K, advantage_estimator="rloo", beta=0.1)
    out = compute_advantages(r, cfg, kl_values=kl)
    assert torch.allclose(out.rewards, r - 0.1 * kl, atol=TOL)
    assert torch.allclose(out.advantages, _loo(r - 0.1 * kl), atol=TOL)
    with pytest.raises(ValueError, match="kl_in_reward"):
        compute_advantages(r, cfg)


def test_dynamic_sample_drops_groups_without_signal():
    r = _rewards(n_groups=4)
    r[3 * K:] = torch.tensor([1.0, float("nan"), 1.0, 1.0])  # equal among the scored ones
    ds = dynamic_sample(r, K)
    assert ds.num_dropped_groups == 2 and ds.kept_groups == [0, 2]
    assert ds.keep.tolist() == [True] * K + [False] * K + [True] * K + [False] * K
    # equality, not a std threshold: rewards 1e-7 apart still carry a (tiny) signal
    assert zero_std_groups(torch.tensor([1.0, 1.0, 1.0, 1.0 + 2e-7]), K).tolist() == [False]
    assert zero_std_groups(torch.tensor([0.25, 0.25, 0.25, 0.25]), K).tolist() == [True]


def test_dynamic_sample_buffer_resamples_then_tops_up():
    buf = DynamicSampleBuffer(target_groups=3, num_generations=2, max_resample_times=1)
    buf.add(torch.tensor([1.0, 0.0, 1.0, 1.0]), ["a", "b"])        # b has no signal
    assert buf.need_more
    buf.add(torch.tensor([0.0, 0.0, 0.0, 1.0]), ["c", "d"])        # c has no signal
    assert not buf.need_more                                         # retries used up
    groups, stats = buf.take()
    assert groups == ["a", "d", "b"]
    assert stats == {"dynamic_sample/dropped_groups": 2, "dynamic_sample/zero_std_groups_used": 1,
                     "dynamic_sample/rollouts": 2}
    buf = DynamicSampleBuffer(target_groups=1, num_generations=2)
    buf.add(torch.tensor([0.0, 1.0, 0.0, 2.0]), ["x", "y"])
    assert not buf.need_more and buf.take()[0] == ["x"]


def test_overlong_filter_masks_truncated_completions():
    mask = torch.ones(3, 4)
    mask[2, 3] = 0
    new, n = overlong_filter(mask, torch.tensor([False, True, False]))
    assert n == 1 and new[1].sum() == 0 and torch.equal(new[[0, 2]], mask[[0, 2]])
    with pytest.raises(ValueError, match="one flag per completion"):
        overlong_filter(mask, torch.tensor([True]))


def test_bad_input_names_the_flag():
    with pytest.raises(ValueError, match="--advantage_estimator 'ppo'"):
        AdvantageConfig(K, advantage_estimator="ppo")
    with pytest.raises(ValueError, match="--scale_rewards 'gdpo'"):
        AdvantageConfig(K, scale_rewards="gdpo")
    with pytest.raises(ValueError, match="--num_generations 1"):
        AdvantageConfig(1)
    with pytest.raises(ValueError, match="whole groups"):
        compute_advantages(torch.zeros(K + 1), AdvantageConfig(K))
    with pytest.raises(ValueError, match="--reward_weights has 2 values for 3"):
        weighted_rewards(torch.zeros(K, 3), [1.0, 1.0])
