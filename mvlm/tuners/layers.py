"""LoRA / DoRA adapters for Megatron-Core parallel linears (local and TE specs) and plain nn.Linear.

Why not peft: its Megatron path is broken (PLATFORM.md), and wrapping modules would rename the base
weights (``linear_qkv.base_layer.weight``), which breaks the weight tables, the checkpoints and
every tool that reads Megatron names. Instead each adapter lives in a side container on the model
chunk (``mvlm_adapters``) and is attached to its base linear by a forward hook: base parameter
names, shapes and sharded state dicts stay exactly as Megatron-Core defines them.

Sharding (TP size t, base weight W [out, in]):
* column-parallel (W split on ``out``): A [r, in] replicated, B [out/t, r] split like W. The
  r-wide activation ``A x`` goes through Megatron's copy-to-TP region (identity forward,
  all-reduce backward), so A's gradient is the sum of every rank's B-shard contribution and the
  input gradient is complete. With sequence parallelism the r-wide activation is gathered along
  the sequence instead (reduce-scatter backward).
* row-parallel (W split on ``in``): A [r, in/t] split like W, B [out, r] replicated. The partial
  ``A_local x_local`` is reduced over TP (all-reduce, or reduce-scatter with SP) *before* B: the
  same sum the base layer's output reduction performs, on r instead of ``out`` columns.
* experts with explicit expert communication (EP > 1): tokens arrive already dispatched and the
  layer itself does no TP communication; with expert-TP size 1 each adapter is simply local.

DoRA follows peft 0.21 exactly: ``m`` (per output row) scales ``W + s B A`` normalised by its
row norm, the norm is detached, and the output is ``base + (m/n - 1) * base_nobias +
(m/n) * s * B A x``. Under TP the row norm is of the full row: column-parallel rows are local,
row-parallel rows are all-reduced (sum of squares) over TP.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class LinearSpec:
    """What the adapter needs to know about its base linear layer."""

    kind: str  # "column" | "row" | "plain"
    in_features: int  # full (TP-gathered) input size
    out_features: int  # full output size
    tp_size: int
    tp_rank: int
    tp_group: Any
    sequence_parallel: bool = False
    gather_output: bool = False
    input_is_parallel: bool = True
    bias_in_output: bool = False  # column layer whose output already includes its bias
    explicit_expert_comm: bool = False
    te_layernorm: bool = False  # TE LayerNorm+Linear: LoRA's input is the normalised input
    expert: bool = False


def _group_size_rank(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def describe_linear(module: nn.Module) -> LinearSpec | None:
    """A LinearSpec for adaptable linears, None for anything else.

    Megatron local spec: ColumnParallelLinear / RowParallelLinear. TE spec: TE*Linear classes carry
    ``parallel_mode`` ("column"/"row"; "duplicated" counts as plain-but-tuple) -- grouped-GEMM
    experts are refused. Plain ``nn.Linear`` (the HF vision tower) is adapted as is.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    name = type(module).__name__
    if "Grouped" in name:
        raise NotImplementedError(
            f"{name}: LoRA on grouped-GEMM experts is not implemented; build the model with "
            "SequentialMLP experts (--moe_grouped_gemm false) to adapt experts")
    if isinstance(module, nn.Linear):
        return LinearSpec("plain", module.in_features, module.out_features, 1, 0, None,
                          bias_in_output=module.bias is not None)
    kind = None
    if isinstance(module, ColumnParallelLinear):
        kind = "column"
    elif isinstance(module, RowParallelLinear):
        kind = "row"
    elif name.startswith("TE") and getattr(module, "parallel_mode", None) in ("column", "row"):
        kind = module.parallel_mode
    if kind is None:
        return None
    expert = bool(getattr(module, "is_expert", False))
    group = getattr(module, "tp_group", None)
    if group is None:
        group = (parallel_state.get_expert_tensor_parallel_group() if expert
                 else parallel_state.get_tensor_model_parallel_group())
    t, r = _group_size_rank(group)
    w = module.weight
    if kind == "column":
        out_f, in_f = w.shape[0] * t, w.shape[1]
    else:
        out_f, in_f = w.shape[0], w.shape[1] * t
    explicit = bool(getattr(module, "explicit_expert_comm", False))
    if explicit and t > 1:
        raise NotImplementedError(
            "LoRA on experts with expert-tensor-parallel size > 1 is not implemented; use "
            "--expert_tensor_parallel_size 1 (experts are then whole on each EP rank)")
    # TE: the base layer adds its bias itself unless it returns it (te_return_bias)
    if name.startswith("TE"):
        bias_in_output = not getattr(module, "te_return_bias", False) and \
            getattr(module, "use_bias", False)
    else:
        bias_in_output = getattr(module, "bias", None) is not None and \
            not getattr(module, "skip_bias_add", False)
    return LinearSpec(
        kind=kind, in_features=in_f, out_features=out_f, tp_size=t, tp_rank=r, tp_group=group,
        sequence_parallel=bool(getattr(module, "sequence_parallel", False)) and not explicit,
        gather_output=bool(getattr(module, "gather_output", False)),
        input_is_parallel=bool(getattr(module, "input_is_parallel", True)),
        bias_in_output=bias_in_output, explicit_expert_comm=explicit,
        te_layernorm="LayerNorm" in name, expert=expert)


def _generator(name: str, seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((zlib.crc32(name.encode()) + 1_000_003 * seed) % (2**63))
    return g


def _local_slice(full: torch.Tensor, dim: int, spec: LinearSpec) -> torch.Tensor:
    return full.chunk(spec.tp_size, dim=dim)[spec.tp_rank].contiguous()


def _mark_split(p: nn.Parameter, dim: int) -> None:
    p.tensor_model_parallel = True
    p.partition_dim = dim
    p.partition_stride = 1


class LoRAAdapter(nn.Module):
    """One adapter (A, B and, for DoRA, the magnitude) for one base linear.

    Initialisation is a deterministic function of the adapter's *global* name and the seed, built
    on the full shape and then sliced: every TP/PP layout starts from the same adapter, which is
    what makes loss parity across layouts testable (and replicated A identical on TP ranks).
    ``b_init_std`` > 0 gives B random values too (tests use it so adapters matter from step 0).
    """

    def __init__(self, base: nn.Module, spec: LinearSpec, global_name: str, *, rank: int,
                 alpha: float, dropout: float, use_rslora: bool, use_dora: bool, seed: int,
                 b_init_std: float = 0.0,
                 column_to_local: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.global_name = global_name
        self.rank = rank
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.use_dora = use_dora
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._base = [base]  # a list: not a submodule (its parameters stay the base's own)
        self._merged_backup: torch.Tensor | None = None
        # False: the hook passes the base output through (DPO/KTO under LoRA: the reference is
        # the policy without its adapters, no second model copy)
        self.enabled = True
        dtype, device = base.weight.dtype, base.weight.device
        g = _generator(global_name, seed)
        bound = 1.0 / math.sqrt(spec.in_features)  # = kaiming_uniform_(a=sqrt(5)), like peft
        a_full = (torch.rand(rank, spec.in_features, generator=g, dtype=torch.float32) * 2 - 1
                  ) * bound
        b_full = torch.zeros(spec.out_features, rank)
        if b_init_std > 0:
            b_full = torch.randn(spec.out_features, rank, generator=g) * b_init_std
        if spec.kind == "row":
            a = _local_slice(a_full, 1, spec)
            b = b_full
        elif spec.kind == "column":
            a = a_full
            # b_full is in single-rank (TP1) row order; a gated fc1 is not a plain row split of
            # it ([gate_r; up_r] per rank), so the caller's weight-table mapping does the split
            b = column_to_local(b_full) if column_to_local else _local_slice(b_full, 0, spec)
        else:
            a, b = a_full, b_full
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.lora_B = nn.Parameter(b.to(device=device, dtype=dtype))
        if spec.kind == "row" and spec.tp_size > 1:
            _mark_split(self.lora_A, 1)
        if spec.kind == "column" and spec.tp_size > 1:
            _mark_split(self.lora_B, 0)
        # Replicated adapter halves that see sequence-sharded activations get partial gradients:
        # Megatron all-reduces params marked `sequence_parallel` over TP in finalize_model_grads.
        if spec.sequence_parallel:
            (self.lora_A if spec.kind == "column" else self.lora_B).sequence_parallel = True
        self.lora_magnitude: nn.Parameter | None = None
        if use_dora:
            self.lora_magnitude = nn.Parameter(self.weight_norm().to(dtype))
            if spec.kind == "column" and spec.tp_size > 1:
                _mark_split(self.lora_magnitude, 0)
        if not getattr(base.weight, "allreduce", True):  # expert: reduced over expert-DP only
            for p in self.parameters():
                p.allreduce = False

    @property
    def base(self) -> nn.Module:
        return self._base[0]

    # -- math --------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """This rank's shard of s * B @ A, in the adapters' dtype (fp32 when asked by merge)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def weight_norm(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Detached L2 norm of each FULL output row of W + s B A (all-reduced for row layers)."""
        w = (self.base.weight if weight is None else weight).detach()
        full = w.float() + (self.scaling * (self.lora_B.detach() @ self.lora_A.detach())).float()
        sq = full.pow(2).sum(dim=1)
        if self.spec.kind == "row" and self.spec.tp_size > 1:
            dist.all_reduce(sq, group=self.spec.tp_group)
        return sq.sqrt().to(w.dtype)

    def lora_out(self, x: torch.Tensor) -> torch.Tensor:
        """s * B A dropout(x), with the TP communication that makes it equal the full product."""
        from megatron.core import tensor_parallel as tpm

        spec = self.spec
        x = self.dropout(x)
        if spec.kind == "row" and not spec.input_is_parallel and spec.tp_size > 1:
            x = tpm.scatter_to_tensor_model_parallel_region(x, group=spec.tp_group)
        h = F.linear(x, self.lora_A)
        if spec.tp_size > 1 and not spec.explicit_expert_comm:
            if spec.kind == "column":
                if spec.sequence_parallel:
                    h = tpm.gather_from_sequence_parallel_region(h, group=spec.tp_group)
                else:
                    h = tpm.copy_to_tensor_model_parallel_region(h, group=spec.tp_group)
            elif spec.kind == "row":
                if spec.sequence_parallel:
                    h = tpm.reduce_scatter_to_sequence_parallel_region(h, group=spec.tp_group)
                else:
                    h = tpm.reduce_from_tensor_model_parallel_region(h, group=spec.tp_group)
        y = F.linear(h, self.lora_B) * self.scaling
        if spec.kind == "column" and spec.gather_output and spec.tp_size > 1:
            y = tpm.gather_from_tensor_model_parallel_region(y, group=spec.tp_group)
        return y

    def _base_bias(self) -> torch.Tensor | None:
        b = getattr(self.base, "bias", None)
        return b if isinstance(b, torch.Tensor) and b.numel() else None

    def add_to_output(self, x: torch.Tensor, output: Any) -> Any:
        """The forward hook body: add the adapter to the base layer's output structure."""
        if self._merged_backup is not None:  # merged into W: the base output already has it
            return output
        if not self.enabled:  # switched off: the base layer alone
            return output
        if self.spec.kind == "plain":
            out, bias, rest = output, None, None
        else:
            out, bias = output[0], output[1]
            rest = output[2:]
        if self.spec.te_layernorm:
            out, x = out  # set up by attach(): ((out, ln_out), bias)
        delta = self.lora_out(x)
        if self.use_dora:
            out = self._dora(x, out, delta)
        else:
            out = out + delta.to(out.dtype)
        if self.spec.kind == "plain":
            return out
        return (out, bias, *rest)

    def _dora(self, x: torch.Tensor, out: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base_nobias = out
            if self.spec.bias_in_output and self._base_bias() is not None:
                base_nobias = out - self._base_bias()
        else:
            # peft recomputes the base product on the dropped-out input (no bias)
            xd = self.dropout(x)
            if self.spec.kind == "plain":
                base_nobias = F.linear(xd, self.base.weight)
            else:
                o = self.base.forward(xd)
                base_nobias = o[0]
                if self.spec.bias_in_output and self._base_bias() is not None:
                    base_nobias = base_nobias - self._base_bias()
        # `delta` was computed from the same dropout mask only when dropout is off; with dropout
        # on, peft too uses independent masks for the two terms, so this matches its semantics.
        scale = self.lora_magnitude / self.weight_norm()
        if self.spec.kind == "column" and self.spec.gather_output and self.spec.tp_size > 1:
            from megatron.core import tensor_parallel as tpm

            scale = tpm.gather_from_tensor_model_parallel_region(scale[None])[0]
        return out + (scale - 1) * base_nobias + scale * delta

    # -- merge -------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + s B A (LoRA) or m/||W + s B A|| * (W + s B A) (DoRA), computed in fp32 and cast
        back; the original W is kept so unmerge() restores it bit-exactly."""
        if self._merged_backup is not None:
            return
        w = self.base.weight
        self._merged_backup = w.detach().clone()
        merged = w.float() + self.delta_weight().float()
        if self.use_dora:
            norm = merged.pow(2).sum(dim=1)
            if self.spec.kind == "row" and self.spec.tp_size > 1:
                dist.all_reduce(norm, group=self.spec.tp_group)
            merged = merged * (self.lora_magnitude.float() / norm.sqrt())[:, None]
        w.data.copy_(merged.to(w.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._merged_backup is None:
            return
        self.base.weight.data.copy_(self._merged_backup)
        self._merged_backup = None


def attach(base: nn.Module, adapter: LoRAAdapter) -> Any:
    """Hook ``adapter`` onto ``base``; returns the hook handle."""
    if adapter.spec.te_layernorm:
        # TE LayerNorm+Linear fuses the norm: ask it to hand back the normalised input (gathered
        # under SP, like the linear's own input) so LoRA sees what the weight sees. Not
        # exercised on CPU (TE is GPU-only); the GPU check covers it.
        base.return_layernorm_output = True
        base.return_layernorm_output_gathered = True
        adapter.spec.sequence_parallel = False  # the returned ln output is already gathered

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = args[0] if args else next(iter(kwargs.values()))
        return adapter.add_to_output(x, output)

    return base.register_forward_hook(hook, with_kwargs=True)
