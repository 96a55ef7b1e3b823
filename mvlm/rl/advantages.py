"""Group-relative advantages for the GRPO family, DAPO's dynamic sampling and overlong filter.

Why a module of its own: the advantage is the only place where completions of one prompt meet, so
it must see the rewards of the WHOLE rollout batch (gathered over DP ranks) and nothing of the
model. The objective gathers the rewards, calls :func:`compute_advantages` once, and hands each
rank its slice; every function here is deterministic tensor code.

Rows are ordered group by group: completions ``g*K .. g*K+K-1`` belong to prompt ``g``, ``K`` =
``--num_generations`` (the order the rollout engine returns them in).

Estimators (``--advantage_estimator``, ms-swift's names and defaults):

* ``grpo``: ``A = r - mean_group(r)``; default ``--scale_rewards group``.
* ``rloo``: leave-one-out baseline, ``A = r - mean(other rewards of the group)``
  ``= K/(K-1) * (r - mean_group(r))``; default ``--scale_rewards none``.
* ``reinforce_plus_plus`` (REINFORCE++ baseline): ``A = r - mean_group(r)`` then divided by the
  std of the ADVANTAGES (over the batch by default, ``--scale_rewards batch``); grpo/rloo divide
  by the std of the rewards.

``--scale_rewards group|batch|none`` divides by ``std + 1e-4`` (the epsilon TRL and ms-swift use);
std is the unbiased (Bessel-corrected) one, as in both. ``--kl_in_reward`` (default on for
rloo/reinforce_plus_plus, off for grpo, as in ms-swift) subtracts ``beta * KL(old || ref)`` summed
over each completion from its reward before the baseline, instead of a KL term in the loss.

A completion every reward function declined to score (all NaN: a function returned ``None``, or
``--on_reward_error skip`` dropped its call) carries no signal: it is left out of its group's mean
and std and gets advantage 0, as in TRL.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce_plus_plus")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL's and ms-swift's epsilon in A / (std + eps)

_DEFAULT_SCALE = {"grpo": "group", "rloo": "none", "reinforce_plus_plus": "batch"}
_DEFAULT_KL_IN_REWARD = {"grpo": False, "rloo": True, "reinforce_plus_plus": True}


@dataclass
class AdvantageConfig:
    """The flags that shape advantages (ms-swift names); ``None`` means the estimator's default."""

    num_generations: int
    advantage_estimator: str = "grpo"
    scale_rewards: str | None = None
    kl_in_reward: bool | None = None
    beta: float = 0.04

    def __post_init__(self) -> None:
        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"--advantage_estimator {self.advantage_estimator!r}: choose one of "
                             f"{', '.join(ADVANTAGE_ESTIMATORS)}")
        if self.scale_rewards is None:
            self.scale_rewards = _DEFAULT_SCALE[self.advantage_estimator]
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"--scale_rewards {self.scale_rewards!r}: choose one of "
                             f"{', '.join(SCALE_REWARDS)}")
        if self.kl_in_reward is None:
            self.kl_in_reward = _DEFAULT_KL_IN_REWARD[self.advantage_estimator]
        if self.num_generations < 2:
            raise ValueError(f"--num_generations {self.num_generations}: a group needs at least 2 "
                             "completions, otherwise every advantage is 0 (pass 2 or more)")

    @property
    def kl_enters_reward(self) -> bool:
        """True when the KL is a reward penalty (then the loss must not add it a second time)."""
        return bool(self.kl_in_reward) and self.beta != 0.0


@dataclass
class Advantages:
    """What :func:`compute_advantages` returns (all ``[N]`` unless said)."""

    advantages: torch.Tensor
    rewards: torch.Tensor          # the rewards the baseline saw (after the KL penalty, if any)
    zero_std_groups: torch.Tensor  # [N/K] bool: all scored completions of the group scored equal
    num_unscorable: int            # completions no reward function scored (advantage 0)

    @property
    def frac_reward_zero_std(self) -> float:
        return float(self.zero_std_groups.float().mean())


def weighted_rewards(rewards_per_func: torch.Tensor, reward_weights: Sequence[float] | torch.Tensor
                     ) -> torch.Tensor:
    """``[N, F]`` per-function rewards -> ``[N]`` weighted sum; NaN (not scored) counts as 0,
    a row with no score at all stays NaN (unscorable)."""
    rpf = rewards_per_func
    w = torch.as_tensor(reward_weights, dtype=rpf.dtype, device=rpf.device)
    if rpf.dim() != 2 or w.numel() != rpf.shape[1]:
        raise ValueError(f"--reward_weights has {w.numel()} values for {rpf.shape[-1]} "
                         "reward functions: give one weight per reward function")
    total = (rewards_per_func * w).nansum(dim=1)
    return total.masked_fill(torch.isnan(rewards_per_func).all(dim=1), float("nan"))


def sequence_kl_for_reward(old_logps: torch.Tensor, ref_logps: torch.Tensor,
                           completion_mask: torch.Tensor) -> torch.Tensor:
    """``KL(old || ref)`` of each completion, summed over its tokens (k1 estimator), for
    ``--kl_in_reward``: ``sum_t (log pi_old - log pi_ref)``."""
    m = completion_mask.to(old_logps.dtype)
    return ((old_logps - ref_logps).masked_fill(m == 0, 0.0) * m).sum(dim=-1)


def _group_stats(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NaN-aware per-group mean, unbiased std and count, each broadcast back to ``[N]``."""
    g = x.view(-1, k)
    valid = ~torch.isnan(g)
    cnt = valid.sum(dim=1, keepdim=True).to(x.dtype)
    mean = torch.where(valid, g, torch.zeros_like(g)).sum(dim=1, keepdim=True) / cnt
    dev = torch.where(valid, g - mean, torch.zeros_like(g))
    std = (dev.pow(2).sum(dim=1, keepdim=True) / (cnt - 1)).sqrt()
    std = torch.where(cnt > 1, std, torch.full_like(std, float("nan")))
    return (mean.expand_as(g).reshape(-1), std.expand_as(g).reshape(-1),
            cnt.expand_as(g).reshape(-1))


def _batch_std(x: torch.Tensor) -> torch.Tensor:
    v = x[~torch.isnan(x)]
    if v.numel() < 2:
        return torch.full_like(x, float("nan"))
    return v.std().expand_as(x)


def zero_std_groups(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """``[N/K]`` bool: groups whose scored completions all got exactly the same reward (no
    learning signal). Exact equality, not a std threshold: equal rewards carry no signal."""
    g = rewards.view(-1, num_generations)
    valid = ~torch.isnan(g)
    hi = torch.where(valid, g, torch.full_like(g, -float("inf"))).amax(dim=1)
    lo = torch.where(valid, g, torch.full_like(g, float("inf"))).amin(dim=1)
    return (hi == lo) | (valid.sum(dim=1) < 2)


def compute_advantages(rewards: torch.Tensor, cfg: AdvantageConfig,
                       kl_values: torch.Tensor | None = None) -> Advantages:
    """Advantages of a whole rollout batch.

    ``rewards``: ``[N]`` weighted rewards (:func:`weighted_rewards`), gathered over all ranks,
    grouped by prompt. ``kl_values``: ``[N]`` from :func:`sequence_kl_for_reward`, required when
    ``cfg.kl_enters_reward``.
    """
    k = cfg.num_generations
    if rewards.dim() != 1 or rewards.numel() % k:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of "
                         f"--num_generations {k}: the rollout batch must hold whole groups")
    zero = zero_std_groups(rewards, k)
    if cfg.kl_enters_reward:
        if kl_values is None or kl_values.shape != rewards.shape:
            raise ValueError("--kl_in_reward with --beta != 0 needs the per-completion KL "
                             "(sequence_kl_for_reward) for every completion")
        rewards = rewards - cfg.beta * kl_values
    mean, std_r, cnt = _group_stats(rewards, k)
    base = rewards - mean
    if cfg.advantage_estimator == "rloo":
        base = torch.where(cnt > 1, base * cnt / (cnt - 1), base)
    if cfg.scale_rewards == "none":
        adv = base
    else:
        of = base if cfg.advantage_estimator == "reinforce_plus_plus" else rewards
        std = _group_stats(of, k)[1] if cfg.scale_rewards == "group" else _batch_std(of)
        adv = base / (std + STD_EPS)
    unscorable = torch.isnan(rewards)
    adv = torch.nan_to_num(adv, nan=0.0)  # unscorable rows, and groups with a single score
    return Advantages(advantages=adv, rewards=rewards, zero_std_groups=zero,
                      num_unscorable=int(unscorable.sum()))


# --------------------------------------------------------------------------- DAPO

@dataclass
class DynamicSample:
    """Result of :func:`dynamic_sample`: which completions to keep."""

    keep: torch.Tensor        # [N] bool
    kept_groups: list[int]
    num_dropped_groups: int


def dynamic_sample(rewards: torch.Tensor, num_generations: int) -> DynamicSample:
    """DAPO ``--dynamic_sample``: drop the groups whose rewards are all equal (their advantages
    are 0, they would only dilute the loss). ``rewards`` are the weighted function rewards
    (before any KL penalty), as ms-swift's filter sees them."""
    zero = zero_std_groups(rewards, num_generations)
    keep_g = ~zero
    return DynamicSample(keep=keep_g.repeat_interleave(num_generations),
                         kept_groups=keep_g.nonzero().flatten().tolist(),
                         num_dropped_groups=int(zero.sum()))


@dataclass
class DynamicSampleBuffer:
    """Collects groups with signal over up to ``1 + max_resample_times`` rollouts (DAPO).

    The objective rolls out a batch, calls :meth:`add`, and rolls out again while
    :attr:`need_more`. :meth:`take` returns exactly ``target_groups`` group payloads: the groups
    with signal first; when the retries run out it tops up with zero-signal groups from the
    earliest batches (their advantage is 0) so every step keeps its batch shape, and reports how
    many it had to use (ms-swift falls back to the whole first batch in that case).
    """

    target_groups: int
    num_generations: int
    max_resample_times: int = 3
    attempts: int = 0
    num_dropped_groups: int = 0
    _kept: list[Any] = field(default_factory=list)
    _spare: list[Any] = field(default_factory=list)

    def add(self, rewards: torch.Tensor, groups: Sequence[Any]) -> None:
        """``rewards``: ``[len(groups) * K]``; ``groups``: one payload per group, in order."""
        if rewards.numel() != len(groups) * self.num_generations:
            raise ValueError(f"{rewards.numel()} rewards for {len(groups)} groups of "
                             f"--num_generations {self.num_generations}")
        ds = dynamic_sample(rewards, self.num_generations)
        kept = set(ds.kept_groups)
        for i, g in enumerate(groups):
            (self._kept if i in kept else self._spare).append(g)
        self.num_dropped_groups += ds.num_dropped_groups
        self.attempts += 1

    @property
    def need_more(self) -> bool:
        return len(self._kept) < self.target_groups and self.attempts <= self.max_resample_times

    def take(self) -> tuple[list[Any], dict[str, int]]:
        short = max(0, self.target_groups - len(self._kept))
        out = self._kept[: self.target_groups] + self._spare[:short]
        if len(out) < self.target_groups:
            raise ValueError(f"dynamic sampling collected {len(out)} groups, "
                             f"{self.target_groups} are needed: add() whole rollout batches")
        return out, {"dynamic_sample/dropped_groups": self.num_dropped_groups,
                     "dynamic_sample/zero_std_groups_used": short,
                     "dynamic_sample/rollouts": self.attempts}


def overlong_filter(completion_mask: torch.Tensor, truncated: torch.Tensor
                    ) -> tuple[torch.Tensor, int]:
    """DAPO ``--overlong_filter``: completions cut at ``--max_completion_length`` (no EOS) leave
    the loss entirely; returns the new mask and how many completions were masked. Apply it BEFORE
    counting the loss's global denominators, so they count only tokens that are trained on."""
    if truncated.shape != completion_mask.shape[:1]:
        raise ValueError(f"truncated has shape {tuple(truncated.shape)}, expected "
                         f"({completion_mask.shape[0]},): one flag per completion")
    t = truncated.to(torch.bool)
    return completion_mask * (~t).unsqueeze(-1).to(completion_mask.dtype), int(t.sum())
