"""torchrun worker (2 ranks) for test_verify_cp_sp.py: `--verify` under SP and under CP.

1. ``verify_against_hf`` (the function behind ``mvlm convert --verify``) on the tiny model built
   at TP2 with ``sequence_parallel=True`` and at CP2, HF weights loaded; then one weight is
   perturbed and the same check must raise ``VerificationError`` (so the comparison is live, not
   vacuous). `mvlm convert` has no sequence-parallel flag: the SP branch of verify (inputs padded
   to a multiple of 2*CP*TP) is reached from code only.
2. context parallel, through the CLI in this process group: ``mvlm convert --to mcore --cp 2
   --verify`` (its ``verify ...`` lines go to stdout; the test parses them).

argv: HF_DIR OUT_JSON MCORE_OUT_DIR
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from _worker_common import drop_groups


def check(hf: str, layout_kw: dict, sequence_parallel: bool) -> dict:
    from transformers import AutoConfig

    from mvlm.convert.bridge import load_hf_weights
    from mvlm.convert.verify import VerificationError, verify_against_hf
    from mvlm.models.vlm import build_model
    from mvlm.runtime.parallel import ParallelLayout
    from mvlm.runtime.startup import startup

    layout = ParallelLayout(**layout_kw)
    startup(layout, seed=1234, device="cpu")
    bundle = build_model(AutoConfig.from_pretrained(hf), layout, dtype=torch.float32,
                         device="cpu", backend="local", sequence_parallel=sequence_parallel,
                         perform_initialization=False)
    assert bundle.config.sequence_parallel == sequence_parallel
    load_hf_weights(bundle, hf)
    res = verify_against_hf(bundle, hf, tol=1e-4)
    out = {"checks": {r.name: [r.max_abs_logits, r.loss_mcore, r.loss_hf] for r in res}}
    # a live comparison: a 1% change of one decoder norm weight must be caught
    w = dict(bundle.models[0].named_parameters())
    name = next(k for k in w if k.endswith("final_layernorm.weight"))
    with torch.no_grad():
        w[name].mul_(1.01)
    try:
        verify_against_hf(bundle, hf, tol=1e-4)
        out["perturbed_caught"] = False
    except VerificationError as e:
        out["perturbed_caught"] = True
        out["perturbed_message"] = str(e)[:300]
    drop_groups()  # the layout's groups: torch keeps them past destroy_model_parallel
    return out


def main() -> None:
    hf, out_json, mcore_out = sys.argv[1:4]
    dist.init_process_group("gloo")
    res = {"sp": check(hf, {"tp": 2}, True), "cp": check(hf, {"cp": 2}, False)}
    if dist.get_rank() == 0:
        Path(out_json).write_text(json.dumps(res))
    dist.barrier()
    from mvlm.cli import main as mvlm_main

    # destroys the process group at its end (mvlm convert owns start-up and tear-down)
    rc = mvlm_main(["convert", "--to", "mcore", "--model", hf, "--output", mcore_out,
                    "--cp", "2", "--verify"])
    if rc != 0:
        raise SystemExit(f"mvlm convert --cp 2 --verify returned {rc}")
    print("WORKER OK", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
