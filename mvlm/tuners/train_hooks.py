"""The trainer's side of adapters: flags, the apply step, checkpoint filtering, final export.

Kept here so the trainer needs only three calls (``add_adapter_args`` in its parser,
``setup_adapters`` after the base weights are loaded and freezing is applied and before DDP,
``export_adapters`` at the end) and one filter in its checkpoint code (``trainable_only``).
The flags arrive as :class:`mvlm.config.TunerConfig` (``cfg.tuner``); mvlm.train.args checks them
with :func:`check_tuner_flags` and :func:`adapter_config` while parsing.
ms-swift flag names and defaults: ``--train_type lora|dora|lora_llm|full``, ``--lora_rank 8``,
``--lora_alpha 32``, ``--lora_dropout 0.05``, ``--target_modules all-linear``, ``--merge_lora``.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

# torch, the model and mvlm.tuners.model are imported inside the functions that use them:
# mvlm/train/args.py imports add_adapter_args from here to build the `mvlm sft --help` parser,
# which must not import torch (tests/unit/test_cli_help.py).
if TYPE_CHECKING:
    import torch

    from mvlm.config import TrainConfig, TunerConfig
    from mvlm.models.vlm import ModelBundle
    from mvlm.tuners.model import AdapterConfig, AdapterReport

log = logging.getLogger("mvlm.tuners")

TRAIN_TYPES = ("full", "lora", "dora", "lora_llm")


def add_adapter_args(p: argparse.ArgumentParser) -> None:
    from mvlm.train.args import _bool

    g = p.add_argument_group("adapters (--train_type lora|dora|lora_llm)")
    g.add_argument("--lora_rank", type=int, default=8)
    g.add_argument("--lora_alpha", type=float, default=32.0)
    g.add_argument("--lora_dropout", type=float, default=0.05)
    _bool(g, "--use_rslora", default=False, help="scale alpha/sqrt(r) instead of alpha/r")
    g.add_argument("--target_modules", "--lora_target_modules", dest="target_modules",
                   nargs="+", default=["all-linear"],
                   help="all-linear, Megatron names (linear_qkv linear_proj linear_fc1 "
                        "linear_fc2 router) or HF names (q_proj ... down_proj)")
    g.add_argument("--target_regex", default=None,
                   help="full-match regex on global Megatron module names")
    g.add_argument("--modules_to_save", nargs="*", default=[],
                   help="trained in full and saved with the adapter: embed_tokens, lm_head, ...")
    g.add_argument("--adapters", nargs="?", default=None, const=None,
                   help="PEFT adapter dir to load (continue training / evaluate)")
    _bool(g, "--merge_lora", default=False,
          help="at the end write merged full HF weights (else a PEFT adapter dir)")
    _bool(g, "--use_dora", default=False,
          help="ms-swift: DoRA instead of LoRA (--train_type lora|lora_llm + this = DoRA)")
    g.add_argument("--lora_bias", default="none", choices=["none", "all"],
                   help="none only: mvlm adapters train no biases (use --modules_to_save for "
                        "whole modules)")
    g.add_argument("--lora_dtype", default=None,
                   help="must equal --torch_dtype: adapters take the model's dtype (the "
                        "optimizer keeps fp32 master copies)")


def check_tuner_flags(tuner: TunerConfig, torch_dtype: str | None) -> None:
    """Refuse adapter flag combinations mvlm cannot honour, naming the flag and the fix
    (``torch_dtype``: --torch_dtype as passed)."""
    tt = tuner.train_type
    if tt not in TRAIN_TYPES:
        raise ValueError(f"--train_type: {tt!r}; use one of {', '.join(TRAIN_TYPES)}")
    if tt == "full":
        if tuner.adapters:
            raise ValueError("--adapters: loading a PEFT adapter needs --train_type lora|dora")
        if tuner.use_dora:
            raise ValueError("--use_dora true needs adapters: add --train_type lora (ms-swift: "
                             "--tuner_type lora --use_dora true)")
        return
    if tuner.lora_bias != "none":
        raise ValueError(f"--lora_bias {tuner.lora_bias}: mvlm adapters train no biases; use "
                         "--lora_bias none (and --modules_to_save to train whole modules)")
    if tuner.lora_dtype is not None and tuner.lora_dtype != torch_dtype:
        raise ValueError(f"--lora_dtype {tuner.lora_dtype}: mvlm adapters take the model's dtype "
                         "(--torch_dtype; the optimizer keeps fp32 master copies): drop the flag "
                         f"or pass --torch_dtype {tuner.lora_dtype}")


def adapter_config(tuner: TunerConfig, *, freeze_vit: bool, seed: int) -> AdapterConfig | None:
    """The adapters to apply (None for full training): read from the --adapters PEFT dir when
    one is given, else from the LoRA flags. ``freeze_vit``: the resolved --freeze_vit (with
    plain LoRA the ViT is frozen unless --freeze_vit false; all-linear then covers it)."""
    from mvlm.tuners.model import AdapterConfig

    tt = tuner.train_type
    if tt == "full":
        return None
    if tuner.adapters:
        from mvlm.tuners.peft_io import adapter_config_from_peft

        return adapter_config_from_peft(tuner.adapters, seed=seed)
    return AdapterConfig(
        kind="dora" if tt == "dora" or tuner.use_dora else "lora",
        rank=tuner.lora_rank, alpha=tuner.lora_alpha,
        dropout=tuner.lora_dropout, use_rslora=bool(tuner.use_rslora),
        target_modules=list(tuner.target_modules), target_regex=tuner.target_regex,
        modules_to_save=list(tuner.modules_to_save or []),
        include_vision=tt != "lora_llm" and not freeze_vit, seed=seed)


def setup_adapters(bundle: ModelBundle, cfg: TrainConfig) -> AdapterReport | None:
    """Apply (and optionally load) adapters. ``lora``/``dora``: every base tensor frozen except
    modules_to_save. ``lora_llm``: the LLM base is frozen and adapted, the vision tower and
    aligner keep the trainer's freeze flags (so they can be trained in full)."""
    from mvlm.tuners.model import apply_adapters

    tuner = cfg.tuner
    acfg = adapter_config(tuner, freeze_vit=cfg.freeze.freeze_vit, seed=cfg.seed)
    if acfg is None:
        return None
    if tuner.train_type == "lora_llm":
        for m in bundle.models:
            for p in m.language_model.parameters():
                p.requires_grad_(False)
        rep = apply_adapters(bundle, acfg, freeze_base=False)
    else:
        rep = apply_adapters(bundle, acfg, freeze_base=True)
    if tuner.adapters:
        from mvlm.tuners.peft_io import load_peft_adapter

        n = load_peft_adapter(bundle, tuner.adapters)
        log.info("loaded %d adapters from %s", n, tuner.adapters)
    # [issue 9 / export] adapter checkpoints record their config and base (mvlm export)
    from mvlm.tuners.model import set_run_record

    set_run_record(bundle, acfg, tuner.train_type, cfg.base.model, cfg.base.mcore_model)
    return rep


def is_trainable_key(key: str, value: Any) -> bool:
    """For adapters-only checkpoints: adapter entries and trainable (modules_to_save) tensors."""
    import torch

    from mvlm.tuners.model import ADAPTER_ATTR

    if ADAPTER_ATTR in key.split("."):
        return True
    data = getattr(value, "data", None)
    return isinstance(data, torch.Tensor) and data.requires_grad


def trainable_only(sd: dict) -> dict:
    """Filter a model sharded state dict ({"model": {...}} or per chunk) to trainable entries."""
    return {k: {kk: vv for kk, vv in v.items() if is_trainable_key(kk, vv)}
            if isinstance(v, dict) else v for k, v in sd.items()}


def export_adapters(bundle: ModelBundle, cfg: TrainConfig, src_dir: Path, out_dir: Path,
                    dtype: torch.dtype | None) -> Path:
    """Final export: merged HF weights (--merge_lora true) or a PEFT adapter dir (described by
    the same AdapterConfig :func:`setup_adapters` applied, rebuilt from the config)."""
    from mvlm.tuners.peft_io import export_merged_hf, export_peft_adapter

    if cfg.tuner.merge_lora:
        out = out_dir / "hf"
        export_merged_hf(bundle, src_dir, out, dtype, overwrite=True)
    else:
        out = out_dir / "adapter"
        acfg = adapter_config(cfg.tuner, freeze_vit=cfg.freeze.freeze_vit, seed=cfg.seed)
        if acfg is None:
            raise ValueError("export_adapters: --train_type full has no adapters to export")
        export_peft_adapter(bundle, acfg, out, base_model_dir=src_dir, dtype=dtype)
    return out
