"""One micro-batch through the model, and the loss Megatron-Core's schedules expect.

Loss convention: token-mean over the GLOBAL batch. ``loss_func`` returns the *sum* of per-token
losses and the number of loss tokens of its micro-batch; with ``calculate_per_token_loss`` set on
the TransformerConfig, Megatron-Core's schedule accumulates the token counts and
``finalize_model_grads`` all-reduces them over DP x CP and divides the gradients by the total. So
the gradient (and the logged loss) is the same whether the global batch was split over micro-
batches, DP ranks or CP chunks -- the basis of the layout-parity tests.

Vision tower and collectives: the tower lives on the first PP stage. A micro-batch without images
would leave its parameters without gradients on that rank; under DP the other rank's image batch
gives them one. Megatron DDP reduces whole buckets whatever each rank produced, but its
overlapped-reduce path counts grad hooks per bucket, and a future hook-driven path must see the
same set of gradients everywhere. So a text-only micro-batch adds ``0 * sum(vision params)`` to
the stage output: every rank produces gradients (zeros) for the same parameter set in every step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from megatron.core.packed_seq_params import PackedSeqParams

MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def unwrap(model: Any) -> Any:
    while hasattr(model, "module"):
        model = model.module
    return model


def to_device(batch: dict, device: str) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
            for k, v in batch.items()}


def packed_params(batch: dict) -> PackedSeqParams | None:
    cu = batch.get("cu_seqlens")
    if cu is None:
        return None
    cu = cu.to(torch.int32)
    m = int(batch.get("max_seqlen") or int((cu[1:] - cu[:-1]).max()))
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=m, max_seqlen_kv=m)


def microbatch_dims(batches: list[dict], pp: int = 1) -> tuple[int, int]:
    """(rows, seq_len) of the step's micro-batches as the model sees them.

    Megatron-Core's pipeline schedule allocates the activations it receives from the previous
    stage as [seq_len, rows, hidden], so it must get the rows of the tensors actually fed, not
    ``--micro_batch_size``: with packing, a micro-batch of N packed rows is ONE concatenated row
    (``collate.collate_packed_rows``), b = 1. Under PP (``pp > 1``) the rows must agree across
    the step's micro-batches (and the lengths: see the trainer's ``_same_length``); without PP
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
    out = model(batch["input_ids"], batch["position_ids"],
                attention_mask=batch.get("attention_mask"), labels=batch.get("labels"),
                pixel_values=batch.get("pixel_values"), image_grid_thw=batch.get("image_grid_thw"),
                pixel_values_videos=batch.get("pixel_values_videos"),
                video_grid_thw=batch.get("video_grid_thw"), packed_seq_params=packed_params(batch))
    if m.pre_process and batch.get("pixel_values") is None and \
            batch.get("pixel_values_videos") is None and torch.is_grad_enabled():
        zero = _vision_zero_term(model)
        if zero is not None:
            out = out + zero.to(out.dtype)
    return out


def loss_func(loss_mask: torch.Tensor, per_token: torch.Tensor):
    """(sum of losses, #loss tokens, report) -- Megatron's per-token-loss contract."""
    per_token = per_token.float()
    n = loss_mask.sum().to(torch.int)
    loss_sum = (per_token * loss_mask).sum()
    report = torch.stack([loss_sum.detach().clone(), n.detach().clone().float()])
    return loss_sum, n, {"lm_loss": report}


def local_loss_mask(batch: dict) -> torch.Tensor:
    """This CP rank's chunk of the loss mask (the model splits labels the same way)."""
    from megatron.core import parallel_state

    from mvlm.models.vlm import cp_split

    mask = (batch["labels"] >= 0).float()
    cp = parallel_state.get_context_parallel_world_size()
    if cp > 1:
        mask = cp_split(mask, 1, cp, parallel_state.get_context_parallel_rank())
    return mask


def forward_step(data_iterator, model):
    """Megatron-Core forward_step_func: next micro-batch -> (output, loss_func)."""
    batch = next(data_iterator)
    out = model_forward(model, batch)
    if not unwrap(model).post_process:
        return out, None
    return out, partial(loss_func, local_loss_mask(batch))


@dataclass
class StepStats:
    """Global-batch numbers of one step, identical on every rank after :func:`reduce_stats`."""

    loss_sum: float = 0.0
    tokens: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.tokens)


def reduce_stats(losses_reduced: list[dict], device: str) -> StepStats:
    """Sum the micro-batch reports over micro-batches, DP x CP, and share them along PP."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    t = torch.zeros(2, dtype=torch.float64, device=device)
    for r in losses_reduced:
        t += r["lm_loss"].to(torch.float64).to(device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        dist.all_reduce(t, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    # The last stage holds the numbers; give them to every stage (logging, NaN stop).
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    dist.broadcast(t, src=last, group=pp_group)
    return StepStats(loss_sum=float(t[0]), tokens=int(round(float(t[1]))))


class NonFiniteLossError(RuntimeError):
    """Raised on every rank when a step's loss or grad norm is NaN/inf (too often)."""


def check_finite(step: int, loss: float, grad_norm: float | None, skipped: int,
                 max_skipped: int) -> None:
    bad_loss = not math.isfinite(loss)
    bad_grad = grad_norm is not None and not math.isfinite(grad_norm)
    if bad_loss or (bad_grad and skipped > max_skipped):
        what = "loss" if bad_loss else "gradient norm"
        raise NonFiniteLossError(
            f"step {step}: {what} is not finite (loss={loss}, grad_norm={grad_norm}, "
            f"skipped steps so far={skipped}); lower --lr, check the data, or use float32/"
            "bfloat16 instead of float16. The last good checkpoint is in --output_dir.")
