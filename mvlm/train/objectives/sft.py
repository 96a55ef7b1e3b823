"""``sft``: next-token cross-entropy on the label tokens, token-mean over the global batch.

The per-token cross-entropy is computed where it always was, inside ``VLMModel.forward``
(Megatron's ``vocab_parallel_cross_entropy`` on the last stage, labels split like the sequence
under CP); this objective only masks and sums it. ``loss_sum`` is the sum over this micro-batch's
loss tokens and ``count`` their number; Megatron-Core (``calculate_per_token_loss``) divides the
gradients by the global token count, so the gradient -- and the logged loss, ``sum / count`` of
the ``lm_loss`` report -- is the same whether the global batch was split over micro-batches, DP
ranks or CP chunks (the layout-parity tests).
"""
from __future__ import annotations

import torch

from mvlm.train.objectives.base import LossOutput, Objective


def local_loss_mask(batch: dict) -> torch.Tensor:
    """This CP rank's chunk of the loss mask (the model splits labels the same way)."""
    from megatron.core import parallel_state

    from mvlm.runtime.cp import split_for_cp

    mask = (batch["labels"] >= 0).float()
    cp = parallel_state.get_context_parallel_world_size()
    if cp > 1:
        mask = split_for_cp(mask, 1, cp, parallel_state.get_context_parallel_rank())
    return mask


def token_mean_loss(loss_mask: torch.Tensor, per_token: torch.Tensor) -> LossOutput:
    """(sum of losses, #loss tokens, report) -- Megatron's per-token-loss contract."""
    per_token = per_token.float()
    n = loss_mask.sum().to(torch.int)
    loss_sum = (per_token * loss_mask).sum()
    report = torch.stack([loss_sum.detach().clone(), n.detach().clone().float()])
    return loss_sum, n, {"lm_loss": report}


class SFTObjective(Objective):
    """Cross-entropy on the tokens the template labels (the assistant turns for ``mvlm sft``)."""

    name = "sft"
    batch_keys = ("input_ids", "position_ids", "labels")
    metrics = ("lm_loss",)

    def loss(self, batch: dict, output: torch.Tensor) -> LossOutput:
        return token_mean_loss(local_loss_mask(batch), output)
