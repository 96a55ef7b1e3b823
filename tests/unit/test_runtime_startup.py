"""mvlm.runtime.startup: the one start-up sequence (process group + CPU adaptation, compat fixes,
seeds). Run in a subprocess: the CPU adaptations are process-wide and must not leak into the
pytest process."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent("""
    import json
    import torch
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import moe_utils
    from mvlm.runtime.cpu import cpu_adaptations_applied
    from mvlm.runtime.parallel import ParallelLayout, destroy_distributed
    from mvlm.runtime.startup import startup

    def draws():
        a = torch.rand(4)
        with mrandom.get_cuda_rng_tracker().fork():
            b = torch.rand(4)
        return torch.cat([a, b]).tolist()

    ctx = startup(ParallelLayout(), seed=7, device="cpu")
    first = draws()
    startup(ParallelLayout(), seed=7, device="cpu")
    again = draws()
    ctx8 = startup(ParallelLayout(), seed=8, device="cpu")
    other = draws()
    unseeded = startup(ParallelLayout(), device="cpu")
    after = draws()  # seed None leaves the generator where seed 8's draws left it
    print(json.dumps({
        "ctx": [ctx.device, ctx.rank, ctx.world_size, ctx.seed, ctx.layout.tp],
        "seed8": ctx8.seed, "unseeded": unseeded.seed,
        "same": first == again, "differs": first != other, "continues": after != other,
        "cpu": cpu_adaptations_applied(), "compat": hasattr(moe_utils, "te_general_gemm"),
    }))
    destroy_distributed()
""")


def test_startup_seeds_adapts_and_reports() -> None:
    env_clean = {k: v for k, v in __import__("os").environ.items()
                 if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                         timeout=300, env=env_clean)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ctx"] == ["cpu", 0, 1, 7, 1]
    assert res["seed8"] == 8 and res["unseeded"] is None
    assert res["same"] and res["differs"] and res["continues"]
    assert res["cpu"] and res["compat"]
