"""Where this process sits in the job: rank, world size, local rank, rendezvous address.

torchrun exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Under `srun` without torchrun
only SLURM_* variables exist, so we derive the same facts from them (the rendezvous host is the
first host of SLURM_NODELIST) and export the torchrun names, so everything downstream reads one
set of variables.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def first_slurm_host(nodelist: str) -> str:
    """Expand the first host of a SLURM nodelist such as ``gpu-[003-005,010],cpu1``.

    scontrol is not always on PATH inside containers, so the common compressed forms are parsed
    here rather than shelling out.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("SLURM_NODELIST is empty")
    m = re.match(r"^([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if m is None:
        raise ValueError(f"cannot parse SLURM_NODELIST={nodelist!r}")
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}"


def read_dist_env(environ: dict[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables; torchrun's win when both are present (torchrun under srun)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get(
            "SLURM_NODELIST", "127.0.0.1"
        )
        port = env.get("MASTER_PORT")
        if port is None:
            # Derive a per-job port so two jobs sharing a node do not collide.
            port = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(nodelist),
            master_port=int(port),
            launcher="slurm",
        )
    return DistEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"),
                   int(env.get("MASTER_PORT", "0") or 0), "single")


def export_torchrun_vars(d: DistEnv) -> None:
    """Make SLURM-launched processes look like torchrun ones for torch.distributed's env://."""
    os.environ["RANK"] = str(d.rank)
    os.environ["WORLD_SIZE"] = str(d.world_size)
    os.environ["LOCAL_RANK"] = str(d.local_rank)
    os.environ["MASTER_ADDR"] = d.master_addr
    os.environ["MASTER_PORT"] = str(d.master_port)
