"""CHORD (arXiv 2508.11408): an SFT loss on expert data mixed into the GRPO loss on a schedule.

``loss = (1 - mu) * L_GRPO + mu * L_SFT`` where ``mu`` follows ms-swift's schedule
(``--chord_mu_warmup_steps``, ``--chord_mu_decay_steps``, ``--chord_mu_peak``,
``--chord_mu_valley``): linear from 0 to the peak over the warm-up steps, half a cosine from the
peak to the valley over the decay steps, the valley afterwards. ``--chord_enable_phi_function``
weights each expert token's cross-entropy by ``phi = p * (1 - p)`` (``p`` = the model's probability
of the expert token, no gradient through ``phi``): tokens the model is unsure about count most.

Like the GRPO loss, the SFT term is a token mean over the step's GLOBAL count of expert tokens
(:class:`mvlm.rl.grpo_loss.LossDenominators` of the expert micro-batches), so it does not depend on
how the expert batch is split either (ms-swift divides by each micro-batch's own count).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class ChordConfig:
    """CHORD flags (ms-swift names). Off unless ``chord_sft_dataset`` is given."""

    chord_sft_dataset: list[str] = field(default_factory=list)
    chord_sft_per_device_train_batch_size: int | None = None
    chord_enable_phi_function: bool = False
    chord_mu_warmup_steps: int = 0
    chord_mu_decay_steps: int = 0
    chord_mu_peak: float | None = None
    chord_mu_valley: float | None = None

    def __post_init__(self) -> None:
        if not self.chord_sft_dataset:
            set_ = [n for n in ("chord_mu_peak", "chord_mu_valley",
                                "chord_sft_per_device_train_batch_size")
                    if getattr(self, n) is not None]
            if set_ or self.chord_enable_phi_function:
                raise ValueError(f"--{(set_ or ['chord_enable_phi_function'])[0]} is a CHORD flag: "
                                 "it needs --chord_sft_dataset (the expert data)")
            return
        for n in ("chord_mu_peak", "chord_mu_valley"):
            v = getattr(self, n)
            if v is None or not 0.0 <= v <= 1.0:
                raise ValueError(f"--{n} {v}: CHORD needs a value in [0, 1] (the SFT share of "
                                 "the loss); for a constant mu give peak = valley")
        if min(self.chord_mu_warmup_steps, self.chord_mu_decay_steps) < 0:
            raise ValueError("--chord_mu_warmup_steps / --chord_mu_decay_steps must be >= 0")
        if (self.chord_mu_warmup_steps + self.chord_mu_decay_steps == 0
                and self.chord_mu_peak != self.chord_mu_valley):
            raise ValueError(f"--chord_mu_peak {self.chord_mu_peak} is never reached without "
                             "--chord_mu_warmup_steps or --chord_mu_decay_steps: set them, or give "
                             "peak = valley for a constant mu")
        if (self.chord_sft_per_device_train_batch_size is not None
                and self.chord_sft_per_device_train_batch_size < 1):
            raise ValueError("--chord_sft_per_device_train_batch_size must be >= 1")

    @property
    def enabled(self) -> bool:
        return bool(self.chord_sft_dataset)

    def mu(self, step: int) -> float:
        """mu at optimizer step ``step`` (0-based); 0 when CHORD is off."""
        if not self.enabled:
            return 0.0
        peak, valley = float(self.chord_mu_peak), float(self.chord_mu_valley)  # type: ignore[arg-type]
        w, d = self.chord_mu_warmup_steps, self.chord_mu_decay_steps
        if step < w:
            return peak * step / w
        if step >= w + d:
            return valley
        return valley + (peak - valley) * 0.5 * (1.0 + math.cos(math.pi * (step - w) / d))


def chord_sft_loss(logps: torch.Tensor, mask: torch.Tensor, num_tokens: float,
                   enable_phi: bool = False) -> torch.Tensor:
    """This expert micro-batch's share of the SFT term: ``sum(-logp * [phi] * mask) /
    num_tokens``, ``logps`` = log-probs of the expert tokens ``[B, T]``, ``num_tokens`` = the
    step's global expert-token count."""
    m = mask.to(logps.dtype)
    nll = -logps.masked_fill(m == 0, 0.0)
    if enable_phi:
        p = (-nll).detach().exp()
        nll = nll * p * (1.0 - p)
    return (nll * m).sum() / max(float(num_tokens), 1.0)


def chord_mix(grpo_loss: torch.Tensor, sft_loss: torch.Tensor | None, mu: float) -> torch.Tensor:
    """``(1 - mu) * grpo + mu * sft``; at ``mu == 0`` the expert batch is not needed."""
    if mu == 0.0:
        return grpo_loss
    if sft_loss is None:
        raise ValueError(f"CHORD mu = {mu} at this step needs the expert batch's SFT loss")
    return (1.0 - mu) * grpo_loss + mu * sft_loss
