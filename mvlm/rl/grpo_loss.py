"""The GRPO-family policy loss on per-token log-probs, normalised by GLOBAL counts, and its metrics.

Inputs are ``[B, T]`` tensors over completion tokens (row = one completion, full length: gather
context-parallel chunks first) plus a ``[B, T]`` completion mask:

* ``logps``: log pi_theta of the sampled tokens under the policy being trained (with grad);
* ``old_logps``: the same under the policy that generated the rollout, computed by the TRAINER
  (``None`` = on-policy, ``--num_iterations 1``: then ``old = logps.detach()``);
* ``ref_logps``: under the reference model (needed only for ``--beta`` != 0);
* ``rollout_logps``: what the rollout ENGINE reports for the sampled tokens under the same
  tempered distribution the trainer computes (``log_softmax(logits / temperature)``; the engine's
  ``logprobs``), optional: the rollout/trainer mismatch metrics compare it with ``old``;
* ``sampling_logps``: the engine's log-prob under the distribution it actually drew from (after
  repetition penalty / top-k / top-p; ``sampling_logprobs``), optional: when given, the importance
  weights of ``--rollout_importance_sampling_mode`` correct for THAT distribution, else for
  ``rollout_logps``. The GRPO objective passes only ``rollout_logps`` (as ms-swift and veRL do):
  the correction then targets the engine/trainer numerical mismatch and stays ~1, whereas weights
  against a top-k/top-p-truncated distribution are ~the kept probability mass (0.08 on the tiny
  test model), which mostly rescales the learning rate.

Why global denominators: GRPO's losses are means (over sequences, or over tokens, or over
``N * max_completion_length``). Taking the mean inside each micro-batch and averaging the
micro-batches makes the loss depend on how the batch was split over micro-batches and DP ranks
(TRL's ``bnpo`` is documented to do exactly that). Here the caller counts the loss tokens and
completions of the WHOLE step once (:meth:`LossDenominators.from_masks`, summed over its
micro-batches and all-reduced over the data-parallel group) and each call returns its micro-batch's
share; the step's loss is the sum of the shares, identical for every layout.

Loss types (``--loss_type``), per-token loss ``l`` and reduction ``m`` = mask:

* ``grpo``, ``sapo``: ``sum_i (sum_t l*m / n_i) / N_seq`` (sequence mean of token means);
* ``bnpo``, ``dapo``, ``cispo``: ``sum(l*m) / N_tok``. ``bnpo`` and ``dapo`` coincide here: TRL's
  ``bnpo`` divides by the tokens of each device's micro-batch, which is this value when the step is
  one micro-batch on one device and a split-dependent one otherwise;
* ``dr_grpo``: ``sum(l*m) / (N_seq * --max_completion_length)``.

Per-token loss, with ratio ``c = exp(w)`` where ``w`` is chosen by ``--importance_sampling_level``
(``token``: ``log pi - log pi_old``; ``sequence`` (GSPO): the completion's mean of that;
``sequence_token`` (GSPO-token): ``sg[sequence value] + log pi - sg[log pi]``, the sequence value
forward with per-token gradients):

* clipped types: ``-min(c*A, clip(c, 1 - epsilon, 1 + epsilon_high)*A)``;
* ``cispo``: ``-sg[min(c, epsilon_high)] * A * log pi`` (``--epsilon_high`` is an upper bound on
  the ratio itself, e.g. 5.0, and must be given);
* ``sapo``: ``-sigmoid(tau*(c-1)) * 4/tau * A``, ``tau`` = ``--tau_pos`` if ``A > 0`` else
  ``--tau_neg``.

Then ``+ beta * KL`` with the k3 estimator ``exp(ref - logp) - (ref - logp) - 1`` (not with
``--kl_in_reward``, where the KL is a reward penalty), then ``* rollout IS weight``. The order and
the IS definitions follow ms-swift (whose flags these are): the weight multiplies the KL term too,
``sequence_*`` modes use the completion's geometric-mean ratio, and the threshold is an upper bound
(``--rollout_importance_sampling_threshold``, default 2.0). TRL's ``vllm_importance_sampling_*``
differ (product ratio, weight before the KL, lower bound); they agree with these for token modes at
``--beta 0``, which the tests check.

Masked positions never reach ``exp``: padding log-probs (often -inf or -1e10) are zeroed first, so
step 0 (old == new == ref) gives ratio 1 and KL 0 exactly.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence", "sequence_token")
ROLLOUT_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo")
_SEQ_MEAN = ("grpo", "sapo")
_LOG_RATIO_BOUND = 20.0  # ms-swift's safety bound on the rollout log-ratio (exp(20) ~ 5e8)


@dataclass
class GRPOLossConfig:
    """Loss flags (ms-swift names and defaults)."""

    loss_type: str = "grpo"
    epsilon: float = 0.2
    epsilon_high: float | None = None      # None -> epsilon (symmetric clip)
    beta: float = 0.04
    kl_in_reward: bool = False              # AdvantageConfig.kl_in_reward: no KL term in the loss
    importance_sampling_level: str = "token"
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    rollout_importance_sampling_mode: str | None = None
    rollout_importance_sampling_threshold: float = 2.0
    max_completion_length: int | None = None  # dr_grpo's L_max

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"--loss_type {self.loss_type!r}: choose one of "
                             f"{', '.join(LOSS_TYPES)}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"--importance_sampling_level {self.importance_sampling_level!r}: "
                             f"choose one of {', '.join(IMPORTANCE_SAMPLING_LEVELS)}")
        if (self.rollout_importance_sampling_mode is not None
                and self.rollout_importance_sampling_mode not in ROLLOUT_IS_MODES):
            raise ValueError(f"--rollout_importance_sampling_mode "
                             f"{self.rollout_importance_sampling_mode!r}: choose one of "
                             f"{', '.join(ROLLOUT_IS_MODES)}")
        if not self.rollout_importance_sampling_threshold > 0:
            raise ValueError("--rollout_importance_sampling_threshold must be > 0 (an upper bound "
                             f"on the IS ratio), got {self.rollout_importance_sampling_threshold}")
        if not 0 < self.epsilon < 1:
            raise ValueError(f"--epsilon {self.epsilon}: the clip range is [1 - epsilon, "
                             "1 + epsilon_high], pass a value in (0, 1) such as 0.2")
        if self.loss_type == "cispo" and self.epsilon_high is None:
            raise ValueError("--loss_type cispo clips the ratio itself at --epsilon_high "
                             "(e.g. --epsilon_high 5.0); it has no sensible default from --epsilon")
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if not self.epsilon_high > 0:
            raise ValueError(f"--epsilon_high {self.epsilon_high} must be > 0")
        if self.beta < 0:
            raise ValueError(f"--beta {self.beta} must be >= 0 (0 = no KL, no reference model)")
        if self.loss_type == "dr_grpo" and not self.max_completion_length:
            raise ValueError("--loss_type dr_grpo divides by --max_completion_length: set it")
        if min(self.tau_pos, self.tau_neg) <= 0:
            raise ValueError(f"--tau_pos {self.tau_pos} / --tau_neg {self.tau_neg} must be > 0")

    @property
    def kl_in_loss(self) -> bool:
        return self.beta != 0.0 and not self.kl_in_reward


@dataclass
class LossDenominators:
    """Global counts of one optimizer step: loss tokens and completions over every micro-batch of
    every data-parallel rank (after ``--overlong_filter``; completions with no loss token still
    count as completions, as in TRL and ms-swift)."""

    num_tokens: float
    num_sequences: float

    @classmethod
    def from_masks(cls, masks: Iterable[torch.Tensor], group: object | None = None
                   ) -> LossDenominators:
        """Sum the counts of this rank's micro-batch masks, then all-reduce them over ``group``
        (the data-parallel group; ``None`` = this process only). Ranks that hold the same rows
        (TP/PP/CP peers) must not be in ``group``."""
        tot = torch.zeros(2, dtype=torch.float64)
        for m in masks:
            tot += torch.tensor([float(m.sum()), float(m.shape[0])], dtype=torch.float64)
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(tot, group=group)
        return cls(num_tokens=float(tot[0]), num_sequences=float(tot[1]))


@dataclass
class GRPOLossOutput:
    """One micro-batch's share of the step loss and its metric sums.

    ``sums[name]`` = ``tensor([sum, count])``, ``maxes[name]`` = scalar: combine them over
    micro-batches and ranks with :func:`reduce_metrics` (means of means would weight micro-batches
    of different sizes wrongly)."""

    loss: torch.Tensor
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    maxes: dict[str, torch.Tensor] = field(default_factory=dict)


def _masked(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(m == 0, 0.0)


def rollout_is_weights(old_logps: torch.Tensor, rollout_logps: torch.Tensor, mask: torch.Tensor,
                       mode: str, threshold: float) -> torch.Tensor:
    """Importance weights ``pi_old / pi_rollout`` correcting for the engine's sampling distribution
    (ms-swift's definitions; no gradient). ``[B, T]``; 0 on masked positions.

    * ``token_truncate``: per-token ratio, capped at ``threshold``;
    * ``token_mask``: per-token ratio, 0 where it exceeds ``threshold``;
    * ``sequence_truncate``: the completion's geometric-mean ratio, capped, on each of its tokens;
    * ``sequence_mask``: per-token ratios, the whole completion 0 where its geometric mean exceeds
      ``threshold``.
    """
    m = mask.to(old_logps.dtype)
    lr = _masked((old_logps - rollout_logps).detach(), m).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    ratio = lr.exp()
    if mode.startswith("sequence"):
        seq = ((lr * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)).exp()
    if mode == "token_truncate":
        w = ratio.clamp(max=threshold)
    elif mode == "token_mask":
        w = torch.where(ratio <= threshold, ratio, torch.zeros_like(ratio))
    elif mode == "sequence_truncate":
        w = seq.clamp(max=threshold).expand_as(ratio)
    elif mode == "sequence_mask":
        w = ratio * (seq <= threshold).to(ratio.dtype)
    else:
        raise ValueError(f"--rollout_importance_sampling_mode {mode!r}: choose one of "
                         f"{', '.join(ROLLOUT_IS_MODES)}")
    return w * m


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, completion_mask: torch.Tensor, cfg: GRPOLossConfig,
              denoms: LossDenominators, *, rollout_logps: torch.Tensor | None = None,
              sampling_logps: torch.Tensor | None = None,
              entropies: torch.Tensor | None = None) -> GRPOLossOutput:
    """This micro-batch's share of the step's GRPO-family loss (see the module docstring).

    ``advantages``: ``[B]`` (one per completion) or ``[B, T]``. Metrics: ``kl`` (when
    ``ref_logps`` is given), ``clip_ratio/low_mean|high_mean|region_mean`` (clipped types),
    ``clip_ratio/cispo`` (cispo), ``entropy`` (when given), ``ratio/mean`` and max
    ``ratio/max_abs_dev`` = max |c - 1|, and with ``rollout_logps`` the rollout/trainer
    mismatch ``token_mult_prob_error`` = mean exp|old - rollout| and max ``logp_abs_diff_max``,
    plus ``rollout_is/weight_mean`` and ``rollout_is/clipped_frac`` when the correction is on.
    """
    if logps.dim() != 2 or completion_mask.shape != logps.shape:
        raise ValueError(f"logps {tuple(logps.shape)} and completion_mask "
                         f"{tuple(completion_mask.shape)} must both be [B, T]")
    m = completion_mask.to(logps.dtype)
    lp = _masked(logps, m)
    old = lp.detach() if old_logps is None else _masked(old_logps.to(logps.dtype), m).detach()
    adv = advantages.to(logps.dtype)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    if adv.shape[0] != logps.shape[0]:
        raise ValueError(f"{adv.shape[0]} advantages for {logps.shape[0]} completions")
    sums: dict[str, torch.Tensor] = {}
    maxes: dict[str, torch.Tensor] = {}
    n_seq_tok = m.sum(-1, keepdim=True)

    def add_mean(name: str, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64)
        if x.shape[-1] == 1 and m.shape[-1] != 1:  # one value per completion
            sums[name] = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), dtype=x.dtype)])
        else:  # where(), not a product: NaN/inf on padding (entropies often) must not leak
            sums[name] = torch.stack([torch.where(m > 0, x, 0.0).sum(),
                                      m.to(torch.float64).sum()])

    log_ratio = lp - old
    level = cfg.importance_sampling_level
    if level == "token":
        w = log_ratio
    else:
        seq = (log_ratio * m).sum(-1, keepdim=True) / n_seq_tok.clamp(min=1.0)
        w = seq if level == "sequence" else seq.detach() + lp - lp.detach()
    coef = w.exp()
    add_mean("ratio/mean", coef)
    dev = (coef.detach() - 1).abs()
    maxes["ratio/max_abs_dev"] = (_masked(dev.expand_as(m), m) if dev.shape != m.shape
                                  else _masked(dev, m)).max().to(torch.float64)

    lt = cfg.loss_type
    if lt == "cispo":
        per = -coef.clamp(max=cfg.epsilon_high).detach() * adv * lp
        add_mean("clip_ratio/cispo", ((coef > cfg.epsilon_high) & (adv > 0)).to(lp.dtype))
    elif lt == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, cfg.tau_pos),
                          torch.full_like(adv, cfg.tau_neg))
        per = -torch.sigmoid(tau * (coef - 1)) * (4.0 / tau) * adv
    else:
        clipped = coef.clamp(1 - cfg.epsilon, 1 + cfg.epsilon_high)
        per = -torch.min(coef * adv, clipped * adv)
        low = (coef < 1 - cfg.epsilon) & (adv < 0)
        high = (coef > 1 + cfg.epsilon_high) & (adv > 0)
        add_mean("clip_ratio/low_mean", low.to(lp.dtype))
        add_mean("clip_ratio/high_mean", high.to(lp.dtype))
        add_mean("clip_ratio/region_mean", (low | high).to(lp.dtype))

    if ref_logps is not None:
        d = _masked(ref_logps.to(logps.dtype), m).detach() - lp
        kl = d.exp() - d - 1
        add_mean("kl", kl)
        if cfg.kl_in_loss:
            per = per + cfg.beta * kl
    elif cfg.kl_in_loss:
        raise ValueError(f"--beta {cfg.beta} adds a KL to the reference model: pass ref_logps "
                         "(or --beta 0, which needs no reference model)")

    if rollout_logps is not None:
        diff = _masked((old - rollout_logps.to(logps.dtype)).detach(), m).abs()
        add_mean("token_mult_prob_error", diff.exp())
        maxes["logp_abs_diff_max"] = diff.max().to(torch.float64)
    mode = cfg.rollout_importance_sampling_mode
    if mode is not None:
        q = sampling_logps if sampling_logps is not None else rollout_logps
        if q is None:
            raise ValueError("--rollout_importance_sampling_mode needs the rollout engine's "
                             "per-token log-probs (rollout_logps / sampling_logps) for every "
                             "completion")
        q = q.to(logps.dtype).detach()
        is_w = rollout_is_weights(old, q, m, mode, cfg.rollout_importance_sampling_threshold)
        per = per * is_w
        add_mean("rollout_is/weight_mean", is_w)
        # fraction of tokens (token modes) or completions (sequence modes) over the threshold
        lr = _masked(old - q, m).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
        if not mode.startswith("token"):
            lr = (lr * m).sum(-1, keepdim=True) / n_seq_tok.clamp(min=1.0)
        over = lr.exp() > cfg.rollout_importance_sampling_threshold
        add_mean("rollout_is/clipped_frac", over.to(lp.dtype))

    if entropies is not None:
        add_mean("entropy", entropies)

    # [B, T]; a [B, 1] per-completion loss broadcasts over its tokens; padding is exactly 0
    tok = torch.where(m > 0, per, 0.0)
    if lt in _SEQ_MEAN:
        loss = (tok.sum(-1, keepdim=True) / n_seq_tok.clamp(min=1.0)).sum() / denoms.num_sequences
    elif lt == "dr_grpo":
        loss = tok.sum() / (denoms.num_sequences * cfg.max_completion_length)
    else:
        loss = tok.sum() / max(denoms.num_tokens, 1.0)
    return GRPOLossOutput(loss=loss, sums=sums, maxes=maxes)


def reduce_metrics(outputs: Sequence[GRPOLossOutput], group: object | None = None
                   ) -> dict[str, float]:
    """Combine micro-batch metrics into step metrics: token-weighted means (sum / count) and maxima,
    all-reduced over ``group`` (the data-parallel group) when given. Every rank must pass outputs
    with the same metric names (same config), so the collectives line up."""
    names = sorted({k for o in outputs for k in o.sums})
    mnames = sorted({k for o in outputs for k in o.maxes})
    s = torch.zeros(len(names), 2, dtype=torch.float64)
    mx = torch.full((len(mnames),), -float("inf"), dtype=torch.float64)
    for o in outputs:
        for i, k in enumerate(names):
            if k in o.sums:
                s[i] += o.sums[k].detach().cpu().to(torch.float64)
        for i, k in enumerate(mnames):
            if k in o.maxes:
                mx[i] = torch.maximum(mx[i], o.maxes[k].detach().cpu().to(torch.float64))
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(s, group=group)
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
    out = {k: float(s[i, 0] / s[i, 1]) if s[i, 1] > 0 else float("nan")
           for i, k in enumerate(names)}
    out.update({k: float(mx[i]) for i, k in enumerate(mnames)})
    return out


class LogprobMismatchError(RuntimeError):
    """The rollout engine and the trainer disagree on the log-probs of the sampled tokens."""


def check_logprob_mismatch(metrics: dict[str, float], max_logprob_mismatch: float | None) -> None:
    """Stop the run when ``token_mult_prob_error`` exceeds ``--max_logprob_mismatch``: a silent
    mismatch between what the engine sampled and what the trainer computes makes every ratio and
    KL wrong. ``None`` disables the check."""
    v = metrics.get("token_mult_prob_error")
    if max_logprob_mismatch is None or v is None:
        return
    if not v <= max_logprob_mismatch:  # also catches NaN
        raise LogprobMismatchError(
            f"rollout/trainer log-prob mismatch: token_mult_prob_error = mean exp|logp_trainer - "
            f"logp_rollout| = {v:.6g} > --max_logprob_mismatch {max_logprob_mismatch} (max |dlogp| "
            f"= {metrics.get('logp_abs_diff_max', float('nan')):.4g}). The engine's weights, "
            "sampling settings (temperature, top-p/k, repetition penalty), chat template or "
            "precision differ from the trainer's; fix that, or raise the limit knowingly")
