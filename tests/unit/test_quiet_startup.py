"""mvlm.runtime.quiet drops exactly the start-up messages it names, and nothing else.

Why: on a CPU box every rank of every real run (convert, sft, export) used to print a CUDA_HOME
warning, the Apex/Transformer Engine fallbacks and a CUDA-graph deprecation from Megatron-Core's
own defaults -- noise that hides the lines that matter. The filters match single messages, so a
new warning from the same libraries must still show.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

from mvlm.runtime.quiet import silence_startup_noise


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_cuda_home_log_line_dropped_others_kept() -> None:
    log = logging.getLogger("torch.utils.cpp_extension")
    cap = _Capture()
    log.addHandler(cap)
    saved = list(log.filters)
    try:
        silence_startup_noise()
        silence_startup_noise()  # idempotent: one filter, not two
        assert len(log.filters) == len(saved) + 1
        log.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        log.warning("Error checking compiler version for %s", "c++")
        assert cap.messages == ["Error checking compiler version for c++"]
    finally:
        log.removeHandler(cap)
        log.filters[:] = saved


def _warn(message: str, category: type[Warning], module: str) -> None:
    warnings.warn_explicit(message, category, filename=module.replace(".", "/") + ".py",
                           lineno=1, module=module)


def test_warning_filters_are_exact() -> None:
    with warnings.catch_warnings(record=True) as seen:  # restores the global filters after
        warnings.simplefilter("always")
        silence_startup_noise()
        _warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
              UserWarning, "megatron.core.optimizer")
        _warn("full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer.",
              UserWarning, "megatron.core.transformer.transformer_config")
        _warn("`load_state_dict` is deprecated and will be removed in future versions.",
              FutureWarning, "megatron.core.dist_checkpointing.strategies.torch")
        _warn("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning,
              "mvlm.runtime.cpu")
        _warn("The .grad attribute of a Tensor that is not a leaf Tensor is being accessed.",
              UserWarning, "megatron.core.optimizer.optimizer")
        # Same libraries, other messages / other callers: must still be shown.
        _warn("full scope is deprecated.", UserWarning, "mvlm.models.spec")
        _warn("`load_state_dict` is deprecated", FutureWarning, "mvlm.train.checkpoint")
        _warn("The .grad attribute of a Tensor that is not a leaf", UserWarning, "mvlm.models.vlm")
        _warn("cuda_graph_impl is experimental", UserWarning,
              "megatron.core.transformer.transformer_config")
    assert [str(w.message) for w in seen] == [
        "full scope is deprecated.", "`load_state_dict` is deprecated",
        "The .grad attribute of a Tensor that is not a leaf", "cuda_graph_impl is experimental"]


def test_real_imports_print_nothing_after_cli_setup(tmp_path) -> None:
    """The imports of a real run (Megatron-Core, its optimizer and norms, a TransformerConfig
    with Megatron's defaults, mvlm's trainer and converter) after the CLI's setup: stderr empty.
    Matching wording changes in a new torch/Megatron release fail here, not silently."""
    code = (
        "from mvlm.cli import _setup_logging; _setup_logging()\n"
        "import megatron.core, megatron.core.optimizer, megatron.core.models.backends\n"
        "from megatron.core.transformer import TransformerConfig\n"
        "TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)\n"
        "import mvlm.train.trainer, mvlm.convert.command\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr == "", r.stderr[-3000:]
