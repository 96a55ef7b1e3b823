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

Rollout engines: ``--use_vllm false`` samples on the training model (the built-in engine);
``--use_vllm true --vllm_mode server`` asks an ``mvlm rollout`` server (ms-swift's ``swift
rollout``) at ``--vllm_server_host/--vllm_server_port`` or ``--vllm_server_base_url`` and pushes
the policy's weights to it after every optimizer step (:mod:`mvlm.rl.rollout.server_mode`).
``--vllm_mode colocate`` (ms-swift's default mode) runs a ``vllm.LLM`` inside every training
process, slept and woken around each update (:mod:`mvlm.rl.rollout.colocate`); it needs GPUs with
vLLM in the training environment and is refused with the reason elsewhere.
"""
from __future__ import annotations

import argparse
import os
import sys
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
                   help="false: generate with the built-in engine on the training model; true: "
                        "with vLLM (--vllm_mode)")
    add_vllm_args(p.add_argument_group("rollout (vLLM)"))
    return p


# Server-mode flags and their defaults; None in the parser = not given (a flag given without
# --use_vllm true --vllm_mode server is refused rather than ignored).
SERVER_DEFAULTS = {"vllm_server_host": ["127.0.0.1"], "vllm_server_port": [8000],
                   "vllm_server_base_url": None, "vllm_server_timeout": 240.0,
                   "weight_sync_bucket_mb": 512.0, "check_weight_sync": False}
# Flags of both vLLM modes (the weight sync), and of colocate mode only; None = not given.
SYNC_FLAGS = ("weight_sync_bucket_mb", "check_weight_sync")
COLOCATE_DEFAULTS = {"vllm_gpu_memory_utilization": 0.9, "vllm_max_model_len": None,
                     "sleep_level": 0, "offload_model": False, "offload_optimizer": False}


def add_vllm_args(p: argparse._ActionsContainer) -> None:
    """ms-swift's vLLM rollout flags (server mode) on ``p``."""
    a = p.add_argument
    a("--vllm_mode", default="colocate", choices=["server", "colocate"],
      help="server: an `mvlm rollout` server generates (ms-swift's `swift rollout`); colocate "
           "(ms-swift's default): vLLM inside every training process (GPUs only)")
    a("--vllm_server_host", nargs="+", default=None,
      help="the rollout server's host (one server; default 127.0.0.1)")
    a("--vllm_server_port", nargs="+", type=int, default=None,
      help="the rollout server's port (default 8000)")
    a("--vllm_server_base_url", nargs="+", default=None,
      help="http://HOST:PORT of the rollout server (instead of host and port)")
    a("--vllm_server_timeout", type=float, default=None,
      help="seconds to wait for the server at start-up (default 240)")
    a("--weight_sync_bucket_mb", type=float, default=None,
      help="weights travel to the server in buckets of at most this many MB (default 512)")
    a("--check_weight_sync", type=str2bool, nargs="?", const=True, default=None,
      help="after every sync, read the engine's weights back and compare (sha256) with what "
           "the trainer sent")
    a("--vllm_gpu_memory_utilization", type=float, default=None,
      help="colocate: fraction of each GPU vLLM may take (weights + KV cache; default 0.9, "
           "lower it to leave room for training)")
    a("--vllm_max_model_len", type=int, default=None,
      help="colocate: longest prompt + completion the engine serves (default: the model's)")
    a("--sleep_level", type=int, default=None, choices=[0, 1, 2],
      help="colocate: 0 keep vLLM awake; 1 sleep it after each rollout (weights to CPU RAM, KV "
           "cache freed); 2 free its weights too (synced again at every wake-up). Default 0")
    a("--offload_model", type=str2bool, nargs="?", const=True, default=None,
      help="colocate: move the trainer's parameters and gradients to CPU during rollouts")
    a("--offload_optimizer", type=str2bool, nargs="?", const=True, default=None,
      help="colocate: move the optimizer state to CPU during rollouts")


def _one(ns: argparse.Namespace, flag: str):
    v = getattr(ns, flag)
    if v is None:
        return SERVER_DEFAULTS[flag][0] if isinstance(SERVER_DEFAULTS[flag], list) else None
    if len(v) != 1:
        raise ValueError(f"--{flag} {' '.join(map(str, v))}: mvlm trains against one rollout "
                         "server; give one value (start it with `mvlm rollout "
                         "--vllm_data_parallel_size N` for N engines behind it)")
    return v[0]


def server_config(ns: argparse.Namespace) -> Any:
    """:class:`VLLMServerConfig` from the server-mode flags (errors name the flag)."""
    from mvlm.rl.rollout.vllm_server import VLLMServerConfig

    def val(flag: str):
        v = getattr(ns, flag)
        return SERVER_DEFAULTS[flag] if v is None else v

    return VLLMServerConfig(
        vllm_server_host=_one(ns, "vllm_server_host"),
        vllm_server_port=int(_one(ns, "vllm_server_port")),
        vllm_server_base_url=_one(ns, "vllm_server_base_url"),
        vllm_server_timeout=float(val("vllm_server_timeout")),
        weight_sync_bucket_mb=float(val("weight_sync_bucket_mb")),
        check_weight_sync=bool(val("check_weight_sync")))


def colocate_config(ns: argparse.Namespace, seed: int = 42) -> Any:
    """:class:`ColocateConfig` from the colocate flags (errors name the flag)."""
    from mvlm.rl.rollout.colocate import ColocateConfig

    def val(flag: str, defaults: dict):
        v = getattr(ns, flag)
        return defaults[flag] if v is None else v

    return ColocateConfig(
        vllm_gpu_memory_utilization=float(val("vllm_gpu_memory_utilization", COLOCATE_DEFAULTS)),
        vllm_max_model_len=val("vllm_max_model_len", COLOCATE_DEFAULTS),
        sleep_level=int(val("sleep_level", COLOCATE_DEFAULTS)),
        offload_model=bool(val("offload_model", COLOCATE_DEFAULTS)),
        offload_optimizer=bool(val("offload_optimizer", COLOCATE_DEFAULTS)),
        weight_sync_bucket_mb=float(val("weight_sync_bucket_mb", SERVER_DEFAULTS)),
        check_weight_sync=bool(val("check_weight_sync", SERVER_DEFAULTS)), seed=seed)


def grpo_objective(ns: argparse.Namespace, seed: int = 0) -> Any:
    """The objective from parsed GRPO flags (validation errors name the flag)."""
    from mvlm.rl.flags import grpo_configs
    from mvlm.rl.rollout.flags import sampling_params
    from mvlm.train.objectives.grpo import GRPOObjective

    server = ns.use_vllm and ns.vllm_mode == "server"
    colocate = ns.use_vllm and ns.vllm_mode == "colocate"
    given = [f"--{k}" for k in SYNC_FLAGS if getattr(ns, k) is not None]
    if given and not ns.use_vllm:
        raise ValueError(f"{' '.join(given)}: weight-sync flags of a vLLM engine, used only with "
                         "--use_vllm true (either --vllm_mode); add that or drop these")
    given = [f"--{k}" for k in SERVER_DEFAULTS
             if getattr(ns, k) is not None and k not in SYNC_FLAGS]
    if given and not server:
        raise ValueError(f"{' '.join(given)}: server-mode flags, used only with --use_vllm true "
                         "--vllm_mode server (an `mvlm rollout` server); add those or drop these")
    given = [f"--{k}" for k in COLOCATE_DEFAULTS if getattr(ns, k) is not None]
    if given and not colocate:
        raise ValueError(f"{' '.join(given)}: colocate-mode flags, used only with --use_vllm "
                         "true --vllm_mode colocate; add those or drop these")
    factory = None
    if server:
        from mvlm.rl.rollout.server_mode import server_engine_factory

        factory = server_engine_factory(server_config(ns))
    if colocate:
        from mvlm.rl.rollout.colocate import colocate_engine_factory, colocate_unavailable

        cfg = colocate_config(ns, seed=seed)  # flag errors first, then the machine's
        why = colocate_unavailable()
        if why:
            raise ValueError(why)
        factory = colocate_engine_factory(cfg)
    cfgs = grpo_configs(ns, num_generations=ns.num_generations,
                        max_completion_length=ns.max_completion_length)
    return GRPOObjective(cfgs, sampling_params(ns), num_iterations=ns.num_iterations,
                         engine_seed=seed, engine_factory=factory)


def run_grpo(argv: list[str]) -> int:
    """Parse, then train; returns the exit code."""
    from mvlm.train.args import parse_train_args
    from mvlm.train.trainer import train

    ns, rest = grpo_parser().parse_known_args(argv)
    cfg = parse_train_args(rest, "sft")
    cfg.task = "rlhf"
    cfg.data.task = "rl"
    objective = grpo_objective(ns, seed=cfg.seed)  # validated before any process group
    from mvlm.rl.rollout.colocate import ColocateError
    from mvlm.rl.rollout.vllm_server import RolloutServerError

    try:
        return train(cfg, objective).exit_code
    except (RolloutServerError, ColocateError) as e:  # the same text on every rank: say it once
        if os.environ.get("RANK", "0") == "0":
            print(f"mvlm rlhf: error: {e}", file=sys.stderr, flush=True)
        return 1
