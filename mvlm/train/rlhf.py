"""`mvlm rlhf --rlhf_type dpo|cpo|simpo|orpo|kto|rm ...`: preference training, ms-swift flags.

    NPROC_PER_NODE=4 mvlm rlhf --rlhf_type dpo --model Qwen/Qwen2.5-VL-7B-Instruct \\
        --dataset preference_data.jsonl --train_type lora --lora_rank 64 --beta 0.1 \\
        --label_smoothing 0.01 --dpo_loss_type sigmoid --num_train_epochs 2 \\
        --per_device_train_batch_size 2 --learning_rate 5e-6 --output_dir output/dpo_vlm

The method flags (``--rlhf_type`` and the DPO flags of :mod:`mvlm.train.preference_flags`) are
read first; everything else is `mvlm sft`'s command line (model, data, parallelism, tuners,
schedule, export), parsed by :func:`mvlm.train.args.parse_train_args`, with the data's label mode
set to ``preference`` (rows are pairs: :mod:`mvlm.data.preference`). The run is the ordinary
Trainer with the method's objective (:class:`mvlm.train.objectives.dpo.DPOObjective`).

Methods are looked up in :data:`RLHF_METHODS` (``--rlhf_type`` -> runner); a method whose
objective is not wired is refused with the list of those that are.
"""
from __future__ import annotations

import argparse
import importlib
from typing import Any

from mvlm.train.preference_flags import add_cpo_args, add_dpo_args, add_kto_args, add_rm_args

# --rlhf_type -> "module:function(method_ns, train_argv) -> exit code"
RLHF_METHODS: dict[str, str] = {"dpo": "mvlm.train.rlhf:run_dpo",
                                "cpo": "mvlm.train.rlhf:run_cpo",
                                "simpo": "mvlm.train.rlhf:run_simpo",
                                "orpo": "mvlm.train.rlhf:run_orpo",
                                "kto": "mvlm.train.rlhf:run_kto",
                                "rm": "mvlm.train.rlhf:run_rm"}


def method_parser() -> argparse.ArgumentParser:
    """The flags `mvlm rlhf` reads before `mvlm sft`'s (light: no torch)."""
    p = argparse.ArgumentParser(prog="mvlm rlhf", add_help=False, allow_abbrev=False)
    p.add_argument("--rlhf_type", default="dpo",
                   help=f"preference method: {', '.join(sorted(RLHF_METHODS))}")
    add_dpo_args(p.add_argument_group("DPO (--rlhf_type dpo; --beta, --loss_type and "
                                      "--label_smoothing also for cpo / simpo, --beta for orpo)"))
    add_cpo_args(p.add_argument_group("CPO / SimPO (--rlhf_type cpo | simpo)"))
    add_kto_args(p.add_argument_group("KTO (--rlhf_type kto; rows with 'label': true | false; "
                                      "--beta, --loss_type kto | apo_zero_unpaired, "
                                      "--ref_model as DPO)"))
    add_rm_args(p.add_argument_group("Reward model (--rlhf_type rm; chosen/rejected pairs; "
                                     "export: mvlm.train.reward_export)"))
    return p


def print_help() -> None:
    from mvlm.rl.grpo_cli import grpo_parser
    from mvlm.train.args import build_parser

    print(method_parser().format_help())
    print(grpo_parser().format_help())
    print(build_parser("sft").format_help().replace("mvlm sft", "mvlm rlhf", 1))


def split_argv(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(method flags, the rest: `mvlm sft`'s command line)."""
    ns, rest = method_parser().parse_known_args(argv)
    if ns.rlhf_type not in RLHF_METHODS:
        raise ValueError(f"--rlhf_type {ns.rlhf_type}: mvlm rlhf runs "
                         f"{', '.join(sorted(RLHF_METHODS))} and grpo")
    return ns, rest


def run_rlhf(argv: list[str]) -> int:
    """Parse, then train with the method's runner; returns the exit code."""
    if _is_grpo(argv):  # GRPO's flags share names with DPO's, not meanings: mvlm.rl.grpo_cli
        from mvlm.rl.grpo_cli import run_grpo

        return run_grpo(argv)
    ns, rest = split_argv(argv)
    module, fn = RLHF_METHODS[ns.rlhf_type].split(":")
    return getattr(importlib.import_module(module), fn)(ns, rest)


def _is_grpo(argv: list[str]) -> bool:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--rlhf_type", default="dpo")
    return p.parse_known_args(argv)[0].rlhf_type == "grpo"


def train_config(rest: list[str]) -> Any:
    """`mvlm sft`'s parse of the remaining flags, relabelled as an rlhf run on pair rows."""
    from mvlm.train.args import parse_train_args

    cfg = parse_train_args(rest, "sft")
    cfg.task = "rlhf"
    cfg.data.task = "preference"
    return cfg


def run_dpo(ns: argparse.Namespace, rest: list[str]) -> int:
    from mvlm.train.objectives.dpo import DPOObjective
    from mvlm.train.preference_flags import dpo_loss_config
    from mvlm.train.trainer import train

    notes: list[str] = []
    loss_cfg = dpo_loss_config(ns, notes)  # validated before any process group
    cfg = train_config(rest)
    cfg.notes.extend(notes)  # rank 0 prints them with the run's other flag notes
    return train(cfg, DPOObjective(loss_cfg, ref_model=ns.ref_model,
                                   precompute_ref_log_probs=ns.precompute_ref_log_probs)
                 ).exit_code


def run_cpo(ns: argparse.Namespace, rest: list[str], method: str = "cpo") -> int:
    from mvlm.train.objectives.dpo import CPOObjective
    from mvlm.train.preference_flags import cpo_loss_config
    from mvlm.train.trainer import train

    loss_cfg = cpo_loss_config(ns, method)  # validated before any process group
    return train(train_config(rest), CPOObjective(loss_cfg)).exit_code


def run_simpo(ns: argparse.Namespace, rest: list[str]) -> int:
    """SimPO = CPO with loss type simpo (beta 2.0 by default), as ms-swift runs it."""
    return run_cpo(ns, rest, "simpo")


def run_orpo(ns: argparse.Namespace, rest: list[str]) -> int:
    from mvlm.train.objectives.dpo import ORPOObjective
    from mvlm.train.preference_flags import orpo_beta
    from mvlm.train.trainer import train

    beta = orpo_beta(ns)
    return train(train_config(rest), ORPOObjective(beta)).exit_code


def run_kto(ns: argparse.Namespace, rest: list[str]) -> int:
    from mvlm.train.objectives.kto import KTOObjective
    from mvlm.train.preference_flags import kto_loss_config
    from mvlm.train.trainer import train

    loss_cfg = kto_loss_config(ns)  # validated before any process group
    obj = KTOObjective(loss_cfg, ref_model=ns.ref_model,
                       precompute_ref_log_probs=ns.precompute_ref_log_probs)
    return train(train_config(rest), obj).exit_code


def run_rm(ns: argparse.Namespace, rest: list[str]) -> int:
    from mvlm.train.objectives.rm import RewardModelObjective
    from mvlm.train.preference_flags import rm_center_coefficient
    from mvlm.train.trainer import train

    coef = rm_center_coefficient(ns)  # validated before any process group
    cfg = train_config(rest)
    return train(cfg, RewardModelObjective(coef, seed=cfg.seed or 0)).exit_code
