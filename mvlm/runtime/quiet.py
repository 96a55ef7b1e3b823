"""Silence the start-up messages that say nothing to an mvlm user, each matched exactly.

Why a module of its own: they are emitted while torch / Megatron-Core are being imported, so the
filters must be in place before that, from a module that imports only the standard library
(``mvlm.cli`` installs them first thing). Each filter names one message; anything else that the
same libraries say still gets through.

* ``torch.utils.cpp_extension`` logs "No CUDA runtime is found, using CUDA_HOME=..." at import
  (Megatron-Core imports it) on any machine without a GPU that has a CUDA toolkit directory: on
  a CPU box that is the expected state, not a problem.
* Megatron-Core warns at import that Apex / Transformer Engine are not installed and it falls
  back to its local implementations: the normal state on CPU, once per module and per rank.
* megatron-core 0.16 warns "full scope is deprecated" whenever a ``TransformerConfig`` is built
  with its own default ``cuda_graph_scope="full"``; mvlm uses no CUDA graphs.
* Megatron-Core's distributed optimizer zeroes the gradients of its main-parameter shards, which
  are views, and reading a view's ``.grad`` makes torch warn that it is not a leaf (Megatron's
  own comment in ``DistributedOptimizer.zero_grad`` says so); once per rank, about nothing the
  user can change.
* Loading a torch_dist checkpoint, Megatron-Core's loader calls torch APIs that torch marks
  deprecated (``load_state_dict``, ``ShardedTensor``): a FutureWarning per rank per load, about
  code that is not mvlm's and not the user's.
"""
from __future__ import annotations

import logging
import warnings

_NO_CUDA_RUNTIME = "No CUDA runtime is found"


class _DropMessage(logging.Filter):
    """Drops records whose unformatted message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_startup_noise() -> None:
    """Install the filters (idempotent); call before importing torch or Megatron-Core."""
    cpp_ext = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _DropMessage) for f in cpp_ext.filters):
        cpp_ext.addFilter(_DropMessage(_NO_CUDA_RUNTIME))
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*",
                            category=UserWarning)
    warnings.filterwarnings("ignore", message="full scope is deprecated", category=UserWarning,
                            module=r"megatron\.core\.transformer\.transformer_config")
    warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf",
                            category=UserWarning, module=r"megatron\.core\.optimizer\.optimizer")
    warnings.filterwarnings("ignore", message="`load_state_dict` is deprecated",
                            category=FutureWarning,
                            module=r"megatron\.core\.dist_checkpointing\.strategies\.torch")
    warnings.filterwarnings("ignore", message="Please use DTensor instead and we are deprecating "
                            "ShardedTensor", category=FutureWarning)
