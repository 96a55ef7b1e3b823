"""Offline preference losses as pure functions of per-sequence log-probabilities.

Why pure functions: the preference objectives (DPO and its loss types, SimPO, CPO, ORPO, KTO and
the reward model's Bradley-Terry loss) differ only in what they do with a handful of numbers per
pair -- the summed log-probability of each completion under the policy (and the reference), and
the completion's token count. Keeping that arithmetic here, away from the model, the pipeline
schedule and the reductions, lets the tests compare every loss with TRL's own implementation on
the same random numbers, and lets one objective serve every parallel layout.

Inputs are *summed* log-probabilities of the completion tokens (prompt and padding excluded),
one per sequence, and the completion token counts where a method needs them (IPO and
``sigmoid_norm`` normalise by length, SimPO / ORPO / CPO-IPO average the log-probabilities, the
NLL terms -- ``rpo_alpha``, ``cpo_alpha``, ORPO's -- are token means over the batch's chosen
completions, as TRL's cross-entropy is).

What comes back is a :class:`PreferenceLoss`: ``pair_losses`` (per pair, or per example for
KTO; weights already applied) plus an optional NLL part kept as a token *sum* and token *count*,
so that a trainer can normalise over the global batch (micro-batches, DP ranks) exactly --
``loss`` is TRL's value for the batch given. Metrics are ``(sum, count)`` pairs with TRL's names
(``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``logps/chosen``,
``logps/rejected``; ``kl`` for KTO; ``rewards/margins`` is derived by :func:`summarize_metrics`
as chosen minus rejected, which for pairs equals TRL's mean of per-pair margins) so they reduce
by summation too.

Batch-dependent losses: ``aot`` and ``aot_unpaired`` sort the batch's log-ratios, so their
per-pair values depend on the whole batch; like TRL (which computes them per device batch), the
caller computes them over the micro-batch it has.

Flag names are TRL's / ms-swift's (``beta``, ``loss_type``, ``loss_weights``,
``label_smoothing``, ``rpo_alpha``, ``reference_free``, ``discopop_tau``, ``simpo_gamma``,
``cpo_alpha``, ``desirable_weight``, ``undesirable_weight``, ``center_rewards_coefficient``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# the loss-type names live in the light flags module (``--help`` lists them without torch)
from mvlm.train.preference_flags import DPO_LOSS_ALIASES, DPO_LOSS_TYPES

Tensor = torch.Tensor
_NEEDS_LENGTHS = {"ipo", "sigmoid_norm", "sft"}
# Loss types whose formula reads label_smoothing ("sigmoid" is conservative DPO, Mitchell 2023,
# what ms-swift's --label_smoothing did with its TRL; TRL 1.16's sigmoid no longer reads it).
_USES_LABEL_SMOOTHING = {"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"}
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def _choices(names: Sequence[str]) -> str:
    return ", ".join(names)


def normalize_dpo_loss_types(loss_type: str | Sequence[str]) -> tuple[str, ...]:
    """``--loss_type`` value(s) -> canonical TRL names; unknown names are refused with the list."""
    names = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not names:
        raise ValueError("--loss_type needs at least one loss type; choose from "
                         f"{_choices(DPO_LOSS_TYPES)}")
    out = []
    for n in names:
        n = DPO_LOSS_ALIASES.get(n, n)
        if n not in DPO_LOSS_TYPES:
            raise ValueError(f"--loss_type {n!r} is not a DPO loss type; choose from "
                             f"{_choices(DPO_LOSS_TYPES)} (aliases: "
                             f"{', '.join(f'{k} = {v}' for k, v in DPO_LOSS_ALIASES.items())})")
        out.append(n)
    return tuple(out)


# ----------------------------------------------------------------------------- configs

@dataclass
class DPOLossConfig:
    """DPO hyper-parameters (TRL ``DPOConfig`` / ms-swift names)."""

    beta: float = 0.1
    loss_type: tuple[str, ...] | str = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    label_smoothing: float = 0.0
    rpo_alpha: float | None = None  # + rpo_alpha * NLL of the chosen completions (RPO)
    reference_free: bool = False  # reference log-probs taken as 0 (an implicit uniform ref)
    discopop_tau: float = 0.05

    def __post_init__(self):
        self.loss_type = normalize_dpo_loss_types(self.loss_type)
        if self.loss_weights is None:
            self.loss_weights = (1.0,) * len(self.loss_type)
        self.loss_weights = tuple(float(w) for w in self.loss_weights)
        if len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"--loss_weights has {len(self.loss_weights)} values for "
                             f"{len(self.loss_type)} loss types {list(self.loss_type)}: give one "
                             "weight per loss type")
        if not self.beta > 0:
            raise ValueError(f"--beta must be > 0 (the DPO temperature), got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing > 0 and not set(self.loss_type) & _USES_LABEL_SMOOTHING:
            raise ValueError(f"--label_smoothing {self.label_smoothing} has no effect on loss type "
                             f"{list(self.loss_type)}; it is read by "
                             f"{', '.join(sorted(_USES_LABEL_SMOOTHING))}. Drop the flag or "
                             "pick one of those")
        if "exo_pair" in self.loss_type and self.label_smoothing == 0:
            raise ValueError("--loss_type exo_pair needs --label_smoothing > 0 (the EXO paper "
                             "uses 1e-3): it takes log(label_smoothing)")
        if self.rpo_alpha is not None and self.rpo_alpha < 0:
            raise ValueError(f"--rpo_alpha must be >= 0, got {self.rpo_alpha}")
        if "discopop" in self.loss_type and not self.discopop_tau > 0:
            raise ValueError(f"--discopop_tau must be > 0, got {self.discopop_tau}")

    @property
    def needs_lengths(self) -> bool:
        return bool(set(self.loss_type) & _NEEDS_LENGTHS) or bool(self.rpo_alpha)


@dataclass
class CPOLossConfig:
    """CPO / SimPO hyper-parameters (TRL ``CPOConfig``; ms-swift runs SimPO as CPO with
    ``loss_type simpo``). ``cpo_alpha`` weighs the chosen NLL (the "BC regulariser")."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    cpo_alpha: float = 1.0
    simpo_gamma: float = 0.5

    def __post_init__(self):
        if self.loss_type not in CPO_LOSS_TYPES:
            raise ValueError(f"CPO --loss_type {self.loss_type!r} is unknown; choose from "
                             f"{_choices(CPO_LOSS_TYPES)}")
        if not self.beta > 0:
            raise ValueError(f"--beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing > 0 and self.loss_type in ("hinge", "ipo"):
            raise ValueError(f"--label_smoothing has no effect on CPO loss type {self.loss_type}; "
                             "drop it or use sigmoid / simpo")
        if self.cpo_alpha < 0:
            raise ValueError(f"--cpo_alpha must be >= 0, got {self.cpo_alpha}")


@dataclass
class KTOLossConfig:
    """KTO hyper-parameters (TRL ``KTOConfig``)."""

    beta: float = 0.1
    loss_type: str = "kto"
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self):
        if self.loss_type not in KTO_LOSS_TYPES:
            raise ValueError(f"KTO --loss_type {self.loss_type!r} is unknown; choose from "
                             f"{_choices(KTO_LOSS_TYPES)}")
        if not self.beta > 0:
            raise ValueError(f"--beta must be > 0, got {self.beta}")
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")

    @property
    def uses_kl(self) -> bool:
        return self.loss_type == "kto"


# ----------------------------------------------------------------------------- result

@dataclass
class PreferenceLoss:
    """A preference loss over one batch, kept in parts a trainer can reduce exactly.

    ``loss == pair_losses.mean() + nll_weight * nll_sum / nll_tokens`` (the NLL part only when
    ``nll_weight``), which is TRL's loss on the same batch. ``metrics`` maps TRL's metric names
    to detached ``(sum, count)`` tensors.
    """

    pair_losses: Tensor
    metrics: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    nll_sum: Tensor | None = None
    nll_tokens: Tensor | None = None
    nll_weight: float = 0.0

    @property
    def loss(self) -> Tensor:
        out = fp64_mean(self.pair_losses)
        if self.nll_weight:
            out = out + self.nll_weight * self.nll_sum / self.nll_tokens.clamp(min=1)
        return out


def fp64_mean(x: Tensor) -> Tensor:
    """Mean (NaNs skipped, as TRL's KTO does; 0 for an empty tensor) accumulated in fp64 and
    returned in ``x``'s dtype. Why: the step-0 invariant (reference == policy -> sigmoid DPO loss
    is ln 2 *exactly* in fp32) must hold for any batch size, and an fp32 sum of n equal values
    divided by n is not always that value (n = 13: off by one ulp); in fp64 it is exact."""
    if not x.numel():
        return x.new_zeros(())
    return x.double().nanmean().to(x.dtype)


def _metric(values: Tensor) -> tuple[Tensor, Tensor]:
    v = values.detach()
    return v.sum(), torch.tensor(float(v.numel()), dtype=v.dtype, device=v.device)


def summarize_metrics(metrics: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, float]:
    """``(sum, count)`` metrics (possibly summed over micro-batches / ranks) -> means, plus
    ``rewards/margins`` = rewards/chosen - rewards/rejected when both have a count (for pairs this
    is TRL's mean per-pair margin; for KTO it is what TRL logs)."""
    out = {k: float(s) / float(c) for k, (s, c) in metrics.items() if float(c) > 0}
    if "rewards/chosen" in out and "rewards/rejected" in out and "rewards/margins" not in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def _pair_metrics(beta_chosen: Tensor, beta_rejected: Tensor, chosen_logps: Tensor,
                  rejected_logps: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    return {"rewards/chosen": _metric(beta_chosen),
            "rewards/rejected": _metric(beta_rejected),
            "rewards/accuracies": _metric((beta_chosen > beta_rejected).to(beta_chosen.dtype)),
            "logps/chosen": _metric(chosen_logps),
            "logps/rejected": _metric(rejected_logps)}


def _lengths(x: Tensor | None, what: str, like: Tensor) -> Tensor:
    if x is None:
        raise ValueError(f"{what} token counts are needed by this loss (length-normalised terms "
                         "or an NLL term); pass chosen_tokens / rejected_tokens")
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)


def _nll_parts(chosen_logps: Tensor, chosen_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Summed NLL of the chosen completions and their token count (TRL's cross-entropy /
    ``sft`` term is their ratio: a token mean over the batch)."""
    return -chosen_logps.sum(), chosen_tokens.sum()


# ----------------------------------------------------------------------------- DPO

def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor | None, ref_rejected_logps: Tensor | None,
             cfg: DPOLossConfig, *, chosen_tokens: Tensor | None = None,
             rejected_tokens: Tensor | None = None) -> PreferenceLoss:
    """DPO with every TRL 1.16 loss type (a weighted sum when several are given), cDPO label
    smoothing on ``sigmoid``, ``rpo_alpha`` (adds the chosen NLL, TRL's ``sft`` term) and
    ``reference_free`` (reference log-probs = 0). All inputs are [B] summed log-probs."""
    pc, pr = policy_chosen_logps, policy_rejected_logps
    if cfg.reference_free:
        rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError("DPO needs reference log-probs (or reference_free=True)")
        rc, rr = ref_chosen_logps, ref_rejected_logps
    if cfg.needs_lengths:
        n_c = _lengths(chosen_tokens, "chosen", pc)
        n_r = _lengths(rejected_tokens, "rejected", pr)
    beta, ls = cfg.beta, cfg.label_smoothing
    c_ratio, r_ratio = pc - rc, pr - rr  # log pi/pi_ref of each completion
    delta = c_ratio - r_ratio
    total = torch.zeros_like(pc)
    nll_weight = 0.0
    for kind, weight in zip(cfg.loss_type, cfg.loss_weights, strict=True):
        if kind == "sigmoid":
            z = beta * delta
            per = -F.logsigmoid(z) if ls == 0 else \
                -(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)
        elif kind == "hinge":
            per = torch.relu(1 - beta * delta)
        elif kind == "ipo":  # per-token log-ratios (TRL normalises by the completion length)
            per = (c_ratio / n_c.clamp(min=1) - r_ratio / n_r.clamp(min=1)
                   - 1 / (2 * beta)) ** 2
        elif kind == "exo_pair":  # KL(softmax of the two implicit rewards || [1-eps, eps])
            z = beta * delta
            per = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-ls)) + \
                torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(ls))
        elif kind == "nca_pair":
            zc, zr = beta * c_ratio, beta * r_ratio
            per = -F.logsigmoid(zc) - 0.5 * F.logsigmoid(-zc) - 0.5 * F.logsigmoid(-zr)
        elif kind == "robust":  # unbiased under a flip rate label_smoothing (rDPO)
            z = beta * delta
            per = (-(1 - ls) * F.logsigmoid(z) + ls * F.logsigmoid(-z)) / (1 - 2 * ls)
        elif kind == "bco_pair":
            per = -F.logsigmoid(beta * c_ratio) - F.logsigmoid(-beta * r_ratio)
        elif kind == "sppo_hard":
            per = (c_ratio - 0.5 / beta) ** 2 + (r_ratio + 0.5 / beta) ** 2
        elif kind in ("aot", "aot_unpaired"):  # optimal transport: match sorted quantiles
            if kind == "aot":
                d = torch.sort(pc - pr, dim=0)[0] - torch.sort(rc - rr, dim=0)[0]
            else:
                d = torch.sort(c_ratio, dim=0)[0] - torch.sort(r_ratio, dim=0)[0]
            per = -(1 - ls) * F.logsigmoid(beta * d) - ls * F.logsigmoid(-beta * d)
        elif kind == "apo_zero":
            per = (1 - torch.sigmoid(beta * c_ratio)) + torch.sigmoid(beta * r_ratio)
        elif kind == "apo_down":
            per = torch.sigmoid(beta * c_ratio) + (1 - torch.sigmoid(beta * delta))
        elif kind == "discopop":  # logistic / exponential blend gated by the scaled margin
            z = beta * delta
            gate = torch.sigmoid(z / cfg.discopop_tau)
            per = -F.logsigmoid(z) * (1 - gate) + torch.exp(-z) * gate
        elif kind == "sft":  # an NLL term: reduced as a token mean, not per pair
            nll_weight += weight
            continue
        elif kind == "sigmoid_norm":
            per = -F.logsigmoid(beta * (c_ratio / n_c.clamp(min=1) - r_ratio / n_r.clamp(min=1)))
        else:  # pragma: no cover - normalize_dpo_loss_types refused it
            raise AssertionError(kind)
        total = total + weight * per
    if cfg.rpo_alpha:
        nll_weight += cfg.rpo_alpha
    out = PreferenceLoss(total, _pair_metrics(beta * c_ratio, beta * r_ratio, pc, pr))
    if nll_weight:
        out.nll_sum, out.nll_tokens = _nll_parts(pc, n_c)
        out.nll_weight = nll_weight
    return out


# ----------------------------------------------------------------------------- CPO / SimPO

def cpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, cfg: CPOLossConfig,
             *, chosen_tokens: Tensor, rejected_tokens: Tensor) -> PreferenceLoss:
    """CPO (reference-free DPO + ``cpo_alpha`` x chosen NLL) and SimPO (``loss_type simpo``:
    length-averaged log-probs with a target margin ``simpo_gamma``). IPO and SimPO use the
    per-token average log-probs, as TRL's CPOTrainer does."""
    n_c = _lengths(chosen_tokens, "chosen", policy_chosen_logps)
    n_r = _lengths(rejected_tokens, "rejected", policy_rejected_logps)
    if cfg.loss_type in ("ipo", "simpo"):
        pc, pr = policy_chosen_logps / n_c.clamp(min=1), policy_rejected_logps / n_r.clamp(min=1)
    else:
        pc, pr = policy_chosen_logps, policy_rejected_logps
    beta, ls = cfg.beta, cfg.label_smoothing
    h = pc - pr
    if cfg.loss_type == "simpo":
        h = h - cfg.simpo_gamma / beta
    if cfg.loss_type in ("sigmoid", "simpo"):
        per = -(1 - ls) * F.logsigmoid(beta * h) - ls * F.logsigmoid(-beta * h)
    elif cfg.loss_type == "hinge":
        per = torch.relu(1 - beta * h)
    else:  # ipo
        per = (h - 1 / (2 * beta)) ** 2
    out = PreferenceLoss(per, _pair_metrics(beta * pc, beta * pr, pc, pr))
    if cfg.cpo_alpha:
        out.nll_sum, out.nll_tokens = _nll_parts(policy_chosen_logps, n_c)
        out.nll_weight = cfg.cpo_alpha
        out.metrics["nll_loss"] = (out.nll_sum.detach(), out.nll_tokens.detach())
    return out


# ----------------------------------------------------------------------------- ORPO

def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, stable on both sides of -ln 2 (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, beta: float, *,
              chosen_tokens: Tensor, rejected_tokens: Tensor) -> PreferenceLoss:
    """ORPO: chosen NLL - beta * log sigmoid(log odds(chosen) - log odds(rejected)), odds of the
    per-token average probability; ``beta`` is the paper's lambda (as in TRL and ms-swift).

    The NLL is over the chosen *response* tokens, the paper's L_SFT (Hong et al. 2024, Eq. 2).
    TRL 1.16's ORPOTrainer takes it over prompt + response (the authors' code); the test checks
    this function against TRL's with the prompt masked out of TRL's attention mask, which makes
    TRL's NLL the response NLL."""
    if not beta > 0:
        raise ValueError(f"--beta (ORPO's lambda) must be > 0, got {beta}")
    n_c = _lengths(chosen_tokens, "chosen", policy_chosen_logps)
    n_r = _lengths(rejected_tokens, "rejected", policy_rejected_logps)
    pc = policy_chosen_logps / n_c.clamp(min=1)
    pr = policy_rejected_logps / n_r.clamp(min=1)
    log_odds = (pc - pr) - (_log1mexp(pc) - _log1mexp(pr))
    ratio = F.logsigmoid(log_odds)
    out = PreferenceLoss(-beta * ratio, _pair_metrics(beta * pc, beta * pr, pc, pr))
    out.nll_sum, out.nll_tokens = _nll_parts(policy_chosen_logps, n_c)
    out.nll_weight = 1.0
    out.metrics["log_odds_ratio"] = _metric(ratio)
    out.metrics["log_odds_chosen"] = _metric(log_odds)
    out.metrics["nll_loss"] = (out.nll_sum.detach(), out.nll_tokens.detach())
    return out


# ----------------------------------------------------------------------------- KTO

def kto_kl_estimate(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum, count)`` of log pi/pi_ref on the mismatched (prompt_i, completion_{i-1}) pairs.

    KTO's reference point is the batch's mean KL; a trainer sums these over micro-batches / DP
    ranks, divides, and passes the mean to :func:`kto_loss` (which clamps it at 0, as TRL does
    after its gather)."""
    d = (policy_kl_logps - ref_kl_logps).detach()
    return d.sum(), torch.tensor(float(d.numel()), dtype=d.dtype, device=d.device)


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, cfg: KTOLossConfig,
             kl: Tensor | None = None) -> PreferenceLoss:
    """KTO (Ethayarajh 2024, Eq. 7) and its unpaired APO-zero variant, per example.

    ``labels``: True = desirable. ``kl``: the batch's mean KL estimate (see
    :func:`kto_kl_estimate`); needed by ``loss_type kto``, unused by ``apo_zero_unpaired``.
    ``pair_losses`` lists desirable examples first, then undesirable, as TRL concatenates them.
    """
    labels = torch.as_tensor(labels, dtype=torch.bool, device=policy_logps.device)
    beta = cfg.beta
    if cfg.uses_kl:
        if kl is None:
            raise ValueError("KTO needs the KL estimate (kto_kl_estimate) of the batch")
        z0 = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device)
        z0 = z0.detach().clamp(min=0)
    ratio = policy_logps - ref_logps
    c_ratio, r_ratio = ratio[labels], ratio[~labels]
    if cfg.loss_type == "kto":
        c_loss = 1 - torch.sigmoid(beta * (c_ratio - z0))
        r_loss = 1 - torch.sigmoid(beta * (z0 - r_ratio))
    else:  # apo_zero_unpaired
        c_loss = 1 - torch.sigmoid(beta * c_ratio)
        r_loss = torch.sigmoid(beta * r_ratio)
    losses = torch.cat([cfg.desirable_weight * c_loss, cfg.undesirable_weight * r_loss])
    metrics = {"rewards/chosen": _metric(beta * c_ratio),
               "rewards/rejected": _metric(beta * r_ratio),
               "logps/chosen": _metric(policy_logps[labels]),
               "logps/rejected": _metric(policy_logps[~labels])}
    if cfg.uses_kl:
        metrics["kl"] = (z0, torch.ones((), dtype=z0.dtype, device=z0.device))
    return PreferenceLoss(losses, metrics)


# ----------------------------------------------------------------------------- reward model

def reward_model_loss(rewards_chosen: Tensor, rewards_rejected: Tensor, *,
                      margin: Tensor | None = None,
                      center_rewards_coefficient: float | None = None) -> PreferenceLoss:
    """Bradley-Terry: -log sigmoid(r_c - r_r [- margin]), plus
    ``center_rewards_coefficient * (r_c + r_r)^2`` (keeps rewards centred at 0, Eisenstein et
    al. 2023). Metrics: TRL RewardTrainer's ``accuracy``, ``margin`` and ``mean_reward`` (its
    min/max do not reduce as sums and are left out) and ``rewards/chosen`` /
    ``rewards/rejected``."""
    rc, rr = rewards_chosen, rewards_rejected
    diff = rc - rr if margin is None else rc - rr - margin
    per = -F.logsigmoid(diff)
    if center_rewards_coefficient:
        per = per + center_rewards_coefficient * (rc + rr) ** 2
    metrics = {"accuracy": _metric((rc > rr).to(rc.dtype)), "margin": _metric(rc - rr),
               "mean_reward": _metric(torch.cat([rc, rr])),
               "rewards/chosen": _metric(rc), "rewards/rejected": _metric(rr)}
    return PreferenceLoss(per, metrics)
