"""LoRA / DoRA adapters on Megatron-Core parallel linears, merge, and PEFT-format I/O.

Usage (after the model is built and its base weights loaded, before DDP/optimizer)::

    report = apply_adapters(bundle, AdapterConfig(kind="lora", rank=8, alpha=32))
    ...train...
    export_peft_adapter(bundle, cfg, out_dir, base_model_dir)   # peft.PeftModel loads it
    export_merged_hf(bundle, hf_src, out_dir, dtype)            # merged full HF weights

The names below are loaded on first use (PEP 562): importing a submodule such as
``mvlm.tuners.train_hooks`` (whose flag builder ``mvlm sft --help`` needs) must not drag in torch
and Megatron-Core through this package's ``__init__``.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "ADAPTER_ATTR", "AdapterConfig", "AdapterReport", "adapter_config_from_peft",
    "adapter_state_dict", "adapters", "apply_adapters", "export_merged_hf",
    "export_peft_adapter", "is_adapter_param", "load_peft_adapter", "merge_adapters",
    "parameter_report", "unmerge_adapters",
]
_PEFT_IO = ("adapter_config_from_peft", "export_merged_hf", "export_peft_adapter",
            "load_peft_adapter")
# public name -> submodule that defines it
_LAZY: dict[str, str] = {name: "mvlm.tuners.peft_io" if name in _PEFT_IO else "mvlm.tuners.model"
                         for name in __all__}

if TYPE_CHECKING:
    from mvlm.tuners.model import (
        ADAPTER_ATTR,
        AdapterConfig,
        AdapterReport,
        adapter_state_dict,
        adapters,
        apply_adapters,
        is_adapter_param,
        merge_adapters,
        parameter_report,
        unmerge_adapters,
    )
    from mvlm.tuners.peft_io import (
        adapter_config_from_peft,
        export_merged_hf,
        export_peft_adapter,
        load_peft_adapter,
    )


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mvlm.tuners' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
