"""Process groups and seeds: one call that turns launcher variables into Megatron-Core state.

The layout (TP, PP, CP, EP, ETP, VPP) is validated against the world size before any process
group exists, so a wrong ``--nproc-per-node`` fails with a message instead of a hang.
"""
from __future__ import annotations

import datetime
import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from mvlm.runtime.env import export_torchrun_vars, read_dist_env
from mvlm.runtime.gloo_device import install as share_gloo_device

log = logging.getLogger(__name__)


@dataclass
class ParallelLayout:
    """Megatron-Core parallel sizes; data parallel is whatever the world size leaves."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int | None = None
    vpp: int | None = None

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp * self.cp

    def dp(self, world_size: int) -> int:
        return world_size // self.model_parallel

    def validate(self, world_size: int) -> None:
        for name in ("tp", "pp", "cp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if world_size % self.model_parallel:
            raise ValueError(
                f"{world_size} ranks cannot hold TP={self.tp} x PP={self.pp} x CP={self.cp} "
                f"(= {self.model_parallel}): launch N = {self.model_parallel} x data-parallel "
                f"ranks, e.g. torchrun --nproc-per-node {self.model_parallel}"
            )
        etp = self.etp or self.tp
        if world_size % (etp * self.ep * self.pp):
            raise ValueError(
                f"{world_size} ranks cannot hold EP={self.ep} x ETP={etp} x PP={self.pp}: "
                "choose --ep so that EP x ETP x PP divides the number of ranks"
            )


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed(layout: ParallelLayout, device: str | None = None,
                     timeout_minutes: int = 30) -> str:
    """Initialise torch.distributed and Megatron-Core parallel_state; returns the device string.

    Works with torchrun, with ``srun`` alone (SLURM variables), and with a plain ``python`` (one
    rank; an in-memory store, no port).
    """
    from megatron.core import parallel_state

    device = device or default_device()
    if device == "cpu":
        from mvlm.runtime.cpu import apply_cpu_adaptations

        apply_cpu_adaptations()
        share_gloo_device()  # every group is gloo: one transport device (loop thread) for all
    denv = read_dist_env()
    if denv.launcher == "slurm":
        export_torchrun_vars(denv)
    layout.validate(denv.world_size)
    if not dist.is_initialized():
        store = None
        if denv.launcher == "single":
            # One rank needs no rendezvous: an in-memory store avoids picking a "free" TCP port
            # that another process can take between the probe and the listen. Nothing is put in
            # the environment, so a second command in the same process is again "single".
            if os.environ.get("MASTER_PORT"):
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            else:
                store = dist.HashStore()
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(denv.local_rank)
        dist.init_process_group(
            backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes),
            rank=denv.rank, world_size=denv.world_size, store=store,
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp or layout.tp,
    )
    return device


def set_seed(seed: int) -> None:
    """Seed python/numpy/torch and Megatron-Core's per-parallel-rank RNG streams.

    Mirrors Megatron's model_parallel_cuda_manual_seed: the default stream is equal across TP
    ranks, the model-parallel stream differs per TP rank, the expert stream per EP/ETP rank.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mrandom

    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    seed_pp = seed + 100 * pp_rank
    random.seed(seed_pp)
    np.random.seed(seed_pp)
    torch.manual_seed(seed_pp)
    if torch.cuda.is_available():
        mrandom.model_parallel_cuda_manual_seed(seed_pp)
        return
    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed_pp + 2718 + tp_rank)
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed_pp)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME,
                seed_pp + 1024 + 100 * ep_rank + etp_rank)


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
