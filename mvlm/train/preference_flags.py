"""Offline preference flags (DPO and its loss types) with TRL / ms-swift names and defaults.

Light on purpose (argparse only; the loss module, which imports torch, is imported inside
:func:`dpo_loss_config`), so ``mvlm rlhf --help`` stays fast and lists the loss types. The loss
type names live here, once; :mod:`mvlm.train.objectives.dpo_losses` imports them.

Defaults follow ms-swift's ``RLHFArguments``: ``--beta`` 0.1, ``--loss_type sigmoid``,
``--label_smoothing`` 0, ``--rpo_alpha`` None (no NLL term). ``--dpo_loss_type`` is the older
ms-swift spelling of ``--loss_type`` (the guide's §5.5 script uses it): it is mapped with one info
line.
"""
from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

from mvlm.data.flags import str2bool

if TYPE_CHECKING:
    from mvlm.train.objectives.dpo_losses import CPOLossConfig, DPOLossConfig, KTOLossConfig

log = logging.getLogger("mvlm.train")

# TRL 1.16 DPOTrainer's loss types, in its order.
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                  "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
                  "sigmoid_norm")
# Older TRL / ms-swift spellings -> the current name (same formula).
DPO_LOSS_ALIASES = {"aot_pair": "aot_unpaired"}


def add_dpo_args(p: argparse._ActionsContainer) -> None:
    """Register the DPO flags on ``p`` (a parser or an argument group)."""
    a = p.add_argument
    a("--beta", type=float, default=None,
      help="DPO temperature: strength of the implicit KL to the reference (IPO: its tau); "
      "ORPO: lambda; default 0.1 (simpo: 2.0)")
    a("--loss_type", nargs="+", default=None, metavar="TYPE",
      help="DPO loss type(s), summed with --loss_weights: " + ", ".join(DPO_LOSS_TYPES)
      + " (aot_pair = aot_unpaired); default sigmoid")
    a("--dpo_loss_type", nargs="+", default=None, metavar="TYPE",
      help="older ms-swift spelling of --loss_type (mapped with an info line)")
    a("--loss_weights", nargs="+", type=float, default=None,
      help="one weight per --loss_type (default 1 each)")
    a("--label_smoothing", type=float, default=0.0,
      help="assumed label-flip rate in [0, 0.5): conservative DPO on sigmoid; robust, exo_pair, "
      "aot, aot_unpaired read it too")
    a("--rpo_alpha", type=float, default=None,
      help="RPO: + rpo_alpha x NLL of the chosen answers (token mean); default none")
    a("--reference_free", type=str2bool, nargs="?", const=True, default=False,
      help="no reference model: reference log-probs taken as 0")
    a("--discopop_tau", type=float, default=0.05, help="DiscoPOP gate temperature")
    a("--precompute_ref_log_probs", type=str2bool, nargs="?", const=True, default=False,
      help="DPO / KTO: one pass of the reference over the data before the first step; its "
      "log-probs are kept per pair and the reference model is dropped (no reference forward "
      "per step)")
    a("--ref_model", default=None, metavar="DIR",
      help="DPO reference: this HF model directory (frozen, the policy's parallel layout, no "
      "optimizer; its architecture must be the policy's) instead of the policy's starting "
      "weights (full training) or the adapter-free policy (LoRA)")


def add_cpo_args(p: argparse._ActionsContainer) -> None:
    """CPO / SimPO flags (``--beta``, ``--loss_type``, ``--label_smoothing`` are DPO's)."""
    a = p.add_argument
    a("--cpo_alpha", type=float, default=1.0,
      help="CPO/SimPO: weight of the chosen answers' NLL (0 = pure SimPO)")
    a("--simpo_gamma", type=float, default=1.0, help="SimPO target reward margin")


def add_kto_args(p: argparse._ActionsContainer) -> None:
    """KTO flags (``--beta`` and ``--loss_type`` kto | apo_zero_unpaired are shared)."""
    a = p.add_argument
    a("--desirable_weight", type=float, default=1.0,
      help="KTO: weight of the desirable (label true) rows' losses")
    a("--undesirable_weight", type=float, default=1.0,
      help="KTO: weight of the undesirable (label false) rows' losses")


def add_rm_args(p: argparse._ActionsContainer) -> None:
    """Reward-model flags."""
    p.add_argument("--center_rewards_coefficient", type=float, default=None,
                   help="RM: + coefficient x (r_chosen + r_rejected)^2, keeps rewards near 0 "
                   "(TRL's; default none)")


# flags of KTO and the RM, refused by the pair methods
_KTO_RM = ("desirable_weight", "undesirable_weight", "center_rewards_coefficient")
_NO_REF = ("precompute_ref_log_probs",)  # refused by the methods without a reference


def _refuse_unused(ns: Any, method: str, names: tuple[str, ...]) -> None:
    """Flags the method does not read, set away from their defaults, are refused."""
    defaults = {"loss_weights": None, "rpo_alpha": None, "reference_free": False,
                "discopop_tau": 0.05, "label_smoothing": 0.0, "loss_type": None,
                "dpo_loss_type": None, "cpo_alpha": 1.0, "simpo_gamma": 1.0, "ref_model": None,
                "desirable_weight": 1.0, "undesirable_weight": 1.0,
                "precompute_ref_log_probs": False,
                "center_rewards_coefficient": None}
    for n in names:
        if getattr(ns, n, defaults[n]) != defaults[n]:
            raise ValueError(f"--{n} has no effect with --rlhf_type {method}: drop it")


def resolve_dpo_loss_type(ns: Any, notes: list[str] | None = None) -> list[str]:
    """``--loss_type``, or ``--dpo_loss_type`` mapped to it (one info line: appended to
    ``notes`` when given, else logged), or sigmoid; both given and different is refused."""
    lt, old = getattr(ns, "loss_type", None), getattr(ns, "dpo_loss_type", None)
    if old is not None:
        if lt is not None and list(lt) != list(old):
            raise ValueError(f"--dpo_loss_type {' '.join(old)} and --loss_type {' '.join(lt)} "
                             "disagree; --dpo_loss_type is the older name of --loss_type: "
                             "keep one")
        note = f"--dpo_loss_type {' '.join(old)} -> --loss_type {' '.join(old)} (current name)"
        if notes is not None:
            notes.append(note)
        else:
            log.info("%s", note)
        lt = old
    return list(lt) if lt else ["sigmoid"]


def dpo_loss_config(ns: Any, notes: list[str] | None = None) -> DPOLossConfig:
    """The validated DPO loss settings of a parsed namespace (errors name the flag); mapping
    notes go to ``notes`` (a run's info lines) when given."""
    from mvlm.train.objectives.dpo_losses import DPOLossConfig

    _refuse_unused(ns, "dpo", ("cpo_alpha", "simpo_gamma") + _KTO_RM)
    if getattr(ns, "ref_model", None) is not None and ns.reference_free:
        raise ValueError("--ref_model with --reference_free: a reference-free run reads no "
                         "reference model; drop one of them")
    if getattr(ns, "precompute_ref_log_probs", False) and ns.reference_free:
        raise ValueError("--precompute_ref_log_probs with --reference_free: a reference-free "
                         "run has no reference log-probs to precompute; drop one of them")
    return DPOLossConfig(beta=0.1 if ns.beta is None else ns.beta,
                         loss_type=tuple(resolve_dpo_loss_type(ns, notes)),
                         loss_weights=tuple(ns.loss_weights) if ns.loss_weights else None,
                         label_smoothing=ns.label_smoothing, rpo_alpha=ns.rpo_alpha,
                         reference_free=bool(ns.reference_free), discopop_tau=ns.discopop_tau)


def cpo_loss_config(ns: Any, method: str = "cpo") -> CPOLossConfig:
    """CPO (``method`` cpo) or SimPO (``simpo``: CPO with loss type simpo and beta 2.0, as
    ms-swift runs it) settings of a parsed namespace."""
    from mvlm.train.objectives.dpo_losses import CPOLossConfig

    _refuse_unused(ns, method, ("loss_weights", "rpo_alpha", "reference_free", "discopop_tau",
                                "dpo_loss_type", "ref_model") + _KTO_RM + _NO_REF)
    lt = ns.loss_type or ["simpo" if method == "simpo" else "sigmoid"]
    if len(lt) != 1:
        raise ValueError(f"--rlhf_type {method} takes one --loss_type, got {' '.join(lt)}")
    beta = ns.beta if ns.beta is not None else (2.0 if method == "simpo" else 0.1)
    return CPOLossConfig(beta=beta, loss_type=lt[0], label_smoothing=ns.label_smoothing,
                         cpo_alpha=ns.cpo_alpha, simpo_gamma=ns.simpo_gamma)


def orpo_beta(ns: Any) -> float:
    """ORPO's lambda (``--beta``, default 0.1); its other DPO/CPO flags are refused."""
    _refuse_unused(ns, "orpo", ("loss_weights", "rpo_alpha", "reference_free", "discopop_tau",
                                "label_smoothing", "loss_type", "dpo_loss_type", "cpo_alpha",
                                "simpo_gamma", "ref_model") + _KTO_RM + _NO_REF)
    beta = 0.1 if ns.beta is None else ns.beta
    if not beta > 0:
        raise ValueError(f"--beta (ORPO's lambda) must be > 0, got {beta}")
    return beta


def kto_loss_config(ns: Any) -> KTOLossConfig:
    """KTO settings (``--beta`` default 0.1, ``--loss_type`` kto | apo_zero_unpaired, the two
    weights); the DPO/CPO flags KTO does not read are refused."""
    from mvlm.train.objectives.dpo_losses import KTOLossConfig

    _refuse_unused(ns, "kto", ("loss_weights", "rpo_alpha", "reference_free", "discopop_tau",
                               "label_smoothing", "dpo_loss_type", "cpo_alpha", "simpo_gamma",
                               "center_rewards_coefficient"))
    lt = ns.loss_type or ["kto"]
    if len(lt) != 1:
        raise ValueError(f"--rlhf_type kto takes one --loss_type, got {' '.join(lt)}")
    return KTOLossConfig(beta=0.1 if ns.beta is None else ns.beta, loss_type=lt[0],
                         desirable_weight=ns.desirable_weight,
                         undesirable_weight=ns.undesirable_weight)


def rm_center_coefficient(ns: Any) -> float | None:
    """The RM's ``--center_rewards_coefficient``; the DPO/CPO/KTO flags are refused."""
    _refuse_unused(ns, "rm", ("loss_weights", "rpo_alpha", "reference_free", "discopop_tau",
                              "label_smoothing", "loss_type", "dpo_loss_type", "cpo_alpha",
                              "simpo_gamma", "ref_model", "desirable_weight",
                              "undesirable_weight") + _NO_REF)
    if ns.beta is not None:
        raise ValueError("--beta has no effect with --rlhf_type rm: drop it")
    c = ns.center_rewards_coefficient
    if c is not None and c < 0:
        raise ValueError(f"--center_rewards_coefficient must be >= 0, got {c}")
    return c
