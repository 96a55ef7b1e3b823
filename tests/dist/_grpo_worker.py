"""torchrun worker for test_grpo_objective: GRPO through the Trainer on a tiny text model.

Each run is a whole ``mvlm.train.trainer.train`` on an RL prompt file (data task ``rl``) with the
GRPO objective (built-in engine on the training model, seeded sampling) and a deterministic
token-level reward registered here (``even_tokens``: the fraction of even token ids in the
completion), so the rewards -- and so the advantages -- differ between completions;
``flat_or_even`` gives the rows whose ``flat`` column is true a constant reward (for
``--dynamic_sample``).

Spec (JSON, argv[1]): ``{"runs": [{"name", "argv", "out", "grpo": {flag: value}}], "result"}``;
a run with ``"sft": true`` is a plain ``mvlm sft`` run of its argv instead.
The runs go one after the other in one launch; the result holds each run's logging.jsonl, or the
message of the LogprobMismatchError a run with ``trainer_temperature`` (the trainer's log-probs
tempered unlike the engine's) stopped with (or the ValueError of a run marked
``expect_error``), and the prompts (unpadded token ids of DP rank 0's
micro-batches) each training step received from the data loader and the number of images
its training rows carried.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist


def even_tokens(completions, response_token_ids, **kwargs):
    return [sum(t % 2 == 0 for t in ids) / max(1, len(ids)) for ids in response_token_ids]


def flat_or_even(completions, response_token_ids, flat=None, **kwargs):
    """0.5 for a row whose ``flat`` column is true (its group has zero reward std), else
    ``even_tokens``: makes ``--dynamic_sample`` drop those groups and resample."""
    even = even_tokens(completions, response_token_ids)
    return [0.5 if f else e for f, e in zip(flat or [False] * len(even), even)]


def objective(flags: dict):
    from mvlm.rl.flags import add_grpo_args, grpo_configs
    from mvlm.rl.rewards import register
    from mvlm.rl.rollout.flags import add_rollout_args, sampling_params
    from mvlm.train.objectives.grpo import GRPOObjective

    register("even_tokens", even_tokens, origin="test_grpo_objective")
    register("flat_or_even", flat_or_even, origin="test_grpo_objective")
    p = argparse.ArgumentParser()
    add_grpo_args(p)
    add_rollout_args(p)
    p.add_argument("--num_iterations", type=int, default=1)
    argv = []
    for k, v in flags.items():
        argv += [f"--{k}", *([str(x) for x in v] if isinstance(v, list) else [str(v)])]
    ns = p.parse_args(argv)
    cfgs = grpo_configs(ns, num_generations=ns.num_generations,
                        max_completion_length=ns.max_completion_length)
    return GRPOObjective(cfgs, sampling_params(ns), num_iterations=ns.num_iterations)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    dist.init_process_group("gloo")
    from mvlm.rl.grpo_loss import LogprobMismatchError
    from mvlm.train.args import parse_train_args
    from mvlm.train.trainer import train

    logs, errors, prompts = {}, {}, {}
    for run in spec["runs"]:
        cfg = parse_train_args(run["argv"], "sft")
        if run.get("sft"):  # a plain SFT run (e.g. CHORD's expert data, for comparison)
            train(cfg)
            dist.barrier()
            logs[run["name"]] = [json.loads(x) for x in
                                 (Path(run["out"]) / "logging.jsonl").read_text().splitlines()]
            continue
        cfg.task = "rlhf"
        cfg.data.task = "rl"
        obj = objective(run["grpo"])
        if run.get("trainer_temperature"):  # the trainer tempers differently from the engine
            obj.temperature = run["trainer_temperature"]
        prompts[run["name"]] = seen = []
        prepare = obj.prepare_step

        def record(trainer, batches, prepare=prepare, seen=seen):
            out = prepare(trainer, batches)
            if trainer.ddp_models[0].training:  # the loader's prompts, the rows' images
                seen.append({"prompts": [r[m].tolist() for b in batches for r, m in zip(
                    b["input_ids"].cpu(), b["attention_mask"].cpu())],
                    "images": sum(len(b.get("image_grid_thw", ())) for b in out)})
            return out

        obj.prepare_step = record
        try:
            train(cfg, obj)
        except LogprobMismatchError as e:
            errors[run["name"]] = str(e)
            continue
        except ValueError as e:  # a run that must be refused (e.g. a resume at another layout)
            if not run.get("expect_error"):
                raise
            errors[run["name"]] = str(e)
            continue
        dist.barrier()
        log = Path(run["out"]) / "logging.jsonl"
        logs[run["name"]] = [json.loads(x) for x in log.read_text().splitlines()]
    if dist.get_rank() == 0:
        Path(spec["result"]).write_text(json.dumps({"logs": logs, "errors": errors,
                                                   "prompts": prompts}))
        print("WORKER OK", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
