"""The GRPO algorithm and reward flags (ms-swift names and defaults) and the configs they build.

Light on purpose (argparse only; the configs' modules, which import torch, are imported inside
:func:`grpo_configs`), so ``mvlm rlhf --help`` stays fast. Sampling flags (``--num_generations``,
``--max_completion_length``, ``--temperature``, ...) belong to the rollout engine's parser and are
passed in to :func:`grpo_configs`.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mvlm.data.flags import str2bool

if TYPE_CHECKING:
    from mvlm.rl.advantages import AdvantageConfig
    from mvlm.rl.chord import ChordConfig
    from mvlm.rl.grpo_loss import GRPOLossConfig
    from mvlm.rl.rewards import RewardConfig


def _opt_float(v: str) -> float | None:
    return None if str(v).strip().lower() == "none" else float(v)


def _opt_bool(v: str) -> bool | None:
    return None if str(v).strip().lower() == "none" else str2bool(v)


def add_grpo_args(p: argparse._ActionsContainer) -> None:
    """Register the GRPO-family flags on ``p`` (a parser or an argument group)."""
    a = p.add_argument
    a("--loss_type", default="grpo",
      choices=["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"],
      help="how per-token losses are averaged (global counts across micro-batches and DP)")
    a("--beta", type=float, default=0.04, help="KL coefficient (k3); 0 = no reference model")
    a("--epsilon", type=float, default=0.2, help="lower clip: ratio >= 1 - epsilon")
    a("--epsilon_high", type=_opt_float, default=None,
      help="upper clip 1 + epsilon_high (default epsilon); cispo: the ratio cap itself")
    a("--importance_sampling_level", default="token",
      choices=["token", "sequence", "sequence_token"], help="token, GSPO or GSPO-token ratios")
    a("--tau_pos", type=float, default=1.0, help="SAPO gate temperature for A > 0")
    a("--tau_neg", type=float, default=1.05, help="SAPO gate temperature for A <= 0")
    a("--advantage_estimator", default="grpo", choices=["grpo", "rloo", "reinforce_plus_plus"])
    a("--scale_rewards", default=None, choices=["group", "batch", "none"],
      help="advantage scaling (default: group for grpo, none for rloo, batch for reinforce++)")
    a("--kl_in_reward", type=_opt_bool, default=None,
      help="KL as a reward penalty instead of a loss term (default: true for rloo/reinforce++)")
    a("--dynamic_sample", type=str2bool, nargs="?", const=True, default=False,
      help="DAPO: drop groups whose rewards are all equal and roll out again")
    a("--max_resample_times", type=int, default=3, help="DAPO: extra rollouts per step at most")
    a("--overlong_filter", type=str2bool, nargs="?", const=True, default=False,
      help="DAPO: truncated completions (no EOS) get no loss")
    a("--rollout_importance_sampling_mode", default=None,
      choices=["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"],
      help="correct for the rollout engine's sampling distribution")
    a("--rollout_importance_sampling_threshold", type=float, default=2.0,
      help="upper bound of the rollout importance weight")
    a("--max_logprob_mismatch", type=_opt_float, default=None,
      help="stop when token_mult_prob_error (mean exp|dlogp| engine vs trainer) exceeds this")
    a("--reward_funcs", nargs="+", default=[],
      help="accuracy format cosine repetition soft_overlong, or names from --external_plugins")
    a("--reward_model", nargs="+", default=[],
      help="reward model dirs (mvlm rlhf --rlhf_type rm exports), scored after --reward_funcs")
    a("--reward_weights", nargs="+", type=float, default=None,
      help="one per reward function, then one per --reward_model")
    a("--external_plugins", nargs="+", default=[], help="python files registering orms[...]")
    a("--on_reward_error", default="raise", choices=["raise", "skip"],
      help="a reward function that raises / returns bad values: stop, or count and skip")
    a("--cosine_min_len_value_wrong", type=float, default=-0.5)
    a("--cosine_max_len_value_wrong", type=float, default=0.0)
    a("--cosine_min_len_value_correct", type=float, default=1.0)
    a("--cosine_max_len_value_correct", type=float, default=0.5)
    a("--cosine_max_len", type=int, default=None, help="default --max_completion_length")
    a("--repetition_n_grams", type=int, default=3)
    a("--repetition_max_penalty", type=float, default=-1.0)
    a("--soft_max_length", type=int, default=None, help="default --max_completion_length")
    a("--soft_cache_length", type=int, default=None)
    a("--chord_sft_dataset", nargs="+", default=[],
      help="CHORD: expert SFT data whose loss is mixed into the GRPO loss")
    a("--chord_sft_per_device_train_batch_size", type=int, default=None)
    a("--chord_enable_phi_function", type=str2bool, nargs="?", const=True, default=False,
      help="CHORD-phi: weight expert tokens by p * (1 - p)")
    a("--chord_mu_warmup_steps", type=int, default=0)
    a("--chord_mu_decay_steps", type=int, default=0)
    a("--chord_mu_peak", type=_opt_float, default=None)
    a("--chord_mu_valley", type=_opt_float, default=None)


@dataclass
class GRPOConfigs:
    advantages: AdvantageConfig
    loss: GRPOLossConfig
    rewards: RewardConfig
    chord: ChordConfig
    dynamic_sample: bool
    max_resample_times: int
    overlong_filter: bool
    max_logprob_mismatch: float | None


def grpo_configs(ns: Any, *, num_generations: int, max_completion_length: int) -> GRPOConfigs:
    """Validated configs from parsed flags (errors name the flag)."""
    from mvlm.rl.advantages import AdvantageConfig
    from mvlm.rl.chord import ChordConfig
    from mvlm.rl.grpo_loss import GRPOLossConfig
    from mvlm.rl.rewards import RewardConfig

    adv = AdvantageConfig(num_generations=num_generations,
                          advantage_estimator=ns.advantage_estimator,
                          scale_rewards=ns.scale_rewards, kl_in_reward=ns.kl_in_reward,
                          beta=ns.beta)
    loss = GRPOLossConfig(
        loss_type=ns.loss_type, epsilon=ns.epsilon, epsilon_high=ns.epsilon_high, beta=ns.beta,
        kl_in_reward=bool(adv.kl_in_reward), importance_sampling_level=ns.importance_sampling_level,
        tau_pos=ns.tau_pos, tau_neg=ns.tau_neg,
        rollout_importance_sampling_mode=ns.rollout_importance_sampling_mode,
        rollout_importance_sampling_threshold=ns.rollout_importance_sampling_threshold,
        max_completion_length=max_completion_length)
    rew = RewardConfig(
        reward_funcs=list(ns.reward_funcs), reward_weights=ns.reward_weights,
        reward_model=list(getattr(ns, "reward_model", None) or []),
        external_plugins=list(ns.external_plugins), on_reward_error=ns.on_reward_error,
        max_completion_length=max_completion_length,
        cosine_min_len_value_wrong=ns.cosine_min_len_value_wrong,
        cosine_max_len_value_wrong=ns.cosine_max_len_value_wrong,
        cosine_min_len_value_correct=ns.cosine_min_len_value_correct,
        cosine_max_len_value_correct=ns.cosine_max_len_value_correct,
        cosine_max_len=ns.cosine_max_len, repetition_n_grams=ns.repetition_n_grams,
        repetition_max_penalty=ns.repetition_max_penalty, soft_max_length=ns.soft_max_length,
        soft_cache_length=ns.soft_cache_length)
    if ns.max_resample_times < 0:
        raise ValueError(f"--max_resample_times {ns.max_resample_times} must be >= 0")
    if ns.max_logprob_mismatch is not None and ns.max_logprob_mismatch < 1.0:
        raise ValueError(f"--max_logprob_mismatch {ns.max_logprob_mismatch}: token_mult_prob_error "
                         "is a mean of exp|dlogp| >= 1 (1 = exact agreement); pass e.g. 1.0001")
    chord = ChordConfig(
        chord_sft_dataset=list(ns.chord_sft_dataset),
        chord_sft_per_device_train_batch_size=ns.chord_sft_per_device_train_batch_size,
        chord_enable_phi_function=ns.chord_enable_phi_function,
        chord_mu_warmup_steps=ns.chord_mu_warmup_steps,
        chord_mu_decay_steps=ns.chord_mu_decay_steps, chord_mu_peak=ns.chord_mu_peak,
        chord_mu_valley=ns.chord_mu_valley)
    return GRPOConfigs(advantages=adv, loss=loss, rewards=rew, chord=chord,
                       dynamic_sample=ns.dynamic_sample,
                       max_resample_times=ns.max_resample_times,
                       overlong_filter=ns.overlong_filter,
                       max_logprob_mismatch=ns.max_logprob_mismatch)
