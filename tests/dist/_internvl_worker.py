"""torchrun worker of test_internvl_layouts (and test_qwen2_5_omni_layouts): conversions at several
layouts, then training runs, all in ONE launch (``import megatron`` and the default process group
are paid once; each layout's subgroups are destroyed before the next, ``drop_groups``).

Spec (JSON, argv[1]): ``{"convert": [{"name", "hf", "save_at"?, "layouts": [...]}], "out": DIR,
"runs": [...]}``. Each conversion loads the HF dir at its first layout, checks logits against
transformers (``verify_against_hf``), optionally saves a torch_dist checkpoint and exports HF
weights; later layouts of the same entry are loaded from that checkpoint (resharding) and checked
and exported again. Rank 0 writes every check's numbers to ``OUT/verify.json``; the test compares
the exported tensors with the originals. ``runs`` are `mvlm sft` argv lists (as
_train_worker.py), run after the conversions in the same process group.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from _worker_common import drop_groups, run_trainings, worker_process_group


def _layout(spec: dict):
    from mvlm.runtime.parallel import ParallelLayout

    return ParallelLayout(tp=spec.get("tp", 1), pp=spec.get("pp", 1))


def convert(entry: dict, out: Path) -> list[dict]:
    from transformers import AutoConfig

    from mvlm.convert.bridge import load_hf_weights
    from mvlm.convert.command import export_to_hf
    from mvlm.convert.mcore_ckpt import load_mcore, save_mcore
    from mvlm.convert.verify import verify_against_hf
    from mvlm.models.vlm import build_model
    from mvlm.runtime.startup import startup

    hf = Path(entry["hf"])
    mc = out / f"{entry['name']}_mcore"
    results = []
    for i, lay in enumerate(entry["layouts"]):
        layout = _layout(lay)
        startup(layout, seed=1234, device="cpu")
        if i == 0:
            bundle = build_model(AutoConfig.from_pretrained(hf), layout, dtype=torch.float32,
                                 device="cpu", perform_initialization=False)
            load_hf_weights(bundle, hf)
        else:
            bundle, _ = load_mcore(mc, layout, device="cpu", dtype=None)
        res = verify_against_hf(bundle, hf, tol=1e-4)
        if i == 0:
            save_mcore(bundle, mc, layout, hf_src=hf)
        name = f"{entry['name']}_{lay['name']}"
        export_to_hf(bundle, hf, out / name, torch.float32, overwrite=False)
        results += [{"case": name, "check": r.name, "dlogits": r.max_abs_logits,
                     "loss_mcore": r.loss_mcore, "loss_hf": r.loss_hf} for r in res]
        drop_groups()  # the layout's groups: torch keeps them past destroy_model_parallel
    return results


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    with worker_process_group() as rank:
        results = []
        for entry in spec.get("convert", []):
            t = time.time()
            results += convert(entry, out)
            if rank == 0:
                print(f"CONVERT {entry['name']} done in {time.time() - t:.1f}s", flush=True)
        if rank == 0:
            (out / "verify.json").write_text(json.dumps(results))
        run_trainings(spec.get("runs", []))
        if rank == 0:
            print("WORKER OK", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
