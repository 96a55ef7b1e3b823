"""Learning-rate schedule: Megatron-Core's OptimizerParamScheduler stepped once per iteration.

Counted in iterations (``increment=1``), so warmup/decay lengths are independent of the global
batch size and a resumed run sees exactly the same LR sequence (the scheduler state is saved).
Each param group carries its own ``max_lr``/``min_lr`` (see :mod:`mvlm.train.optim`), which is how
``--vit_lr``/``--aligner_lr`` follow the same shape as the main LR.
"""
from __future__ import annotations

from mvlm.train.args import TrainConfig


def warmup_iters(cfg: TrainConfig, train_iters: int) -> int:
    if cfg.optim.lr_warmup_fraction:
        return int(cfg.optim.lr_warmup_fraction * train_iters)
    return min(cfg.optim.lr_warmup_iters, train_iters)


def build_scheduler(optimizer, cfg: TrainConfig, train_iters: int):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    warm = warmup_iters(cfg, train_iters)
    sched = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=cfg.optim.lr, min_lr=cfg.optim.min_lr, lr_warmup_steps=warm,
        lr_decay_steps=max(train_iters, warm + 1), lr_decay_style=cfg.optim.lr_decay_style,
        start_wd=cfg.optim.weight_decay, end_wd=cfg.optim.weight_decay, wd_incr_steps=train_iters,
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False)
    return sched


def current_lr(optimizer) -> float:
    """The LR of the main (default-config) group, for logging."""
    for g in optimizer.param_groups:
        if g.get("default_config", True):
            return float(g["lr"])
    return float(optimizer.param_groups[0]["lr"])
