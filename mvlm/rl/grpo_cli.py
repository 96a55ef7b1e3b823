"""`mvlm rlhf --rlhf_type grpo ...`: GRPO-family training with ms-swift's command line.

    mvlm rlhf --rlhf_type grpo --model Qwen/Qwen2.5-0.5B-Instruct --dataset prompts.jsonl \\
        --reward_funcs accuracy format --num_generations 8 --max_completion_length 512 \\
        --temperature 0.9 --beta 0.04 --num_iterations 1 --use_vllm false ...

GRPO's flags share names with DPO's (``--beta``, ``--loss_type``) but not their meaning or
choices, so a GRPO command line is parsed here, apart from the preference methods: the method
flags (:func:`mvlm.rl.flags.add_grpo_args`), the sampling flags
(:func:`mvlm.rl.rollout.flags.add_rollout_args`), ``--num_iterations`` and ``--use_vllm`` are
read first; everything else is `mvlm sft`'s command line with the data task ``rl`` (rows are
prompts; a final assistant turn is kept as the ``response`` column). The run is the ordinary
Trainer with :class:`mvlm.train.objectives.grpo.GRPOObjective`.
"""
from __future__ import annotations

import argparse
from typing import Any

from mvlm.data.flags import str2bool
from mvlm.rl.flags import add_grpo_args
from mvlm.rl.rollout.flags import add_rollout_args


def grpo_parser() -> argparse.ArgumentParser:
    """The flags `mvlm rlhf --rlhf_type grpo` reads before `mvlm sft`'s (light: no torch)."""
    p = argparse.ArgumentParser(prog="mvlm rlhf --rlhf_type grpo", add_help=False,
                                allow_abbrev=False)
    p.add_argument("--rlhf_type", default="grpo")
    add_grpo_args(p.add_argument_group("GRPO"))
    add_rollout_args(p.add_argument_group("rollout (built-in engine)"))
    p.add_argument("--num_iterations", type=int, default=1,
                   help="optimizer steps per rollout batch (clipped ratio to the rollout policy)")
    p.add_argument("--use_vllm", type=str2bool, nargs="?", const=True, default=False,
                   help="false: generate with the built-in engine on the training model")
    return p


def grpo_objective(ns: argparse.Namespace, seed: int = 0) -> Any:
    """The objective from parsed GRPO flags (validation errors name the flag)."""
    from mvlm.rl.flags import grpo_configs
    from mvlm.rl.rollout.flags import sampling_params
    from mvlm.train.objectives.grpo import GRPOObjective

    if ns.use_vllm:
        raise ValueError("--use_vllm true: the vLLM rollout engines are not wired into mvlm rlhf "
                         "yet; pass --use_vllm false (the built-in engine)")
    cfgs = grpo_configs(ns, num_generations=ns.num_generations,
                        max_completion_length=ns.max_completion_length)
    return GRPOObjective(cfgs, sampling_params(ns), num_iterations=ns.num_iterations,
                         engine_seed=seed)


def run_grpo(argv: list[str]) -> int:
    """Parse, then train; returns the exit code."""
    from mvlm.train.args import parse_train_args
    from mvlm.train.trainer import train

    ns, rest = grpo_parser().parse_known_args(argv)
    cfg = parse_train_args(rest, "sft")
    cfg.task = "rlhf"
    cfg.data.task = "rl"
    objective = grpo_objective(ns, seed=cfg.seed)  # validated before any process group
    return train(cfg, objective).exit_code
