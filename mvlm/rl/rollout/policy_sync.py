"""What the two vLLM rollout modes share around a policy push (``--vllm_mode server`` and
``colocate``): the policy version that says when a push is due, job-wide error agreement, and the
LoRA merge / timing / logging wrapped around the mode's own transport.

Why one place: both modes must push at exactly the same moments (after an *applied* optimizer
step, so a skipped update pushes nothing), merge LoRA adapters for the push and restore the exact
base weights after it even when the transport fails, and raise on every rank together when any
rank fails. Keeping that logic once keeps the two modes from drifting apart.
"""
from __future__ import annotations

import abc
import logging
import time
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

if TYPE_CHECKING:
    from mvlm.train.trainer import Trainer

__all__ = ["PolicyPush", "agree", "policy_version", "rank_and_size"]

log = logging.getLogger(__name__)


def rank_and_size() -> tuple[int, int]:
    """(rank, world size) of the job; (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def agree(error: str | None) -> list[str]:
    """Every rank's error (``"rank r: ..."``), the same list on every rank, so that all ranks
    raise together instead of one waiting in a collective for a rank that stopped."""
    _, size = rank_and_size()
    errors = [error]
    if size > 1:
        errors = [None] * size
        dist.all_gather_object(errors, error)
    return [f"rank {r}: {e}" if size > 1 else e for r, e in enumerate(errors) if e]


def policy_version(trainer: Trainer) -> int:
    """Applied optimizer updates so far: changes exactly when the policy's weights do."""
    return int(trainer.step) - int(trainer.skipped)


class PolicyPush(abc.ABC):
    """``push_policy``: the LoRA-merged policy through the mode's :meth:`_send_policy`, with the
    sync's record appended to ``self.syncs`` and one log line on rank 0."""

    syncs: list[dict]
    last_sync: dict

    @abc.abstractmethod
    def _send_policy(self, bundle: Any) -> int:
        """Transport the bundle's (merged) weights to the engine; returns its weight version
        and leaves the transport's statistics in ``self.last_sync``."""

    @abc.abstractmethod
    def _sync_target(self) -> str:
        """Where the weights went, for the log line."""

    @abc.abstractmethod
    def _sync_sizes(self, record: dict) -> tuple[int, int, int]:
        """(tensors, bytes, buckets) of one sync record, for the log line."""

    def push_policy(self, trainer: Trainer) -> int:
        """Stream the (LoRA-merged) policy to the engine; returns the engine's weight version."""
        from mvlm.tuners.model import adapters, merge_adapters, unmerge_adapters

        bundle = trainer.bundle
        merged = bool(adapters(bundle))
        t0 = time.perf_counter()
        if merged:
            merge_adapters(bundle)
        try:
            version = self._send_policy(bundle)
        finally:
            if merged:
                unmerge_adapters(bundle)
        record = dict(self.last_sync, step=trainer.step, lora_merged=merged,
                      seconds=time.perf_counter() - t0)
        self.syncs.append(record)
        if rank_and_size()[0] == 0:
            tensors, nbytes, buckets = self._sync_sizes(record)
            log.info("weight sync -> %s: version %d at step %d, %d tensors, %.2f MB in %d "
                     "buckets, %.3f s%s", self._sync_target(), version, trainer.step, tensors,
                     nbytes / 2**20, buckets, record["seconds"],
                     f", {record['checked_tensors']} read back equal"
                     if "checked_tensors" in record else "")
        return version
