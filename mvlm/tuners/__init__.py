"""LoRA / DoRA adapters on Megatron-Core parallel linears, merge, and PEFT-format I/O.

Usage (after the model is built and its base weights loaded, before DDP/optimizer)::

    report = apply_adapters(bundle, AdapterConfig(kind="lora", rank=8, alpha=32))
    ...train...
    export_peft_adapter(bundle, cfg, out_dir, base_model_dir)   # peft.PeftModel loads it
    export_merged_hf(bundle, hf_src, out_dir, dtype)            # merged full HF weights
"""
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

__all__ = [
    "ADAPTER_ATTR", "AdapterConfig", "AdapterReport", "adapter_config_from_peft",
    "adapter_state_dict", "adapters", "apply_adapters", "export_merged_hf",
    "export_peft_adapter", "is_adapter_param", "load_peft_adapter", "merge_adapters",
    "parameter_report", "unmerge_adapters",
]
