"""torchrun worker of test_export_direct: `mvlm convert` steps in ONE process group, and what
each rank's HF export wrote (``mvlm.convert.bridge.last_export_stats``).

Spec (JSON file, argv[1]): ``{"out": FILE, "steps": [{"name", "argv"}]}``; each step is the real
CLI entry (``mvlm.cli.main(argv)``) called in-process, with the process groups of the step
before reused when the layout is the same (``_GroupReuse`` of the round-trip worker: start-up
costs more than these tiny conversions). After a ``--to hf`` step every rank's ExportStats are
gathered; rank 0 writes ``[{"name", "stats": [per rank]}]`` to ``out``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from _convert_roundtrip_worker import _GroupReuse
from _worker_common import drop_groups


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    import mvlm.convert.command as command
    from mvlm.cli import main as mvlm_main
    from mvlm.convert.bridge import last_export_stats
    from mvlm.runtime.parallel import ParallelLayout, init_distributed

    init_distributed(ParallelLayout(), "cpu")
    reuse = _GroupReuse(command.startup)
    command.startup, command.destroy_distributed = reuse.startup, reuse.finish
    records = []
    for step in spec["steps"]:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = mvlm_main(step["argv"])
        if rc != 0:
            raise SystemExit(f"step {step['name']} ({' '.join(step['argv'])}) returned {rc}")
        if step["argv"][step["argv"].index("--to") + 1] != "hf":
            continue
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, dataclasses.asdict(last_export_stats()))
        records.append({"name": step["name"], "stats": everyone})
        if dist.get_rank() == 0:
            print(f"STEP {step['name']}: {everyone}", flush=True)
    drop_groups()
    if dist.get_rank() == 0:
        Path(spec["out"]).write_text(json.dumps(records, indent=1))
        print("WORKER OK", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
