"""Activation recompute settings (the ``--recompute_*`` flags) checked against a model and layout.

Why a module of its own: ``mvlm.train.args`` validates the flag combinations before anything
heavy is imported (a wrong flag must fail in a second, not after Megatron-Core's import), and
:func:`mvlm.models.gpt.transformer_config` adds the checks that need the model's layer count. So
this module imports the standard library only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mvlm.models.gpt import TextArch
    from mvlm.runtime.parallel import ParallelLayout

# Submodules Megatron-Core's selective recompute can re-run, and when each one applies to mvlm's
# models (the local spec has no grouped-GEMM experts and no MLA).
_SELECTIVE_MODULES = {
    "core_attn": "the core attention (softmax(QK^T)V), Megatron's default",
    "mlp": "the dense MLP (dense models only; MoE layers use 'moe')",
    "layernorm": "input_layernorm and pre_mlp_layernorm (output discarded, re-run in backward)",
    "moe": "the whole MoE layer (MoE models only)",
    "shared_experts": "the MoE shared experts (MoE models with shared experts only)",
}
_SELECTIVE_REFUSED = {
    "moe_act": "needs grouped-GEMM experts, which mvlm does not build",
    "mla_up_proj": "needs multi-latent attention, which no mvlm family uses",
}


class RecomputeError(ValueError):
    """A recompute setting that cannot apply; the message names the flag and the fix."""


@dataclass
class RecomputeConfig:
    """Activation recompute in Megatron-Core's terms (the ``--recompute_*`` flags).

    ``granularity='full'`` re-runs whole transformer layers in backward, keeping only their
    inputs: ``method='uniform'`` checkpoints every run of ``num_layers`` consecutive layers (so
    ``num_layers`` must divide the layers of a pipeline stage), ``method='block'`` checkpoints only
    the first ``num_layers`` layers of each stage and keeps the rest's activations (trade memory
    for time on the stages that need it). Unset, they are uniform and 1 (every layer its own
    checkpoint: the least memory). ``granularity='selective'`` re-runs only ``modules`` (default
    ``["core_attn"]``) in every layer and takes no method/num_layers. Under VPP a "stage" is one
    model chunk: Megatron-Core applies the setting per TransformerBlock.
    """

    granularity: str | None = None
    method: str | None = None
    num_layers: int | None = None
    modules: list[str] | None = None

    def check_flags(self) -> None:
        """The checks that need no model: flag combinations that would be silently ignored."""
        g = self.granularity
        if g in (None, "none"):
            for flag, v in (("--recompute_method", self.method),
                            ("--recompute_num_layers", self.num_layers),
                            ("--recompute_modules", self.modules)):
                if v is not None:
                    raise RecomputeError(
                        f"{flag} {_show(v)} has no effect without --recompute_granularity: add "
                        "--recompute_granularity full (method/num_layers) or selective (modules)")
        elif g == "selective":
            for flag, v in (("--recompute_method", self.method),
                            ("--recompute_num_layers", self.num_layers)):
                if v is not None:
                    raise RecomputeError(
                        f"{flag} {v} only applies to --recompute_granularity full (selective "
                        "recompute re-runs --recompute_modules in every layer): drop it, or use "
                        "full")
            modules = self.modules if self.modules is not None else ["core_attn"]
            if not modules:
                raise RecomputeError("--recompute_modules is empty: name at least one of "
                                     f"{sorted(_SELECTIVE_MODULES)}")
            for m in modules:
                if m in _SELECTIVE_REFUSED:
                    raise RecomputeError(f"--recompute_modules {m}: {_SELECTIVE_REFUSED[m]}")
                if m not in _SELECTIVE_MODULES:
                    raise RecomputeError(f"--recompute_modules {m}: unknown; choose from "
                                         f"{sorted(_SELECTIVE_MODULES)}")
        elif g == "full":
            if self.modules is not None:
                raise RecomputeError(
                    f"--recompute_modules {_show(self.modules)} only applies to "
                    "--recompute_granularity selective (full recompute re-runs whole layers)")
            if self.method not in (None, "uniform", "block"):
                raise RecomputeError(f"--recompute_method {self.method!r}: use uniform or block")
            if self.num_layers is not None and self.num_layers < 1:
                raise RecomputeError(f"--recompute_num_layers {self.num_layers} must be >= 1")
        else:
            raise RecomputeError(f"--recompute_granularity {g!r}: use full, selective or none")

    def megatron_kwargs(self, arch: TextArch, layout: ParallelLayout) -> dict:
        """The TransformerConfig fields, validated against this model and layout."""
        self.check_flags()
        g = self.granularity
        if g in (None, "none"):
            return dict(recompute_granularity=None, recompute_method=None,
                        recompute_num_layers=None)
        if g == "selective":
            modules = list(self.modules) if self.modules is not None else ["core_attn"]
            moe = arch.num_experts is not None
            for m in modules:
                why = None
                if m == "mlp" and moe:
                    why = "every MLP of this MoE model is an MoE layer: use 'moe'"
                elif m in ("moe", "shared_experts") and not moe:
                    why = "this model has no MoE layers: use 'mlp'"
                elif m == "shared_experts" and not arch.moe_shared_expert_size:
                    why = "this MoE model has no shared experts"
                if why:
                    raise RecomputeError(f"--recompute_modules {m}: {why}")
            return dict(recompute_granularity="selective", recompute_method=None,
                        recompute_num_layers=None, recompute_modules=modules)
        method = self.method or "uniform"
        n = 1 if self.num_layers is None else self.num_layers
        per_stage = arch.num_layers // layout.pp // (layout.vpp or 1)
        where = (f"num_hidden_layers {arch.num_layers} / --pp {layout.pp}"
                 + (f" / --vpp {layout.vpp}" if layout.vpp else ""))
        if method == "block" and n > per_stage:
            raise RecomputeError(
                f"--recompute_num_layers {n} with --recompute_method block exceeds the "
                f"{per_stage} layers per pipeline stage ({where}): use 1..{per_stage}")
        if method == "uniform" and per_stage % n:
            raise RecomputeError(
                f"--recompute_num_layers {n} with --recompute_method uniform must divide the "
                f"{per_stage} layers per pipeline stage ({where}): use one of "
                f"{[d for d in range(1, per_stage + 1) if per_stage % d == 0]}")
        return dict(recompute_granularity="full", recompute_method=method,
                    recompute_num_layers=n)


def _show(v: object) -> str:
    return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
