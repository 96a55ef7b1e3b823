"""torchrun worker for the training tests: several `mvlm pt|sft` runs in ONE launch.

``import megatron`` costs ~8 s per rank, so each launch runs a list of runs sequentially in the
same process group (run_training leaves a process group it did not create alone and only resets
Megatron's parallel state between runs). Spec (JSON file, argv[1]):
``{"runs": [{"task": "sft", "argv": [...], "expect_rc": 0, "verify_hf": DIR?}, ...]}``.
After a run with ``verify_hf``, the run's latest checkpoint is loaded at the same layout and its
logits are compared with transformers loading the exported HF dir (raises above 1e-4, a guard
only, so that the value is always written: test_train_parity asserts its tighter LOGITS_TOL).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    dist.init_process_group("gloo")
    from mvlm.train.trainer import run_training

    for run in spec["runs"]:
        t = time.time()
        rc = run_training(run["argv"], run.get("task", "sft"))
        if rc != run.get("expect_rc", 0):
            raise SystemExit(f"run {run.get('name')} returned {rc}")
        if run.get("verify_hf"):
            verify(run)
        dist.barrier()
        if dist.get_rank() == 0:
            print(f"RUN {run.get('name')} done in {time.time() - t:.1f}s", flush=True)
    dist.barrier()
    if dist.get_rank() == 0:
        print("WORKER OK", flush=True)
    dist.destroy_process_group()


def verify(run: dict) -> None:
    from megatron.core import parallel_state

    from mvlm.convert.mcore_ckpt import load_mcore
    from mvlm.convert.verify import verify_against_hf
    from mvlm.runtime.parallel import ParallelLayout
    from mvlm.runtime.startup import startup
    from mvlm.train.checkpoint import read_latest

    argv = run["argv"]
    tp = int(argv[argv.index("--tp") + 1]) if "--tp" in argv else 1
    out = Path(argv[argv.index("--output_dir") + 1])
    layout = ParallelLayout(tp=tp)
    startup(layout, device="cpu")
    bundle, _ = load_mcore(read_latest(out), layout, device="cpu", dtype=None)
    res = verify_against_hf(bundle, out / "hf", tol=1e-4)
    if dist.get_rank() == 0:
        worst = max(r.max_abs_logits for r in res)
        print(f"VERIFY {run.get('name')} max_abs_logits {worst:.3e}", flush=True)
        Path(run["verify_hf"]).write_text(json.dumps({"max_abs_logits": worst}))
    parallel_state.destroy_model_parallel()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
