"""The ONE place where Megatron-Core's CUDA assumptions are adapted to a CPU-only host (gloo).

Megatron-Core is written for CUDA: it creates tensors on ``torch.cuda.current_device()``, moves
index tensors with ``.cuda()``, pins memory, synchronises streams, keeps a CUDA RNG tracker and
checks ``Tensor.type()`` against ``torch.cuda.FloatTensor``. On the CPU CI box every one of those
calls would fail, although the arithmetic around them is device-agnostic. Instead of scattering
``if cpu`` branches, this module installs, **only when the run's device is CPU**:

* a ``TorchFunctionMode`` that rewrites CUDA device arguments to CPU, drops ``pin_memory`` and
  turns ``Tensor.cuda()`` into a no-op, and reports CPU float tensors as their CUDA type name
  (so the optimizer/grad-clip type assertions hold);
* ``torch.cuda`` stand-ins for the few process-level calls (current_device, synchronize,
  streams, events, memory stats) that have no tensor argument for the mode to see;
* a CPU RNG states tracker in place of Megatron-Core's CUDA one, plus CPU versions of the RNG
  state get/set helpers that activation recompute uses, so dropout and recompute stay
  reproducible and TP-rank-aware.

On a GPU none of this runs (``apply_cpu_adaptations`` refuses to, see ``device.py``). Passing
through adapted call sites checks logic, not speed: timings and bf16 numerics belong to the GPU
check script.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_APPLIED = False
_MODE: _CudaToCpuMode | None = None

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
}


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # Megatron passes torch.cuda.current_device() (an int) as a device.
    return isinstance(dev, int) and not isinstance(dev, bool)


_BACKWARDS = (torch.autograd.backward, torch.Tensor.backward)
# Functions the mode rewrites whatever their keyword arguments; any other call is rewritten only
# through a keyword (``device=`` / ``pin_memory=``), so a call without keywords passes straight on.
_REWRITTEN = frozenset((*_BACKWARDS, torch.Tensor.cuda, torch.Tensor.pin_memory, torch.Tensor.type,
                        torch.Tensor.to))


def _run_backward(tensors, gradient=None, retain_graph=None, create_graph=False, inputs=None,
                  grad_tensors=None, **_: Any) -> None:
    """torch.autograd.backward minus its __torch_function__ dispatch (same engine call)."""
    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    tensors = (tensors,) if torch.is_tensor(tensors) else tuple(tensors)
    grads = grad_tensors if grad_tensors is not None else gradient
    grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(grads, len(tensors)),
                        is_grads_batched=False)
    if inputs is None:
        inputs = ()
    elif torch.is_tensor(inputs):
        inputs = (inputs,)
    _engine_run_backward(tensors, grads, create_graph if retain_graph is None else retain_graph,
                         create_graph, tuple(inputs), allow_unreachable=True,
                         accumulate_grad=True)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to CPU for every torch call made while it is active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not kwargs and func not in _REWRITTEN:
            # most calls of a step (~2,300 on the bench model): nothing to rewrite
            return func(*args)
        kwargs = dict(kwargs or {})
        if func in _BACKWARDS:
            # torch >= 2.14 routes torch.autograd.backward through __torch_function__, and a mode
            # is switched off while its handler runs: the whole backward pass (e.g. the MoE
            # all-gather dispatcher's gather in backward, which allocates on
            # torch.cuda.current_device()) would run unadapted. Run the engine with the mode on.
            with self:
                return _run_backward(*args, **kwargs)
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func in (torch.Tensor.to,):
            args = tuple("cpu" if (i > 0 and _is_cuda_device(a)) else a
                         for i, a in enumerate(args))
        return func(*args, **kwargs)


class _InertStream:
    """Stands in for torch.cuda.Stream: CPU work is already ordered, so waits are no-ops."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        pass

    def wait_event(self, *args: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _InertEvent:
        return event or _InertEvent()

    def synchronize(self) -> None:
        pass

    def __enter__(self) -> _InertStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class _InertEvent:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, *args: Any) -> None:
        pass

    def wait(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


class CpuRNGStatesTracker:
    """Named RNG streams on the CPU generator, with Megatron-Core's tracker interface.

    Megatron keeps a separate CUDA RNG state per purpose ("model-parallel-rng" differs across TP
    ranks so dropout in TP-split regions differs, the default state is shared). On CPU the same
    bookkeeping is done with ``torch.get_rng_state``/``set_rng_state``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def _cpu_get_rng_state(device: Any = None, clone: bool = False, graph_safe: bool = False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


def _patch_torch_cuda() -> None:
    """Process-level torch.cuda calls that carry no tensor for the function mode to rewrite."""
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.synchronize = lambda *a, **k: None
    cuda.Stream = _InertStream
    cuda.Event = _InertEvent
    cuda.current_stream = lambda *a, **k: _InertStream()
    cuda.default_stream = lambda *a, **k: _InertStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.set_device = lambda *a, **k: None
    cuda.manual_seed = lambda *a, **k: None
    cuda.manual_seed_all = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state
    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def apply_cpu_adaptations() -> None:
    """Install every CPU adaptation once per process. Refuses to run when CUDA is usable."""
    global _APPLIED, _MODE
    if _APPLIED:
        return
    if torch.cuda.is_available():
        raise RuntimeError(
            "mvlm.runtime.cpu adaptations are for CPU-only runs; CUDA is available here. "
            "Run with --device cuda (the default when a GPU is present)."
        )
    _patch_torch_cuda()
    _patch_megatron_rng()
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    _APPLIED = True
    log.info("mvlm: CPU adaptations for Megatron-Core installed (gloo backend)")


def outside_cpu_mode(fn: Any) -> Any:
    """``fn`` run with the CPU mode taken off the torch-function stack (when it is the innermost
    mode; otherwise ``fn`` runs as it is).

    Why: every torch call and every tensor attribute read (``p.grad``, ``p.data``) made while the
    mode is on passes through its Python ``__torch_function__``, about 1 us each. Loops over the
    parameters that only read gradients, take views and copy (the optimizer's gradient and
    parameter copies, zeroing, the flat Adam's layout check) make ~800 such calls per step of the
    bench model and need nothing the mode rewrites. Only wrap code that creates no tensor on a
    device, calls no ``.cuda()``/``pin_memory`` and compares no ``Tensor.type()``.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        n = torch._C._len_torch_function_stack()
        if _MODE is None or n == 0 or torch._C._get_function_stack_at(n - 1) is not _MODE:
            return fn(*args, **kwargs)
        mode = torch._C._pop_torch_function_stack()
        try:
            return fn(*args, **kwargs)
        finally:
            torch._C._push_on_torch_function_stack(mode)

    wrapper._mvlm_outside_cpu_mode = True  # type: ignore[attr-defined]
    return wrapper


def cpu_adaptations_applied() -> bool:
    return _APPLIED


def batch_p2p_comm_supported(device: str) -> bool:
    """Whether pipeline stages may batch their sends/receives (``batch_p2p_comm``).

    Megatron-Core batches the interleaved (VPP) schedule's isend/irecv pairs with
    ``torch.distributed.batch_isend_irecv`` by default. Over gloo that gives silently wrong
    gradients (max error 0.62 against one rank on megatron-core 0.16.1) or no progress at all;
    with separate sends it is exact (tests/dist/test_train_parity_more.py, case ``vpp``). So:
    only on CUDA with a backend other than gloo."""
    import torch.distributed as dist

    if device != "cuda":
        return False
    return not (dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo")
