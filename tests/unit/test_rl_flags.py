"""mvlm.rl.flags: the GRPO flags of the guide's scripts (sections 5.3 / 8.2) parse into the
configs with ms-swift's defaults; the module stays light (no torch) for ``--help``."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from mvlm.rl.flags import add_grpo_args, grpo_configs


def _parse(*argv: str):
    p = argparse.ArgumentParser(allow_abbrev=False)
    add_grpo_args(p)
    return p.parse_args(list(argv))


def test_guide_grpo_flags():
    ns = _parse("--external_plugins", "examples/train/grpo/plugin/plugin.py",
                "--reward_funcs", "external_r1v_acc", "format", "--beta", "0.001")
    c = grpo_configs(ns, num_generations=8, max_completion_length=1024)
    assert c.rewards.reward_funcs == ["external_r1v_acc", "format"]
    assert c.rewards.external_plugins == ["examples/train/grpo/plugin/plugin.py"]
    assert (c.loss.beta, c.advantages.beta) == (0.001, 0.001)
    assert (c.loss.loss_type, c.loss.epsilon, c.loss.epsilon_high) == ("grpo", 0.2, 0.2)
    assert (c.advantages.scale_rewards, c.advantages.kl_in_reward) == ("group", False)
    assert c.loss.kl_in_loss and c.rewards.cosine_max_len == 1024
    assert not (c.dynamic_sample or c.overlong_filter) and c.max_logprob_mismatch is None


def test_dapo_rloo_and_gspo_flags():
    ns = _parse("--advantage_estimator", "rloo", "--loss_type", "dapo", "--epsilon_high", "0.28",
                "--dynamic_sample", "--overlong_filter", "true", "--importance_sampling_level",
                "sequence_token", "--rollout_importance_sampling_mode", "sequence_mask",
                "--rollout_importance_sampling_threshold", "3", "--reward_funcs", "accuracy",
                "soft_overlong", "--soft_cache_length", "64", "--reward_weights", "1", "0.5",
                "--max_logprob_mismatch", "1.0001")
    c = grpo_configs(ns, num_generations=4, max_completion_length=256)
    assert (c.advantages.scale_rewards, c.advantages.kl_in_reward) == ("none", True)
    assert c.loss.kl_in_reward and not c.loss.kl_in_loss  # rloo: KL goes into the reward
    assert (c.loss.epsilon_high, c.loss.importance_sampling_level) == (0.28, "sequence_token")
    assert c.loss.rollout_importance_sampling_threshold == 3.0
    assert c.dynamic_sample and c.overlong_filter and c.max_logprob_mismatch == 1.0001
    assert (c.rewards.soft_max_length, c.rewards.soft_cache_length) == (256, 64)
    assert c.rewards.reward_weights == [1.0, 0.5]
    c = grpo_configs(_parse("--advantage_estimator", "rloo", "--kl_in_reward", "false"),
                     num_generations=4, max_completion_length=256)
    assert c.loss.kl_in_loss


def test_bad_values_name_the_flag():
    with pytest.raises(ValueError, match="--max_logprob_mismatch 0.5"):
        grpo_configs(_parse("--max_logprob_mismatch", "0.5"), num_generations=2,
                     max_completion_length=8)
    with pytest.raises(ValueError, match="--loss_type cispo .*--epsilon_high"):
        grpo_configs(_parse("--loss_type", "cispo"), num_generations=2, max_completion_length=8)
    with pytest.raises(ValueError, match="--num_generations 1"):
        grpo_configs(_parse(), num_generations=1, max_completion_length=8)
    with pytest.raises(SystemExit):
        _parse("--scale_rewards", "gdpo")


def test_flags_module_does_not_import_torch():
    code = "import sys, mvlm.rl.flags; sys.exit(int('torch' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
