"""The Objective interface: what a training method adds to a step, and nothing more.

The :class:`~mvlm.train.trainer.Trainer` owns everything that does not depend on the method --
model chunks, DDP, optimizer, schedule, data, checkpoints, logging, the NaN guard -- and never
branches on the method. An objective owns four things:

``batch_keys``
    The micro-batch keys it reads. The trainer checks the first micro-batch of a run against them
    and refuses one that lacks a key, naming the objective and the key.
``forward_step(data_iterator, model)``
    Megatron-Core's ``forward_step_func``: takes the next micro-batch, runs one model chunk and
    returns ``(output, loss_func)``. On the last pipeline stage with labels, the model's output is
    the per-token cross-entropy of each label (0 where ``labels < 0``) -- Megatron's
    ``vocab_parallel_cross_entropy``, i.e. minus the log-probability of the label gathered from a
    vocab-parallel log-softmax. :func:`token_logps` turns it into per-token log-probs, which is
    what preference and RL losses start from. Inner stages return hidden states and ``None``.
``loss(batch, output)``
    The reduction, with Megatron's per-token-loss contract (``calculate_per_token_loss``):
    returns ``(loss_sum, count, reports)``. ``loss_sum`` is the micro-batch's loss summed over
    its units and ``count`` the number of units (an int tensor); Megatron-Core sums the counts
    over micro-batches and DP x CP and divides the gradients by that global total, so the
    gradient is the mean over the global batch whatever the split. The unit is the objective's
    choice: label tokens for SFT/PT and GRPO's token-mean, sequences (or pairs) for DPO.
``metrics``
    The names of the ``reports`` entries, the loss first. Every report is a 2-vector
    ``[sum, count]``; :func:`mvlm.train.steps.reduce_stats` sums them over micro-batches and
    DP x CP in one all-reduce and logs ``sum / count``. Declared up front because the first
    pipeline stages have no reports to look at, yet join the same collectives.

Two hooks cover what preference and RL methods need without touching the loop:
:meth:`Objective.setup` runs once when the trainer is built (build frozen models here, e.g. a
reference model with ``trainer.build_frozen_model()``), and :meth:`Objective.prepare_step` runs
before each step's schedule on the step's micro-batches (run the reference model through
``trainer.forward_only(...)`` and attach its log-probs, or attach old log-probs, advantages and
global token counts to each micro-batch; the loss then reads them from ``batch``).

Adding an objective: subclass :class:`Objective` in ``mvlm/train/objectives/<name>.py``, set
``name``, ``batch_keys`` and ``metrics``, implement :meth:`Objective.loss` (and
:meth:`Objective.model_output` if the model must be called differently), add the class to
``OBJECTIVES`` in ``mvlm/train/objectives/__init__.py``, and add a step-0 invariant test (e.g.
DPO's loss equals log 2 when the policy is the reference).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from mvlm.train.steps import model_forward, unwrap

if TYPE_CHECKING:
    from mvlm.train.trainer import Trainer

LossOutput = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


def token_logps(output: torch.Tensor) -> torch.Tensor:
    """Per-token log-probability of each label from the model's last-stage output (the per-token
    cross-entropy); 0 where the label is ignored (``labels < 0``)."""
    return -output


def cp_info() -> tuple[int, int, Any]:
    """(context-parallel size, this rank's CP rank, the CP group); (1, 0, None) without CP."""
    from megatron.core import parallel_state

    size = parallel_state.get_context_parallel_world_size()
    if size == 1:
        return 1, 0, None
    return size, parallel_state.get_context_parallel_rank(), \
        parallel_state.get_context_parallel_group()


def segment_sums(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """``values`` (flat, this CP rank's positions of one packed row) summed into ``n`` segments
    by ``index`` (the segment of every position of the whole row, -1: counted nowhere), complete
    on every CP rank (differentiable all-reduce over the CP group). The per-sequence sums of the
    pair objectives: DPO's log-probs, the reward model's last-token values."""
    from mvlm.runtime.cp import cp_chunk_indices

    size, rank, group = cp_info()
    if size > 1:
        index = index[cp_chunk_indices(index.shape[0], size, rank, device=values.device)]
    keep = index >= 0
    sums = values.new_zeros(n).index_add(0, index[keep], values[keep])
    if size > 1:
        import torch.distributed.nn.functional as dnf

        sums = dnf.all_reduce(sums, group=group)
    return sums


class Objective(ABC):
    """One training method: batch keys, forward step, loss reduction, metrics (see the module
    docstring for the contract and how a new one plugs in)."""

    name: ClassVar[str] = ""
    batch_keys: ClassVar[tuple[str, ...]] = ("input_ids", "position_ids", "labels")
    metrics: ClassVar[tuple[str, ...]] = ("lm_loss",)

    def setup(self, trainer: Trainer) -> None:
        """Once, after the trainer has built its model and optimizer (before any step)."""
        return None

    def extend_model(self, trainer: Trainer) -> None:
        """Once, before DDP and the optimizer are built: add trainable modules the method owns
        (the reward model's value head) to ``trainer.bundle``'s models."""
        return None

    def before_export(self, trainer: Trainer) -> Any:
        """Before the HF export: may return a callable ``f(hf_dir)`` run after it (the reward
        model writes its head there)."""
        return None

    def state_dict(self) -> Any:
        """This rank's state that a resumed run needs to continue exactly (picklable; saved in
        the checkpoint per rank), or None."""
        return None

    def load_state_dict(self, trainer: Trainer, state: Any) -> None:
        """Restore what :meth:`state_dict` returned (after the trainer's own state)."""
        return None

    def prepare_step(self, trainer: Trainer, batches: list[dict]) -> list[dict]:
        """Before each step's schedule (train and eval): may attach tensors to the micro-batches."""
        return batches

    def check_batch(self, batch: dict) -> None:
        """Refuse a micro-batch that lacks a key this objective reads."""
        missing = [k for k in self.batch_keys if batch.get(k) is None]
        if missing:
            raise ValueError(f"objective {self.name!r} needs micro-batch keys {missing}, which "
                             f"the batch does not have (it has {sorted(batch)}): use the data "
                             f"task that renders them")

    def model_output(self, model: Any, batch: dict) -> torch.Tensor:
        """One model chunk on one micro-batch: the per-token label cross-entropy on the last
        stage (see :func:`token_logps`), hidden states before it."""
        return model_forward(model, batch)

    def forward_step(self, data_iterator, model):
        """Megatron-Core ``forward_step_func``: next micro-batch -> (output, loss_func)."""
        batch = next(data_iterator)
        out = self.model_output(model, batch)
        if not unwrap(model).post_process:
            return out, None
        return out, partial(self.loss, batch)

    @abstractmethod
    def loss(self, batch: dict, output: torch.Tensor) -> LossOutput:
        """(loss summed over this micro-batch's units, #units, {metric: [sum, count]})."""
