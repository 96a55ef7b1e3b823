"""Megatron-Core DDP wrapping, freezing and the (distributed) optimizer with per-part LRs.

Why freezing happens *before* DDP wrapping: Megatron DDP allocates its contiguous grad buffers
for parameters with ``requires_grad`` only, so frozen parameters get no buffer, no all-reduce and
no optimizer state -- they cannot change, bit for bit, and cost nothing.

Parts (from the family's naming): ViT = ``vision_model.*`` except the aligner prefixes,
aligner = ``vision_model.<aligner prefix>*`` (e.g. the Qwen-VL patch merger), LLM =
``language_model.*``. ``--vit_lr`` / ``--aligner_lr`` become Megatron param-group overrides
(``max_lr``/``min_lr``), so Megatron's own scheduler drives each group's LR.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from mvlm.models.vlm import ModelBundle
from mvlm.train.args import TrainConfig

log = logging.getLogger("mvlm.train")


def _strip(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def part_of(name: str, aligner_prefixes: tuple[str, ...]) -> str:
    """'vit' | 'aligner' | 'llm' for a (possibly DDP-prefixed) parameter name."""
    n = _strip(name)
    if n.startswith("vision_model."):
        return "aligner" if any(n.startswith(p) for p in aligner_prefixes) else "vit"
    return "llm"


def apply_freeze(bundle: ModelBundle, cfg: TrainConfig) -> dict[str, int]:
    """Set requires_grad per part; returns trainable parameter counts per part (this rank)."""
    f = cfg.freeze
    frozen = {"vit": f.freeze_vit, "aligner": f.freeze_aligner, "llm": f.freeze_llm}
    counts = {"vit": 0, "aligner": 0, "llm": 0, "frozen": 0}
    # [issue 9 / ms-swift flags] --freeze_parameters*/--trainable_parameters* by name, after
    # the part flags (names as this rank's model chunk has them; see --freeze_parameters)
    by_name = cfg.freeze.name_rule()
    for m in bundle.models:
        for name, p in m.named_parameters():
            part = part_of(name, bundle.family.aligner_prefixes)
            rule = by_name(_strip(name))
            p.requires_grad_(not (frozen[part] if rule is None else rule))
            counts[part if p.requires_grad else "frozen"] += p.numel()
    return counts


def wrap_ddp(bundle: ModelBundle, cfg: TrainConfig) -> list[Any]:
    """Megatron-Core DDP around each model chunk (fp32 grad accumulation and reduction)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from mvlm.runtime import lean_ops, lean_optimizer, wgrad
    from mvlm.runtime.collectives import install as skip_collectives_on_one_rank

    skip_collectives_on_one_rank()  # a DP group of one reduces nothing (runtime/collectives.py)
    wgrad.install()  # CPU fp32: weight gradients written into main_grad (runtime/wgrad.py)
    lean_ops.install()  # full-width RoPE and clipping without copies (runtime/lean_ops.py)
    lean_optimizer.install()  # the optimizer's loops with fewer calls (runtime/lean_optimizer.py)
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,
        bucket_size=40_000_000 if cfg.parallel.overlap_grad_reduce else None)
    out = []
    for i, m in enumerate(bundle.models):
        out.append(DistributedDataParallel(
            bundle.config, ddp_cfg, m,
            # Only the first chunk may skip bucketing when VPP is used (Megatron's convention).
            disable_bucketing=i > 0))
        wgrad.mark_ddp(out[-1])
    return out


def build_optimizer(ddp_models: list[Any], bundle: ModelBundle, cfg: TrainConfig):
    """Megatron-Core Adam (decoupled weight decay) over the DDP chunks, with ViT/aligner groups."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

    dtype = bundle.config.params_dtype
    o = cfg.optim
    ocfg = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=o.clip_grad, bf16=dtype == torch.bfloat16, fp16=False, params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
    from megatron.core.optimizer import get_standard_config_overrides

    overrides = get_standard_config_overrides(ocfg)
    prefixes = bundle.family.aligner_prefixes
    ratio = cfg.optim.min_lr / cfg.optim.lr if cfg.optim.lr > 0 else 0.0
    for part, lr in (("vit", cfg.optim.vit_lr), ("aligner", cfg.optim.aligner_lr)):
        if lr is None:
            continue
        pred = ParamWithNamePredicate(
            name=f"mvlm_{part}", fn=lambda p, n, part=part: part_of(n, prefixes) == part)
        overrides[ParamKey(with_name_predicate=pred)] = {"max_lr": lr, "min_lr": lr * ratio}
    optimizer = get_megatron_optimizer(ocfg, ddp_models, config_overrides=overrides)
    from mvlm.runtime.flat_adam import install as flat_cpu_adam

    flat_cpu_adam(optimizer)  # CPU fp32: one Adam update per contiguous buffer range
    return optimizer


def param_groups_summary(optimizer) -> list[dict[str, Any]]:
    """(max_lr, min_lr, wd_mult, n_params) of each param group -- what the tests check."""
    groups = []
    for g in optimizer.param_groups:
        groups.append({"max_lr": g.get("max_lr"), "min_lr": g.get("min_lr"),
                       "wd_mult": g.get("wd_mult"), "lr": g.get("lr"),
                       "numel": sum(p.numel() for p in g["params"])})
    return groups
