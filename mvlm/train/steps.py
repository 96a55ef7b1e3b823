"""Mechanics of one step that do not depend on the training method: running a model chunk on a
micro-batch, micro-batch shapes, reducing the loss reports, and the guarded optimizer update.

The method-specific parts (which keys a batch needs, the loss and its reduction unit) live in
:mod:`mvlm.train.objectives`; see :mod:`mvlm.train.objectives.base` for the contract. The loss
convention every objective follows: ``loss_func`` returns the *sum* of the micro-batch's losses
and its number of units (label tokens for SFT); with ``calculate_per_token_loss`` set on the
TransformerConfig, Megatron-Core's schedule accumulates the counts and ``finalize_model_grads``
all-reduces them over DP x CP and divides the gradients by the total. So the gradient (and the
logged loss) is the same whether the global batch was split over micro-batches, DP ranks or CP
chunks -- the basis of the layout-parity tests.

Vision tower and collectives: the tower lives on the first PP stage. A micro-batch without images
would leave its parameters without gradients on that rank; under DP the other rank's image batch
gives them one. Megatron DDP reduces whole buckets whatever each rank produced, but its
overlapped-reduce path counts grad hooks per bucket, and a future hook-driven path must see the
same set of gradients everywhere. So a text-only micro-batch adds ``0 * sum(vision params)`` to
the stage output: every rank produces gradients (zeros) for the same parameter set in every step.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from megatron.core.packed_seq_params import PackedSeqParams


def unwrap(model: Any) -> Any:
    while hasattr(model, "module"):
        model = model.module
    return model


def to_device(batch: dict, device: str) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
            for k, v in batch.items()}


def packed_params(batch: dict, qkv_format: str = "sbhd") -> PackedSeqParams | None:
    """The sample boundaries of a packed micro-batch (one row) for Megatron-Core, or None.

    ``sbhd`` (CPU, and wherever no varlen kernel runs): ``cu_seqlens`` as collated; mvlm's
    attention builds the segment mask from it. ``thd`` (``config.packed_qkv_format``, chosen by
    :mod:`mvlm.runtime.fusions` on CUDA with TE or flash-attn): the same boundaries, plus
    ``cu_seqlens_*_padded`` whose last entry is the row length, so the pad tail after the last
    sample belongs to it as padding: TE's kernel skips it, and Megatron's THD RoPE maps its
    per-token frequencies by offset (it needs the padded ends to cover the row). The real
    ``cu_seqlens`` keep the pads out of the MoE router (``vlm.router_padding_mask``)."""
    cu = batch.get("cu_seqlens")
    if cu is None:
        return None
    cu = cu.to(torch.int32)
    m = int(batch.get("max_seqlen") or int((cu[1:] - cu[:-1]).max()))
    if qkv_format == "sbhd":
        params = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=m, max_seqlen_kv=m)
        if batch.get("segment_parent") is not None:  # shared-prefix pairs (attention.py)
            params.segment_parent = batch["segment_parent"]
        return params
    if qkv_format != "thd":
        raise ValueError(f"packed_qkv_format must be 'sbhd' or 'thd', got {qkv_format!r}")
    if batch.get("segment_parent") is not None:  # THD kernels have no tree mask: never drop it
        raise RuntimeError("shared-prefix pair rows (segment_parent) reached the THD layout, "
                           "whose kernels cannot apply their tree mask; "
                           "mvlm/train/objectives/shared_prefix.py keeps two-segment rows under "
                           "THD, so this is a bug: please report it")
    row = int(batch["input_ids"].shape[-1])
    padded = None
    if int(cu[-1]) < row:
        padded = cu.clone()
        padded[-1] = row
        m = max(m, int(padded[-1] - padded[-2]))
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           cu_seqlens_q_padded=padded, cu_seqlens_kv_padded=padded,
                           max_seqlen_q=m, max_seqlen_kv=m)


def microbatch_dims(batches: list[dict], pp: int = 1) -> tuple[int, int]:
    """(rows, seq_len) of the step's micro-batches as the model sees them.

    Megatron-Core's pipeline schedule allocates the activations it receives from the previous
    stage as [seq_len, rows, hidden], so it must get the rows of the tensors actually fed, not
    ``--micro_batch_size``: with packing, a micro-batch of N packed rows is ONE concatenated row
    (``collate.collate_packed_rows``), b = 1. Under PP (``pp > 1``) the rows must agree across
    the step's micro-batches (and the lengths: see ``batches.same_length``); without PP
    the schedule does not use the shape and a short last micro-batch is fine.
    """
    if not batches:
        raise ValueError("a step needs at least one micro-batch")
    rows = sorted({int(b["input_ids"].shape[0]) for b in batches})
    if pp > 1 and len(rows) != 1:
        raise ValueError(f"micro-batches of one step have different row counts {rows}: "
                         "pipeline stages exchange one activation shape per step")
    return rows[-1], int(batches[0]["input_ids"].shape[1])


def _vision_zero_term(model: Any) -> torch.Tensor | None:
    vm = getattr(unwrap(model), "vision_model", None)
    if vm is None:
        return None
    ps = [p for p in vm.parameters() if p.requires_grad]
    if not ps:
        return None
    return sum(p.sum() for p in ps) * 0.0


def model_forward(model: Any, batch: dict) -> torch.Tensor:
    """Run one chunk on a batch-contract micro-batch; per-token loss on the last stage."""
    m = unwrap(model)
    media = {k: batch[k] for k in m.family.batch_keys if batch.get(k) is not None}
    out = model(batch["input_ids"], batch["position_ids"],
                attention_mask=batch.get("attention_mask"), labels=batch.get("labels"),
                packed_seq_params=packed_params(
                    batch, getattr(m.config, "packed_qkv_format", "sbhd")), **media)
    if m.pre_process and not any(k.features_key in media for k in m.family.media) and \
            torch.is_grad_enabled():
        zero = _vision_zero_term(model)
        if zero is not None:
            out = out + zero.to(out.dtype)
    return out


@dataclass
class StepStats:
    """Global-batch numbers of one step, identical on every rank after :func:`reduce_stats`:
    the loss (sum, count), and the objective's other metrics as ``reports`` (sum, count) and
    ``extra`` (sum / count)."""

    loss_sum: float = 0.0
    tokens: int = 0
    extra: dict[str, float] = field(default_factory=dict)
    reports: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.tokens)

    def sums(self, metrics: tuple[str, ...]) -> list[float]:
        """[loss_sum, tokens, sum, count, ...] in the order of ``metrics`` (the loss first)."""
        out = [self.loss_sum, float(self.tokens)]
        for key in metrics[1:]:
            out.extend(self.reports[key])
        return out


def reduce_stats(losses_reduced: list[dict], device: str,
                 metrics: tuple[str, ...] = ("lm_loss",)) -> StepStats:
    """Sum the micro-batch reports over micro-batches, DP x CP, and share them along PP.

    Each report ``metrics[i]`` is a ``[sum, count]`` pair; the first is the loss (``loss_sum``,
    ``tokens``), the others land in ``extra`` as ``sum / count``. One all-reduce and one
    broadcast of all of them together, in the declared order (the same on every rank).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    t = torch.zeros(2 * len(metrics), dtype=torch.float64, device=device)
    for r in losses_reduced:
        for i, key in enumerate(metrics):
            t[2 * i:2 * i + 2] += r[key].to(torch.float64).to(device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        dist.all_reduce(t, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    # The last stage holds the numbers; give them to every stage (logging, NaN stop).
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    dist.broadcast(t, src=last, group=pp_group)
    reports = {key: (float(t[2 * i]), float(t[2 * i + 1]))
               for i, key in enumerate(metrics) if i > 0}
    extra = {key: s / max(1.0, n) for key, (s, n) in reports.items()}
    return StepStats(loss_sum=float(t[0]), tokens=int(round(float(t[1]))), extra=extra,
                     reports=reports)


class NonFiniteLossError(RuntimeError):
    """Raised on every rank when a step's loss or grad norm is NaN/inf (too often)."""


@dataclass
class UpdateOutcome:
    """What :func:`checked_optimizer_step` did with one step's gradients."""

    applied: bool
    grad_norm: float | None
    skipped_because: str | None = None  # "loss" | "grad norm" when the update was dropped


def checked_optimizer_step(optimizer: Any, models: list[Any], step: int, loss: float,
                           skipped: int, max_skipped: int, check: bool = True) -> UpdateOutcome:
    """One optimizer update that never applies a non-finite loss or gradient.

    Why not ``optimizer.step()`` and a look afterwards: Megatron-Core's fp32 and bf16 optimizers
    have no overflow check (only fp16 loss scaling looks for inf), so a NaN gradient would already
    be in every weight. With ``check`` (``--check_for_nan_in_loss_and_grad``): the loss, already
    reduced over the world by :func:`reduce_stats`, is looked at first; then the gradients are
    prepared and their global norm taken -- the reduction clipping does, over the same groups,
    so every rank sees the same number and takes the same branch. Only a finite step is applied,
    by :func:`step_with_grad_norm`: the rest of ``optimizer.step()`` with that norm, so the norm
    is computed once per step, not twice (fp16 is refused by the flags).

    A bad step is skipped -- no update, no scheduler step, its gradients dropped with the next
    ``zero_grad`` -- while at most ``max_skipped`` steps were; the next one raises
    :class:`NonFiniteLossError` naming the step, what was not finite and the first parameter
    holding a non-finite gradient.

    Megatron DDP's own ``check_for_nan_in_grad`` stays off: it checks each rank's local buckets
    before the all-reduce and raises on the one rank that holds the NaN, leaving the others
    blocked in the collective until the launcher or NCCL timeout kills them, and it cannot honour
    ``--max_skipped_steps``. The global norm is NaN/inf exactly when some gradient is (or the sum
    overflows), so this check sees everything that one would.
    """
    if not check:
        ok, norm, _ = optimizer.step()
        return UpdateOutcome(bool(ok), None if norm is None else float(norm))
    norm: float | None = None
    bad: str | None = None
    if not math.isfinite(loss):
        bad = "loss"
    elif optimizer.prepare_grads():  # fp16 loss-scale overflow: Megatron's own inf check
        bad = "grad norm"
    else:
        norm = float(optimizer.get_grad_norm())
        if not math.isfinite(norm):
            bad = "grad norm"
    if bad is None:
        return UpdateOutcome(step_with_grad_norm(optimizer, norm), norm)
    where = first_nonfinite_grad(models) if bad == "grad norm" else None
    skipped += 1
    detail = (f"step {step}: the {bad} is not finite (loss={loss}, grad_norm={norm}"
              + (f", first non-finite gradient: {where}" if where else "") + ")")
    if skipped > max_skipped:
        raise NonFiniteLossError(
            f"{detail}; {skipped} such step(s), --max_skipped_steps {max_skipped}. The update "
            "was not applied and no checkpoint of this step was written: the last good "
            "checkpoint in --output_dir is intact. Lower --lr, check the data, or raise "
            "--max_skipped_steps to skip such steps.")
    logging.getLogger("mvlm.train").warning(
        "%s: update skipped (%d of --max_skipped_steps %d)", detail, skipped, max_skipped)
    return UpdateOutcome(False, norm, bad)


def step_with_grad_norm(optimizer: Any, grad_norm: float) -> bool:
    """What Megatron-Core's ``optimizer.step()`` does after ``prepare_grads()`` and the global
    grad norm, given that norm: clip every (chained) optimizer's main grads by it, then
    ``step_with_ready_grads()``. Same arithmetic as ``step()`` (the clip factor is computed from
    the same float), without ``step()``'s second ``prepare_grads`` and second norm reduction.
    Returns whether the update was applied."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        if getattr(opt, "is_stub_optimizer", False) or opt.config.clip_grad <= 0.0:
            continue
        params = opt.get_parameters()
        if params:
            clip_grad_by_total_norm_fp32(
                params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return bool(optimizer.step_with_ready_grads())


def first_nonfinite_grad(models: list[Any]) -> str | None:
    """'name (rank r)' of the first parameter (in rank, then module order) whose gradient has a
    NaN/inf, or None. Collective over the world; only called on the failure path."""
    import torch.distributed as dist

    local = None
    for m in models:
        for name, p in unwrap(m).named_parameters():
            g = getattr(p, "main_grad", None)
            g = p.grad if g is None else g
            if g is not None and not bool(torch.isfinite(g).all()):
                local = _global_layer_name(unwrap(m), name)
                break
        if local:
            break
    if not dist.is_initialized():
        return local
    found: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(found, local)
    return next((f"{n} (rank {r})" for r, n in enumerate(found) if n), None)


def _global_layer_name(model: Any, name: str) -> str:
    """``name`` with the stage-local decoder layer index replaced by the global one (Megatron's
    1-based ``layer_number`` - 1), so a name reported from a later pipeline stage or VPP chunk
    points at the layer the user's checkpoint calls by that number."""
    marker = ".layers."
    at = name.find(marker)
    if at < 0:
        return name
    prefix, rest = name[:at + len(marker)], name[at + len(marker):]
    idx, _, tail = rest.partition(".")
    if not idx.isdigit():
        return name
    layer = dict(model.named_modules()).get(prefix + idx)
    number = getattr(layer, "layer_number", None)
    return name if number is None else f"{prefix}{int(number) - 1}.{tail}"
