"""Process start-up: the one sequence every entry point (train, convert, export, bench, test
workers) runs before building a model.

Why one function: the order matters and was easy to get wrong when copied. CPU adaptations must
be installed before the first Megatron-Core call that touches ``torch.cuda`` (process-group
set-up does), the version fixes must be in place before any model or optimizer is built, and the
seeds need the parallel ranks (each TP/PP/EP rank draws its own stream), so they come last.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from mvlm.runtime.compat import apply_compat_fixes
from mvlm.runtime.parallel import ParallelLayout, init_distributed, set_seed


@dataclass(frozen=True)
class RuntimeContext:
    """What start-up settled: the device string (``"cuda"``/``"cpu"``), the layout, this rank
    and the world size, and the seed (None: the RNGs were left as they were)."""

    device: str
    layout: ParallelLayout
    rank: int
    world_size: int
    seed: int | None


def startup(layout: ParallelLayout, seed: int | None = None, device: str | None = None,
            timeout_minutes: int = 30) -> RuntimeContext:
    """Process groups (+ CPU adaptation when ``device`` is cpu) -> Megatron-Core version fixes ->
    seeds.

    ``device`` None picks cuda when a GPU is usable. ``seed`` None skips seeding (a caller that
    only loads weights, e.g. export, draws no random numbers). Safe to call when a process group
    already exists (a test or script that made one): it is reused and parallel_state rebuilt.
    """
    device = init_distributed(layout, device, timeout_minutes=timeout_minutes)
    apply_compat_fixes()
    if seed is not None:
        set_seed(seed)
    return RuntimeContext(device=device, layout=layout, rank=dist.get_rank(),
                          world_size=dist.get_world_size(), seed=seed)
