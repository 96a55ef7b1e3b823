"""GRPO's ``--use_vllm true --vllm_mode server``: the trainer-side glue between the GRPO objective
and an ``mvlm rollout`` server.

The GRPO objective builds its engine with ``engine_factory(trainer)`` and calls
``engine.before_rollout(trainer)`` ahead of every generate. :class:`ServerModeEngine` uses that
hook to keep the server's weights equal to the policy the rollouts must come from:

* **At start** (the factory) global rank 0 waits for the server's health check
  (``--vllm_server_timeout``) and tells every rank the outcome, so a server that never comes up
  stops every rank with the same ``ServerTimeout`` naming ``host:port``, before step 1.
* **Before a rollout** the policy's weights are pushed when they changed since the last push:
  the first rollout of a run (the served checkpoint may be another model, or this run resumed
  from a checkpoint) and the first rollout after every *applied* optimizer step (a skipped
  update leaves the policy as it was). ``--num_iterations`` > 1 reuses a rollout batch without
  rolling out, so nothing is pushed then; an evaluation's rollouts after the last step do push.
  The push is :meth:`VLLMServerEngine.load_weights` over
  ``iter_hf_tensors(bundle, receivers="rank0")``: each tensor is gathered by the ranks that own
  its TP / PP / EP shards and handed to global rank 0 (the first data-parallel replica's), which
  alone packs ``--weight_sync_bucket_mb`` buckets and sends them; the server checks them
  against its manifest (``--check_weight_sync``: and reads them back).
* **LoRA**: the adapters are merged into the base weights for the push (fp32 math) and the exact
  base weights restored right after, so the engine serves the adapted policy without knowing
  about adapters.
* **Faults**: a failure on any rank (a dead server, a refused sync) is agreed over the whole job,
  so no rank waits in a collective for one that stopped. If the run has trained since its last
  checkpoint, a checkpoint of the current step is saved (the failure happened before this step's
  update, so the model and optimizer are consistent), then :class:`ServerModeError` says where
  the server was, which checkpoint to resume from, and how.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from mvlm.rl.rollout.policy_sync import PolicyPush, agree, policy_version, rank_and_size
from mvlm.rl.rollout.vllm_server import (
    RolloutServerError,
    ServerTimeout,
    VLLMServerConfig,
    VLLMServerEngine,
    wait_for_server,
)

if TYPE_CHECKING:
    from mvlm.rl.rollout.base import RolloutGroup, RolloutPrompt, SamplingParams
    from mvlm.train.trainer import Trainer

log = logging.getLogger(__name__)

__all__ = ["ServerModeEngine", "ServerModeError", "server_engine_factory"]


class ServerModeError(RolloutServerError):
    """The rollout server failed during training (every rank raises it, with the same text)."""


class ServerModeEngine(VLLMServerEngine, PolicyPush):
    """:class:`VLLMServerEngine` plus what the GRPO trainer needs: ``before_rollout`` (push the
    policy when it changed), job-wide failure agreement, a checkpoint on failure."""

    def __init__(self, cfg: VLLMServerConfig, trainer: Trainer) -> None:
        rank, world = rank_and_size()
        health = err = None
        if rank == 0:
            try:
                health = wait_for_server(cfg)
            except ServerTimeout as e:
                err = str(e)
        if world > 1:
            box = [(health, err)]
            dist.broadcast_object_list(box, src=0)
            health, err = box[0]
        if err:
            raise ServerTimeout(err)
        super().__init__(cfg, wait=False)
        self.health = health
        if trainer.pad_id is not None:
            self.pad_token_id = int(trainer.pad_id)
        else:
            from mvlm.rl.rollout.builtin import eos_token_ids_from_hf_dir

            self.pad_token_id = eos_token_ids_from_hf_dir(trainer.src_dir)[0]
        self._trainer = trainer
        # the policy version last pushed: applied optimizer steps (None: nothing pushed yet)
        self._pushed: int | None = None
        self.syncs: list[dict] = []
        if rank == 0:
            log.info("rollout server %s is up (%s, weight version %s)", cfg.address,
                     health.get("model"), health.get("weight_version"))

    # ---- the objective's hook -------------------------------------------------------------
    policy_version = staticmethod(policy_version)

    def before_rollout(self, trainer: Trainer) -> None:
        """Push the policy's weights if they changed since the last push (collective)."""
        version = self.policy_version(trainer)
        if self._pushed == version:
            return
        self._guard(lambda: self.push_policy(trainer), "weight sync")
        self._pushed = version

    def _send_policy(self, bundle: Any) -> int:
        from mvlm.convert.stream import iter_hf_tensors

        return self.load_weights(iter_hf_tensors(bundle, receivers="rank0"))

    def _sync_target(self) -> str:
        return self.cfg.address

    def _sync_sizes(self, record: dict) -> tuple[int, int, int]:
        return (record.get("tensors", 0), record.get("client_bytes", 0),
                record.get("client_buckets", 0))

    def generate(self, prompts: Sequence[RolloutPrompt], params: SamplingParams
                 ) -> list[RolloutGroup]:
        box: list = []
        self._guard(lambda: box.append(super(ServerModeEngine, self).generate(prompts, params)),
                    "rollout")
        return box[0]

    # ---- failures ---------------------------------------------------------------------------
    def _guard(self, fn, what: str) -> None:
        """Run ``fn`` on every rank; if it fails anywhere, all ranks save (once) and raise."""
        error = None
        try:
            fn()
        except RolloutServerError as e:
            error = str(e)
        errors = agree(error)
        if not errors:
            return
        trainer = self._trainer
        saved = self._save_on_failure(trainer)
        where = (f"; the last checkpoint is {saved}: restart the server and rerun the same "
                 "command to resume from it" if saved is not None else "")
        raise ServerModeError(
            f"{what} against the rollout server at {self.cfg.address} failed at step "
            f"{trainer.step} (--vllm_mode server): {'; '.join(dict.fromkeys(errors))}{where}")

    @staticmethod
    def _save_on_failure(trainer: Trainer):
        """A checkpoint of the current step unless one exists (collective); its path or the
        last one's (None when the run has neither trained nor saved)."""
        from mvlm.train import checkpoint as ckpt

        last = trainer.last_saved
        if trainer.step == 0 or trainer.out_dir is None:
            return last
        if last is not None and last.name == ckpt.checkpoint_name(trainer.step):
            return last
        return trainer.save()


def server_engine_factory(cfg: VLLMServerConfig):
    """The GRPO objective's ``engine_factory`` for ``--vllm_mode server``."""

    def build(trainer: Trainer) -> Any:
        return ServerModeEngine(cfg, trainer)

    return build
