"""torchrun worker for test_dpo_objective: DPO through the Trainer on packed pair rows.

A whole run (``mvlm.train.trainer.train``) on a preference file in the guide's format with `mvlm
sft`'s flags and the data's label mode set to ``preference`` (what `mvlm rlhf` sets): rows
encoded by ``mvlm.data.preference``, pair micro-batches packed by the Collator
(``collate_pairs``), the DPO objective. The test checks its ``logging.jsonl``:

1. step 0: the reference equals the policy (a frozen copy for full training; the policy with its
   adapters off under LoRA, B = 0 at init), so every pair's loss is -log sigmoid(0): the logged
   loss is fp32 ln 2 exactly and rewards/chosen, rewards/rejected, rewards/margins are exactly 0;
2. three steps move the policy: step 3's rewards/margins > 0 on the same pairs.

A run with ``"objective": "rm"`` trains a reward model (value head, Bradley-Terry) on the
pairs. A run with ``"objective": "kto"`` trains KTO instead (rows with ``label``; beta 0.1,
undesirable weight 1.5): step 0's loss is 1 - sigmoid(0) per row, weighted.

Spec (JSON, argv[1]): ``{"runs": [{"name", "argv", "out", "reference": "copy" | "adapters",
"ref_model": DIR (optional; DPO and KTO), "precompute": bool (optional; DPO and KTO),
"objective": "kto" | "rm" (optional),
"center_rewards_coefficient" (rm, optional), "expect_error": bool
(optional)}], "result": FILE}`` -- the runs go
one after the other in one launch; a run with ``expect_error`` records its ValueError's message
under ``errors`` (it must come last: a failed run leaves Megatron's state behind).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    dist.init_process_group("gloo")
    from mvlm.train.args import parse_train_args
    from mvlm.train.objectives import dpo_losses as dl
    from mvlm.train.objectives.dpo import DPOObjective
    from mvlm.train.trainer import train

    logs = {}
    errors = {}
    from mvlm.train.objectives.kto import KTOObjective

    for run in spec["runs"]:
        if run.get("objective") == "rm":
            from mvlm.train.objectives.rm import RewardModelObjective

            obj = RewardModelObjective(run.get("center_rewards_coefficient"))
        elif run.get("objective") == "kto":
            obj = KTOObjective(dl.KTOLossConfig(beta=0.1, undesirable_weight=1.5),
                               reference=run.get("reference", "auto"),
                               ref_model=run.get("ref_model"),
                               precompute_ref_log_probs=run.get("precompute", False))
        else:
            obj = DPOObjective(dl.DPOLossConfig(beta=0.1), reference=run.get("reference", "auto"),
                               ref_model=run.get("ref_model"),
                               precompute_ref_log_probs=run.get("precompute", False))
        if run.get("share_pair_media") is False:  # the tower on both copies of a pair's media
            obj.share_pair_media = False
        cfg = parse_train_args(run["argv"], "sft")
        cfg.data.task = "preference"  # the label mode `mvlm rlhf` sets: rows are pairs
        if run.get("expect_error"):  # must be the launch's last run (no teardown after it)
            try:
                train(cfg, obj)
            except ValueError as e:
                errors[run["name"]] = str(e)
            else:
                errors[run["name"]] = None
            continue
        train(cfg, obj)
        dist.barrier()
        log = Path(run["out"]) / "logging.jsonl"
        logs[run["name"]] = [json.loads(x) for x in log.read_text().splitlines()]
    if dist.get_rank() == 0:
        Path(spec["result"]).write_text(json.dumps({"logs": logs, "errors": errors}))
        print("WORKER OK", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
