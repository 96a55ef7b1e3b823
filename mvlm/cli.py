"""`mvlm <command>`: parse, then hand over to the pipeline that does the work.

Commands: convert (HF <-> Megatron-Core), encode (pre-tokenise a dataset), pt / sft (training),
export (training checkpoint -> HF), demo (the README's tiny end-to-end job), rollout (a vLLM
rollout server for GRPO, run from vLLM's own venv).
Launch with torchrun / srun for several ranks, or plainly for one.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from mvlm.runtime.quiet import silence_startup_noise

# Sub-commands whose flags mvlm.train.args parses: name -> what it does (for the help line).
TRAIN_TASKS: dict[str, str] = {"pt": "continued pre-training", "sft": "supervised fine-tuning",
                               "rlhf": "preference / RL "
                                       "(--rlhf_type dpo|cpo|simpo|orpo|kto|rm|grpo)"}


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("megatron.core.distributed.fsdp").setLevel(logging.WARNING)
    # Megatron lists every parameter of every grad bucket at INFO: noise for a training log.
    logging.getLogger("megatron.core.distributed.param_and_grad_buffer").setLevel(logging.WARNING)
    # Before torch / Megatron-Core are imported: their start-up messages that mean nothing here
    # (no CUDA runtime on a CPU box, optional fused kernels missing) would print once per rank.
    silence_startup_noise()


def build_parser() -> argparse.ArgumentParser:
    """Every sub-command's parser. Only light modules are imported here (standard library and
    the flag builders): ``mvlm --help`` must print in well under a second, without torch or
    Megatron-Core (tests/unit/test_cli_help.py checks the import log)."""
    from mvlm.convert.flags import add_convert_args
    from mvlm.data.flags import add_encode_args
    from mvlm.demo import add_demo_args
    from mvlm.train.export import add_export_args

    parser = argparse.ArgumentParser(prog="mvlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_convert_args(sub.add_parser("convert", help="HF <-> Megatron-Core checkpoints"))
    add_encode_args(sub.add_parser("encode", help="pre-encode a dataset into a cache"))
    for task, what in TRAIN_TASKS.items():
        # Training flags are parsed by mvlm.train.args (aliases, YAML, validation): take them all.
        sub.add_parser(task, help=f"{what} on Megatron-Core (torchrun / srun for several ranks)",
                       add_help=False)
    add_export_args(sub.add_parser("export", help="training checkpoint -> HF safetensors"))
    add_demo_args(sub.add_parser("demo", help="tiny end-to-end run on this machine"))
    # `mvlm rollout` re-executes in vLLM's venv: its flags are parsed there (mvlm.rl.rollout).
    sub.add_parser("rollout", help="vLLM rollout server for GRPO (runs in vLLM's own venv)",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TRAIN_TASKS:
        return _train_main(argv[0], argv[1:])
    if argv and argv[0] == "rollout":
        from mvlm.rl.rollout.launch import rollout_main

        return rollout_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "convert":
            from mvlm.convert.command import ConvertConfig, run_convert

            return run_convert(ConvertConfig.from_flags(vars(args)))
        if args.command == "encode":
            from mvlm.config import EncodeConfig
            from mvlm.data.encode import run_encode

            return run_encode(EncodeConfig.from_flags(vars(args)))
        if args.command == "export":
            from mvlm.train.export import ExportConfig, run_export

            return run_export(ExportConfig.from_flags(vars(args)))
        if args.command == "demo":
            from mvlm.demo import DemoConfig, run_demo

            return run_demo(DemoConfig.from_flags(vars(args)))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # User errors: one clear line naming the fix, non-zero exit, no traceback wall.
        print(f"mvlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 1


def _train_main(task: str, argv: list[str]) -> int:
    from mvlm.train.args import build_parser as train_parser

    if any(a in ("-h", "--help") for a in argv):
        if task == "rlhf":  # the method flags, then `mvlm sft`'s (mvlm.train.rlhf)
            from mvlm.train.rlhf import print_help

            print_help()
            return 0
        train_parser(task).print_help()
        return 0
    nproc = int(os.environ.get("NPROC_PER_NODE", "1") or 1)
    if nproc > 1 and "RANK" not in os.environ and "SLURM_PROCID" not in os.environ:
        # ms-swift scripts say `NPROC_PER_NODE=N swift sft ...`: launch N local ranks likewise.
        import subprocess

        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "mvlm", task, *argv]
        print(f"mvlm {task}: NPROC_PER_NODE={nproc} -> torchrun --nproc-per-node {nproc}",
              file=sys.stderr)
        return subprocess.call(cmd)
    from mvlm.train.steps import NonFiniteLossError
    from mvlm.train.trainer import run_training

    try:
        if task == "rlhf":
            from mvlm.train.rlhf import run_rlhf

            return run_rlhf(argv)
        return run_training(argv, task)
    except (ValueError, FileNotFoundError, FileExistsError, NonFiniteLossError) as e:
        print(f"mvlm {task}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
