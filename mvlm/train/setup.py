"""Set-up steps of a training run that come before the :class:`~mvlm.train.trainer.Trainer`:
the checks that can fail cheaply (before any process group), building the model and loading its
starting weights, and tearing the process groups down at the end.

Why separate: the Trainer is also built from a ready model by callers that have no flags or data
pipeline (``bench/gpu_check.py``, RL); these functions are what ``mvlm pt|sft`` adds in front.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mvlm.train.args import TrainConfig, apply_hf_overrides

log = logging.getLogger("mvlm.train")


@dataclass
class RunPlan:
    """What the flags resolve to before any process group: layout, model source and config."""

    layout: Any
    out_dir: Path
    src_dir: Path
    meta: dict | None
    hf_config: Any
    family: Any
    hf_dtype: torch.dtype | None


def hf_dtype(hf_config: Any) -> torch.dtype | None:
    from mvlm.convert.command import _hf_dtype as f

    return f(hf_config)


def plan_run(cfg: TrainConfig) -> RunPlan:
    """Validate layout, batch sizes, recompute and part flags against the model; no collectives."""
    from transformers import AutoConfig

    from mvlm.convert.mcore_ckpt import read_meta
    from mvlm.models.gpt import validate_layout
    from mvlm.models.registry import _config_model_type, foreign_layout, get_family
    from mvlm.runtime.env import read_dist_env
    from mvlm.runtime.parallel import ParallelLayout

    layout = ParallelLayout(**cfg.parallel.layout_kwargs)
    world = read_dist_env().world_size
    layout.validate(world)
    cfg.resolve_batch(world)
    src_dir = Path(cfg.base.model) if cfg.base.model else Path(cfg.base.mcore_model) / "hf"
    meta = read_meta(Path(cfg.base.mcore_model)) if cfg.base.mcore_model else None
    if foreign_layout(src_dir) is not None:
        raise ValueError(
            f"--model {src_dir}: config.json's model_type is "
            f"{_config_model_type(src_dir)!r}, a layout that only `mvlm convert` reads (e.g. "
            "OpenGVLab's original InternVL). Convert it to the transformers layout first: "
            f"`mvlm convert --to mcore --model {src_dir} --output M` then `mvlm convert --to hf "
            "--model M --output DIR_HF`, and train with --model DIR_HF (or use the hub's `-hf` "
            "checkpoint)")
    hf_config = AutoConfig.from_pretrained(src_dir)
    apply_hf_overrides(cfg, hf_config)  # [issue 9 / ms-swift flags] --moe_aux_loss_coeff
    family = get_family(hf_config.model_type)
    validate_layout(family.text_arch(hf_config), layout,
                    sequence_parallel=cfg.parallel.sequence_parallel)
    # layer-count checks of the recompute flags
    cfg.parallel.recompute.megatron_kwargs(family.text_arch(hf_config), layout)
    # [issue 9 / ms-swift flags] freeze_vit/aligner default to true: only explicit flags count
    if (cfg.optim.vit_lr is not None or cfg.optim.aligner_lr is not None
            or cfg.freeze.freeze_vit_flag or cfg.freeze.freeze_aligner_flag) \
            and not family.is_vlm:
        raise ValueError(f"--vit_lr/--aligner_lr/--freeze_vit/--freeze_aligner: "
                         f"{hf_config.model_type} has no vision tower; drop those flags")
    return RunPlan(layout=layout, out_dir=Path(cfg.output_dir), src_dir=src_dir, meta=meta,
                   hf_config=hf_config, family=family, hf_dtype=hf_dtype(hf_config))


def log_notes(cfg: TrainConfig, plan: RunPlan, device: str) -> None:
    """Rank 0: the flag mappings, and where --attn_impl does not reach."""
    for n in cfg.notes:
        log.info("flag mapping: %s", n)
    if cfg.base.attn_impl not in (None, "auto") and plan.family.is_vlm:
        from mvlm.models.vision import vision_attn_impl

        log.info("--attn_impl %s applies to the LLM decoder; the HF vision tower uses its "
                 "own %s attention", cfg.base.attn_impl, vision_attn_impl(device))


def build_bundle(cfg: TrainConfig, plan: RunPlan, device: str) -> tuple[Any, torch.dtype]:
    """The model on this rank's layout (no weights yet) and its parameter dtype: --torch_dtype,
    else the mcore checkpoint's, else the HF config's, else fp32."""
    from mvlm.convert.mcore_ckpt import dtype_from_name
    from mvlm.models.spec import choose_backend
    from mvlm.models.vlm import build_model

    meta = plan.meta
    default_dtype = (dtype_from_name(meta.get("dtype")) if meta else None) or \
        plan.hf_dtype or torch.float32
    dtype = dtype_from_name(cfg.base.torch_dtype, default_dtype)
    backend = choose_backend(device, cfg.base.transformer_impl)
    bundle = build_model(plan.hf_config, plan.layout, dtype=dtype, device=device,
                         backend=backend, sequence_parallel=cfg.parallel.sequence_parallel,
                         recompute=cfg.parallel.recompute, attn_impl=cfg.base.attn_impl or "auto",
                         perform_initialization=False,
                         vocab_padded=meta["vocab_padded"] if meta else None)
    return bundle, dtype


def load_initial_weights(cfg: TrainConfig, bundle: Any) -> None:
    """The starting weights: the HF checkpoint (--model), else the mcore one (--mcore_model;
    either layer spec's checkpoints, format 1 and 2, TE _extra_state)."""
    if cfg.base.model:
        from mvlm.convert.bridge import load_hf_weights

        load_hf_weights(bundle, cfg.base.model)
    else:
        from mvlm.convert.mcore_ckpt import load_model_weights

        load_model_weights(bundle, Path(cfg.base.mcore_model))


def teardown(own_pg: bool) -> None:
    """Destroy the process groups this run created, or only Megatron's parallel state when the
    caller brought its own process group (tests running several trainings in one launch)."""
    from megatron.core import parallel_state

    if own_pg:
        from mvlm.runtime.parallel import destroy_distributed

        destroy_distributed()
    elif parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()

