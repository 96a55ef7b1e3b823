"""KTO on the Trainer (``mvlm rlhf --rlhf_type kto``): one answer per row, ``label`` true
(desirable) or false (undesirable), Ethayarajh et al. 2024 as TRL's ``KTOTrainer`` computes it.

Rows are :mod:`mvlm.data.preference` KTO rows. Each is encoded with a second conversation, its
prompt followed by the previous row's answer (TRL's mismatched pairs for the KL reference
point), and the two go through the model packed in one row exactly like a DPO pair
(``chosen_index``: the row's answer, ``rejected_index``: the mismatched one, ``kto_label``).
So the reference pass, LoRA's adapter-free reference, ``--ref_model`` and every parallel layout
are :class:`~mvlm.train.objectives.dpo.PairObjective`'s.

The KL estimate is TRL's: the mean of log pi/pi_ref over the mismatched sequences of the batch,
detached (TRL computes them without gradients) and averaged over the data-parallel ranks, then
clamped at 0. TRL takes it per forward (per micro-batch) after gathering it from every process;
here each micro-batch's loss all-reduces its ``(sum, count)`` over the DP group (with
autograd off: the estimate is detached) -- the last
pipeline stage's ranks run the same micro-batches in the same order, so the collective lines
up -- and every CP rank already holds complete sequence sums. ``apo_zero_unpaired`` reads no KL.

Reduction: the unit is the row (TRL's ``losses.nanmean()``): ``loss_sum`` is the sum of the
weighted per-row losses, ``count`` the rows; metrics are TRL's ``rewards/chosen`` (desirable
rows), ``rewards/rejected`` (undesirable), ``rewards/margins``, ``logps/chosen``,
``logps/rejected`` and ``kl``.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from mvlm.train.objectives import dpo_losses as dl
from mvlm.train.objectives.base import Objective
from mvlm.train.objectives.dpo import PairObjective

KTO_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
               "logps/rejected", "kl")


def dp_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the data-parallel group (a copy; unchanged on one rank)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    t = t.detach().clone()
    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
    return t


def dp_mean(s: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``sum / count`` over the data-parallel group (what TRL's gather + mean gives)."""
    t = dp_sum(torch.stack([s.double(), n.double()]))
    return (t[0] / t[1].clamp(min=1)).to(s.dtype)


class KTOObjective(PairObjective):
    """KTO / unpaired APO-zero (:func:`~mvlm.train.objectives.dpo_losses.kto_loss`)."""

    name = "kto"
    batch_keys: ClassVar[tuple[str, ...]] = PairObjective.batch_keys + ("kto_label",)
    metrics = KTO_METRICS

    def __init__(self, loss_cfg: dl.KTOLossConfig, reference: str = "auto",
                 ref_model: str | None = None, precompute_ref_log_probs: bool = False):
        super().__init__(reference, uses_reference=True, ref_model=ref_model,
                         precompute_ref_log_probs=precompute_ref_log_probs)
        self.loss_cfg = loss_cfg
        if not loss_cfg.uses_kl:
            self.metrics = tuple(m for m in KTO_METRICS if m != "kl")

    def check_batch(self, batch: dict) -> None:
        if batch.get("kto_label") is None and batch.get("chosen_index") is not None:
            raise ValueError("--rlhf_type kto reads KTO rows (one answer and 'label': true | "
                             "false per row), but the data holds chosen/rejected pairs: split "
                             "each pair into a desirable and an undesirable row, or use "
                             "--rlhf_type dpo")
        Objective.check_batch(self, batch)

    def loss(self, batch: dict, output: torch.Tensor):
        """The pair reduction, with TRL's KTO margin: mean desirable reward minus mean
        undesirable reward over the micro-batch's rows on every DP rank (the two groups differ
        in size, so the margin is no ``(sum, count)`` of its own; it is reported once per
        micro-batch and the step logs the micro-batches' mean, as TRL's logging averages its
        forwards)."""
        loss_sum, count, reports = super().loss(batch, output)
        t = dp_sum(torch.cat([reports["rewards/chosen"], reports["rewards/rejected"]]))
        margin = t[0] / t[1].clamp(min=1) - t[2] / t[3].clamp(min=1)
        reports["rewards/margins"] = torch.stack([margin, torch.ones_like(margin)])
        return loss_sum, count, reports

    def pair_loss(self, batch: dict, output: torch.Tensor) -> dl.PreferenceLoss:
        lp, _, c, r = self._logps(batch, output)
        ref = batch["ref_logps"]
        kl = None
        if self.loss_cfg.uses_kl:
            kl = dp_mean(*dl.kto_kl_estimate(lp[r], ref[r]))
        labels = batch["kto_label"].to(lp.device)
        return dl.kto_loss(lp[c], ref[c], labels, self.loss_cfg, kl)
