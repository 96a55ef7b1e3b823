"""torchrun worker of test_convert_roundtrip: many `mvlm convert` runs in ONE process group.

Each step is the real CLI entry (``mvlm.cli.main(["convert", ...])``: flag parsing, checks,
start-up, build, read, ``--verify``, staged write), called in-process so that ``import megatron``
/ ``transformers`` and the gloo process group are paid once per launch instead of once per
conversion (they were most of the file's CPU time). The changes from a command-line run:
``run_convert`` ends by destroying the default process group, which a later step in the same
launch needs, so here it only waits at a barrier; and its start-up reuses the process groups of
the step before when the layout is the same (steps are ordered to make that the common case).

Spec (JSON file, argv[1]): ``{"out": DIR, "cases": [{"name", "hf", "steps": [{"to":
"mcore"|"hf", "layout": [flags], "verify": bool}]}]}``. A case's ``mcore`` step writes
``OUT/NAME/mcore``; its ``hf`` steps export that checkpoint (at their own layout: resharding)
to ``OUT/NAME/hf_I``. Rank 0 writes each step's printed output to ``OUT/steps.json``; the test
parses the ``verify`` lines and compares the exported tensors with the originals.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist
from _worker_common import drop_groups


class _GroupReuse:
    """Stands in for run_convert's ``startup`` and ``destroy_distributed``: a step at the layout
    of the step before reuses its process groups (only the seeds are set again), a new layout
    drops them and runs the real start-up. Building the ~20 gloo groups of a layout (full TCP
    meshes) was the largest cost left per conversion; steps run grouped by layout."""

    def __init__(self, startup) -> None:
        self.startup_fn = startup
        self.layout = None
        self.ctx = None

    def startup(self, layout, seed=None, device=None, timeout_minutes=30):
        from megatron.core import parallel_state

        from mvlm.runtime.parallel import set_seed

        if self.layout == layout and parallel_state.model_parallel_is_initialized():
            if seed is not None:
                set_seed(seed)
            return self.ctx
        drop_groups()
        self.ctx = self.startup_fn(layout, seed=seed, device=device,
                                   timeout_minutes=timeout_minutes)
        self.layout = layout
        return self.ctx

    @staticmethod
    def finish() -> None:
        dist.barrier()


def _ordered_steps(spec: dict) -> list[tuple[dict, int, dict]]:
    """Every case's conversion into Megatron first, then the exports; each phase grouped by
    layout (stable), so the process groups are rebuilt once per layout and phase."""
    steps = [(case, i, step) for case in spec["cases"] for i, step in enumerate(case["steps"])]
    layouts = list(dict.fromkeys(" ".join(s["layout"]) for _, _, s in steps))
    return sorted(steps, key=lambda x: (x[2]["to"] != "mcore",
                                        layouts.index(" ".join(x[2]["layout"]))))


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    from torch.distributed import distributed_c10d as c10d

    import mvlm.convert.command as command
    from mvlm.cli import main as mvlm_main
    from mvlm.runtime.parallel import ParallelLayout, init_distributed

    init_distributed(ParallelLayout(), "cpu")
    reuse = _GroupReuse(command.startup)
    command.startup, command.destroy_distributed = reuse.startup, reuse.finish
    rank = dist.get_rank()
    records = []
    for case, i, step in _ordered_steps(spec):
        root = out / case["name"]
        mcore = root / "mcore"
        src, dst = (case["hf"], mcore) if step["to"] == "mcore" else (mcore, root / f"hf_{i}")
        argv = ["convert", "--to", step["to"], "--model", str(src), "--output", str(dst),
                *step["layout"], *(["--verify"] if step["verify"] else [])]
        buf = io.StringIO()
        t = time.time()
        with contextlib.redirect_stdout(buf):
            rc = mvlm_main(argv)
        if rc != 0:
            raise SystemExit(f"{case['name']} step {i} ({' '.join(argv)}) returned {rc}")
        if rank == 0:
            records.append({"case": case["name"], "step": i, "to": step["to"],
                            "layout": step["layout"], "output": str(dst),
                            "stdout": buf.getvalue()})
            print(f"STEP {case['name']} {i} --to {step['to']} {step['layout'] or 'TP1'} "
                  f"{time.time() - t:.1f}s, {len(os.listdir('/proc/self/task'))} threads, "
                  f"{len(c10d._world.pg_map)} process groups", flush=True)
    drop_groups()
    if rank == 0:
        (out / "steps.json").write_text(json.dumps(records, indent=1))
        print("WORKER OK", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
