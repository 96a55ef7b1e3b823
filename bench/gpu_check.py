"""GPU check: mvlm (Megatron-Core, local spec + SDPA) vs transformers + torch AdamW on one GPU.

Run through ``scripts/gpu_check.sh`` on the reference box (one H100/H200, CUDA PyTorch, no
megatron-core until its wheel is installed). What it does, in one run:

1. builds a ~1B-parameter Qwen2.5-VL-shaped random checkpoint in bf16 (tiny_models "bench"
   variant scaled up by :data:`DEFAULT_SHAPE`), written with ``save_pretrained``;
2. **mcore** (a subprocess): loads it into mvlm's Megatron-Core model through the conversion code
   (``load_hf_weights``, in memory, TP=1), then runs ``--steps`` bf16 training steps through the
   trainer itself (``mvlm.train.trainer.Trainer.train_step`` with the ``sft`` objective: DDP,
   distributed Adam with bf16 params and fp32 main grads/states, scheduler, per-token loss
   through Megatron-Core's forward_backward_func, the NaN guard) on synthetic image+text batches;
3. **hf** (a second subprocess, so peak memory is not shared): the same batches through
   ``Qwen2_5_VLForConditionalGeneration`` in bf16 with ``torch.optim.AdamW``;
4. prints tokens/s, MFU and peak memory for both as a short table LAST, just below the kernels
   mvlm ran with (fused kernels on and off with the reason, from ``mvlm.runtime.fusions``; the
   attention kernel each layer used; the packed-row layout), and writes every number (per-step
   times and losses, shapes, FLOP counts, versions, device, kernels) to ``--out``.

The first-step loss of both sides is reported too: the same weights and batch must give nearly
the same loss (bf16), which checks the conversion on the GPU at full scale.

MFU = model FLOPs per step / step time / peak. Model FLOPs are counted analytically
(:func:`train_flops`): 6 x (matmul parameters) per token, plus attention scores at the work
causal SDPA really does (half the square) in the decoder, full windows/images in the vision
tower; no recompute is counted. Peak bf16 dense TFLOP/s: H100 SXM 989, H200 989, H100 PCIe 756
(:func:`peak_tflops`); ``--peak_tflops`` overrides.

Only the argument parsing, shape/FLOP arithmetic and table are importable without CUDA; the
rest fails fast with a clear message on a machine without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

EXIT_NO_CUDA = 3

# Peak dense bf16 TFLOP/s by device-name fragment (first match wins; PCIe before the plain name).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
)


@dataclass
class Shape:
    """The benchmark model and batch geometry (Qwen2.5-VL layout)."""

    hidden: int = 2048
    layers: int = 16
    heads: int = 16
    kv_heads: int = 4
    intermediate: int = 5504
    vocab: int = 32768
    vision_depth: int = 8
    vision_hidden: int = 1024
    vision_heads: int = 16
    vision_intermediate: int = 2816
    vision_fullatt: list[int] = field(default_factory=lambda: [3, 7])
    window_size: int = 112  # pixels, as in Qwen2.5-VL
    patch: int = 14
    merge: int = 2
    temporal_patch: int = 2
    seq_len: int = 2048
    micro_batch_size: int = 4
    image_size: int = 448  # square images, one per sample

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def patches_per_image(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def image_tokens(self) -> int:
        return self.patches_per_image // self.merge**2

    @property
    def window_patches(self) -> int:
        return min(self.patches_per_image, (self.window_size // self.patch) ** 2)

    def tiny_model_overrides(self) -> dict[str, Any]:
        """Keyword overrides for ``build_tiny_checkpoint(..., variant="bench")``."""
        return {
            "hidden_size": self.hidden, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
            "intermediate_size": self.intermediate, "vocab_size": self.vocab,
            "max_position_embeddings": max(4096, 2 * self.seq_len),
            "vision_config": {
                "depth": self.vision_depth, "hidden_size": self.vision_hidden,
                "num_heads": self.vision_heads, "intermediate_size": self.vision_intermediate,
                "fullatt_block_indexes": list(self.vision_fullatt),
                "window_size": self.window_size, "patch_size": self.patch,
                "spatial_merge_size": self.merge, "temporal_patch_size": self.temporal_patch,
            },
        }


DEFAULT_SHAPE = Shape()


def param_counts(s: Shape) -> dict[str, int]:
    """Exact parameter counts of the HF Qwen2.5-VL model with this shape, by part.

    ``text_matmul`` / ``vision_matmul`` / ``lm_head`` are the weights that do matmuls per token
    (what the FLOP count uses); ``other`` holds embeddings, norms and biases.
    """
    h, d, i = s.hidden, s.head_dim, s.intermediate
    q, kv = s.heads * d, s.kv_heads * d
    text_matmul = s.layers * (h * q + 2 * h * kv + q * h + 3 * h * i)
    text_other = s.layers * (q + 2 * kv + 2 * h) + h  # qkv biases, 2 norms/layer, final norm
    hv, iv = s.vision_hidden, s.vision_intermediate
    patch_in = 3 * s.temporal_patch * s.patch**2
    merged = hv * s.merge**2
    vision_block = 3 * hv * hv + hv * hv + 3 * hv * iv
    vision_matmul = patch_in * hv + s.vision_depth * vision_block
    merger_matmul = merged * merged + merged * h
    # per block: qkv, proj, gate/up, down biases; 2 norms
    vision_other = (s.vision_depth * (3 * hv + hv + 2 * iv + hv + 2 * hv)
                    + hv + merged + h)  # merger: ln_q, two biases
    return {
        "text_matmul": text_matmul, "lm_head": h * s.vocab, "embedding": h * s.vocab,
        "vision_matmul": vision_matmul, "merger_matmul": merger_matmul,
        "other": text_other + vision_other,
        "total": text_matmul + 2 * h * s.vocab + vision_matmul + merger_matmul
        + text_other + vision_other,
    }


def train_flops(s: Shape) -> dict[str, float]:
    """Model FLOPs of one training step (forward + backward = 3 x forward) for one micro-batch.

    Per decoder token: 2 FLOPs per matmul weight forward, plus causal attention: QK^T and AV over
    on average half the sequence, 2 * 2 * (s/2) * q_dim. Per vision patch: matmul weights, plus
    attention over its window (``window_patches``) or the whole image in full-attention blocks.
    The merger runs once per merged token. Training = 3x forward.
    """
    p = param_counts(s)
    b, seq = s.micro_batch_size, s.seq_len
    q_dim = s.heads * s.head_dim
    text_fwd = b * seq * (2 * (p["text_matmul"] + p["lm_head"])
                          + s.layers * 2 * 2 * (seq / 2) * q_dim)
    n_patch = s.patches_per_image * b
    full = len(s.vision_fullatt)
    windowed = s.vision_depth - full
    attn_ctx = full * s.patches_per_image + windowed * s.window_patches
    vision_fwd = (n_patch * (2 * p["vision_matmul"] + 2 * 2 * attn_ctx * s.vision_hidden)
                  + (n_patch // s.merge**2) * 2 * p["merger_matmul"])
    return {"text": 3 * text_fwd, "vision": 3 * vision_fwd, "total": 3 * (text_fwd + vision_fwd)}


def peak_tflops(device_name: str, override: float | None = None) -> tuple[float | None, str]:
    """Dense bf16 peak for ``device_name`` and where the number came from."""
    if override:
        return override, "--peak_tflops"
    for frag, value in PEAK_BF16_TFLOPS:
        if frag.lower() in device_name.lower():
            return value, f"{frag} bf16 dense spec"
    return None, "unknown device: pass --peak_tflops for MFU"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work_dir", default="gpu_check_work",
                   help="where the random checkpoint and per-side results go")
    p.add_argument("--out", default="gpu_check_results.json", help="full results (JSON)")
    p.add_argument("--steps", type=int, default=8, help="timed training steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (kernels, alloc)")
    p.add_argument("--seq_len", type=int, default=DEFAULT_SHAPE.seq_len)
    p.add_argument("--micro_batch_size", type=int, default=DEFAULT_SHAPE.micro_batch_size)
    p.add_argument("--image_size", type=int, default=DEFAULT_SHAPE.image_size)
    p.add_argument("--layers", type=int, default=DEFAULT_SHAPE.layers)
    p.add_argument("--hidden", type=int, default=DEFAULT_SHAPE.hidden)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="bf16 dense peak of this GPU (default: from the device name)")
    p.add_argument("--sides", default="mcore,hf", help="comma list of mcore, hf")
    p.add_argument("--cpu_smoke", action="store_true",
                   help="tiny fp32 model on CPU: checks the driver's logic without a GPU "
                        "(numbers are meaningless)")
    p.add_argument("--only", choices=["mcore", "hf"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sides = [x.strip() for x in args.sides.split(",") if x.strip()]
    bad = [x for x in sides if x not in ("mcore", "hf")]
    if bad or not sides:
        p.error(f"--sides: unknown {bad or sides}; use mcore, hf or mcore,hf")
    args.sides = sides
    args.device = "cpu" if args.cpu_smoke else "cuda"
    if args.cpu_smoke:
        args.seq_len, args.micro_batch_size, args.image_size = 96, 2, 112
        args.layers, args.hidden = 2, 128
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.image_size % (DEFAULT_SHAPE.patch * DEFAULT_SHAPE.merge):
        p.error(f"--image_size must be a multiple of {DEFAULT_SHAPE.patch * DEFAULT_SHAPE.merge}")
    return args


SMOKE_SHAPE = {"heads": 4, "kv_heads": 2, "intermediate": 256, "vocab": 1000,
               "vision_depth": 2, "vision_hidden": 64, "vision_heads": 4,
               "vision_intermediate": 128, "vision_fullatt": [1]}


def shape_from_args(args: argparse.Namespace) -> Shape:
    s = Shape(seq_len=args.seq_len, micro_batch_size=args.micro_batch_size,
              image_size=args.image_size, layers=args.layers, hidden=args.hidden,
              **(SMOKE_SHAPE if getattr(args, "cpu_smoke", False) else {}))
    if s.image_tokens + 8 > s.seq_len:
        raise ValueError(f"--seq_len {s.seq_len} cannot hold the {s.image_tokens} image tokens "
                         f"of a {s.image_size}px image; raise --seq_len or lower --image_size")
    if s.hidden % s.heads:
        raise ValueError(f"--hidden {s.hidden} must be a multiple of {s.heads} heads")
    return s


def format_table(rows: list[dict[str, Any]], peak: float | None, peak_src: str,
                 device: str) -> str:
    """The short block printed last (it may be all that is read): the kernels each side ran
    with, then the table (its rows are the last lines)."""
    lines = [f"gpu_check on {device}; MFU vs {peak if peak else '?'} TFLOP/s ({peak_src})"]
    for r in rows:
        if r.get("kernels"):
            lines.extend(kernel_lines(r["label"], r["kernels"]))
    lines.append(f"{'side':<38} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak mem':>9} "
                 f"{'step s':>7} {'loss@1':>8}")
    for r in rows:
        if "error" in r:
            lines.append(f"{r['label']:<38} FAILED: {r['error'][:60]}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        lines.append(f"{r['label']:<38} {r['tokens_per_s']:>10.0f} {r['tflops']:>8.1f} "
                     f"{mfu:>6} {r['peak_mem_gib']:>7.1f}Gi {r['step_s']:>7.3f} "
                     f"{r['losses'][0]:>8.4f}")
    return "\n".join(lines)


def kernel_lines(label: str, k: dict[str, Any]) -> list[str]:
    """What ran on a side, next to its numbers: fused kernels on, the ones off (with why), the
    attention kernels the forward passes used, the packed-row layout."""
    on = [n for n, v in k["fusions"].items() if v["on"]]
    off = [f"{n} ({v['why']})" for n, v in k["fusions"].items() if not v["on"]]
    return [f"kernels of {label}: spec {k['backend']}; attention {', '.join(k['attention'])}"
            f"; vision attention {k['vision_attention']}; packed rows {k['packed_qkv_format']}",
            f"  fused: {', '.join(on) or 'none'}",
            f"  not fused: {'; '.join(off) or 'none'}"]


def kernels_used(bundle: Any, layout: Any, device: str) -> dict[str, Any]:
    """The kernels mvlm's model ran with: the fusion switches as its TransformerConfig holds
    them (with the reasons of :func:`mvlm.runtime.fusions.choose_fusions`), the attention kernel
    each decoder layer's core attention recorded (``kernel_used``; TE's for the TE spec), and the
    HF vision tower's attention implementation. Call after at least one forward pass."""
    from mvlm.models.gpt import fusion_choice
    from mvlm.runtime.fusions import FUSION_FLAGS

    choice = fusion_choice(bundle.arch, layout, device, bundle.backend).report()
    cfg = bundle.config
    fusions = {n: {"on": bool(getattr(cfg, n)), "why": choice[n]["why"]} for n in FUSION_FLAGS}
    attention = sorted({str(getattr(m, "kernel_used", None) or type(m).__name__)
                        for model in bundle.models for name, m in model.named_modules()
                        if name.endswith("core_attention")})
    vision = getattr(bundle.hf_config, "vision_config", None)
    return {"backend": bundle.backend, "fusions": fusions, "attention": attention,
            "packed_qkv_format": f"{getattr(cfg, 'packed_qkv_format', 'sbhd')} "
                                 f"({choice['packed_qkv_format']['why']})",
            "vision_attention": getattr(vision, "_attn_implementation", None) or "n/a"}


# ----------------------------------------------------------------------------------------------
# GPU parts
# ----------------------------------------------------------------------------------------------


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); this check needs "
              "one H100/H200. Nothing was run.", file=sys.stderr)
        sys.exit(EXIT_NO_CUDA)


def synthetic_batch(s: Shape, hf_config: Any, seed: int, device: str,
                    dtype: Any = None) -> dict[str, Any]:
    """One micro-batch: per row [text, <vision_start>, image pads, <vision_end>, text].

    Token ids are random ordinary tokens; pixel values random; labels are the text tokens (HF
    convention: unshifted, -100 on vision tokens). Both sides get exactly these tensors.
    """
    import torch

    from mvlm.data.mrope import get_rope_index

    dtype = dtype or torch.bfloat16
    g = torch.Generator().manual_seed(seed)
    b, seq = s.micro_batch_size, s.seq_len
    prefix = 8
    ids = torch.randint(0, 600, (b, seq), generator=g)
    ids[:, prefix - 1] = hf_config.vision_start_token_id
    ids[:, prefix:prefix + s.image_tokens] = hf_config.image_token_id
    ids[:, prefix + s.image_tokens] = hf_config.vision_end_token_id
    labels = ids.clone()
    labels[(ids == hf_config.image_token_id) | (ids == hf_config.vision_start_token_id)
           | (ids == hf_config.vision_end_token_id)] = -100
    side = s.image_size // s.patch
    grid = torch.tensor([[1, side, side]] * b)
    pix = torch.randn(b * s.patches_per_image, 3 * s.temporal_patch * s.patch**2, generator=g)
    pos = torch.stack([
        get_rope_index(ids[i], image_token_id=hf_config.image_token_id,
                       video_token_id=hf_config.video_token_id, spatial_merge_size=s.merge,
                       image_grid_thw=grid[i:i + 1], tokens_per_second=2)
        for i in range(b)], dim=1)  # [3, b, s]
    mm_types = (ids == hf_config.image_token_id).long()  # HF 5.x computes mRoPE only with it
    return {"input_ids": ids.to(device), "labels": labels.to(device),
            "mm_token_type_ids": mm_types.to(device),
            "pixel_values": pix.to(device, dtype), "image_grid_thw": grid.to(device),
            "position_ids": pos.to(device)}


def _timed_steps(step_fn: Any, batches: list[dict], warmup: int, steps: int
                 ) -> tuple[list[float], list[float]]:
    import torch

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    times, losses = [], []
    for k in range(warmup + steps):
        sync()
        t = time.perf_counter()
        loss = step_fn(batches[k % len(batches)])
        sync()
        if k == 0 or k >= warmup:
            losses.append(float(loss))
        if k >= warmup:
            times.append(time.perf_counter() - t)
    return times, losses


def run_hf_side(args: argparse.Namespace, s: Shape, hf_dir: Path) -> dict[str, Any]:
    import torch
    import transformers

    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        hf_dir, dtype=_dtype(args), attn_implementation="sdpa").to(args.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0,
                            fused=args.device == "cuda")
    cfg = model.config
    batches = [synthetic_batch(s, cfg, seed, args.device, _dtype(args)) for seed in range(2)]

    def step(batch: dict) -> torch.Tensor:
        out = model(input_ids=batch["input_ids"], labels=batch["labels"],
                    mm_token_type_ids=batch["mm_token_type_ids"],
                    pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as the mcore side does
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    _reset_peak_memory()
    times, losses = _timed_steps(step, batches, args.warmup, args.steps)
    return {"label": f"transformers + torch AdamW ({_dtype_name(args)})",
            "times": times, "losses": losses,
            "peak_mem_bytes": _peak_memory(),
            "optimizer": "torch.optim.AdamW (fused on CUDA), states in the param dtype"}


def _trainer_cfg(args: argparse.Namespace) -> Any:
    """The :class:`mvlm.config.TrainConfig` of a :class:`mvlm.train.trainer.Trainer` built from a
    ready model (optimizer, DDP, NaN guard, batch size, schedule; no data section is read).

    Built directly rather than through ``parse_train_args``: that parser pulls in the data
    pipeline (``datasets``/``pyarrow``), which the reference GPU box does not have and which this
    check does not need (its batches are synthetic); mvlm.config itself imports the standard
    library only. Adam betas/eps and clipping equal the HF side; the NaN guard is on, as in
    `mvlm sft`.
    """
    from mvlm.config import (
        FreezeConfig,
        OptimConfig,
        ParallelConfig,
        ScheduleConfig,
        TrainConfig,
    )

    return TrainConfig(
        task="sft", output_dir=args.work_dir,
        optim=OptimConfig(lr=args.lr, min_lr=args.lr, lr_decay_style="constant",
                          weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8,
                          clip_grad=1.0, check_for_nan_in_loss_and_grad=True,
                          max_skipped_steps=0),
        freeze=FreezeConfig(freeze_vit=False, freeze_aligner=False, freeze_llm=False),
        parallel=ParallelConfig(use_distributed_optimizer=True, overlap_grad_reduce=False),
        schedule=ScheduleConfig(micro_batch_size=args.micro_batch_size,
                                global_batch_size=args.micro_batch_size))


def run_mcore_side(args: argparse.Namespace, s: Shape, hf_dir: Path) -> dict[str, Any]:
    """mvlm's training step as `mvlm sft` runs it -- :meth:`mvlm.train.trainer.Trainer.train_step`
    with the ``sft`` objective (DDP, distributed optimizer, LR scheduler, per-token loss through
    Megatron-Core's forward_backward_func, the NaN guard) -- fed the synthetic batches instead
    of the data pipeline."""
    import torch
    from transformers import AutoConfig

    from mvlm.convert.bridge import load_hf_weights
    from mvlm.models.vlm import build_model
    from mvlm.runtime.parallel import ParallelLayout
    from mvlm.runtime.startup import startup
    from mvlm.train.objectives import get_objective
    from mvlm.train.trainer import Trainer

    layout = ParallelLayout(tp=1)
    device = startup(layout, seed=1234, device=args.device).device
    hf_config = AutoConfig.from_pretrained(hf_dir)
    t = time.perf_counter()
    bundle = build_model(hf_config, layout, dtype=_dtype(args), device=device,
                         backend="local", perform_initialization=False)
    load_hf_weights(bundle, hf_dir)  # the conversion, in memory
    load_s = time.perf_counter() - t
    trainer = Trainer(_trainer_cfg(args), bundle, layout, objective=get_objective("sft"),
                      device=device)
    trainer.build_scheduler(args.warmup + args.steps)
    batches = []
    for seed in range(2):
        b = synthetic_batch(s, hf_config, seed, device, _dtype(args))
        labels = torch.full_like(b["labels"], -100)  # Megatron targets: labels[t] = next token
        labels[:, :-1] = b["labels"][:, 1:]
        batches.append({k: b[k] for k in ("input_ids", "position_ids", "pixel_values",
                                          "image_grid_thw")} | {"labels": labels})
    for m in trainer.ddp_models:
        m.train()

    def step(batch: dict) -> float:
        return trainer.train_step([batch]).stats.loss

    _reset_peak_memory()
    times, losses = _timed_steps(step, batches, args.warmup, args.steps)
    return {"label": f"mvlm Megatron-Core (local+SDPA, {_dtype_name(args)})",
            "times": times, "losses": losses,
            "kernels": kernels_used(bundle, layout, device),
            "peak_mem_bytes": _peak_memory(), "hf_load_s": load_s,
            "optimizer": "mvlm.train: Megatron-Core distributed Adam, fp32 main grads and states"}


def _dtype(args: argparse.Namespace) -> Any:
    import torch

    return torch.float32 if args.cpu_smoke else torch.bfloat16


def _dtype_name(args: argparse.Namespace) -> str:
    return "fp32" if args.cpu_smoke else "bf16"


def _reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_memory() -> int:
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def _side_main(args: argparse.Namespace) -> int:
    """Child process: one side, its raw numbers to ``--result``."""
    import torch

    s = shape_from_args(args)
    hf_dir = Path(args.work_dir) / "hf_bench"
    try:
        res = (run_mcore_side if args.only == "mcore" else run_hf_side)(args, s, hf_dir)
    except torch.cuda.OutOfMemoryError as e:
        res = {"label": args.only, "error": f"CUDA OOM: {e}"}
    Path(args.result).write_text(json.dumps(res))
    return 0 if "error" not in res else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.cpu_smoke:
        require_cuda()
    if args.only:
        return _side_main(args)
    import torch

    from mvlm.testing.tiny_models import build_tiny_checkpoint

    t0 = time.time()
    s = shape_from_args(args)
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    hf_dir = work / "hf_bench"
    t = time.time()
    build_tiny_checkpoint("qwen2_5_vl", hf_dir, variant="bench", dtype=_dtype(args),
                          **s.tiny_model_overrides())
    build_s = time.time() - t
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (smoke test)"
    peak, peak_src = peak_tflops(device, args.peak_tflops)
    flops = train_flops(s)
    tokens = s.micro_batch_size * s.seq_len
    print(f"gpu_check: {param_counts(s)['total'] / 1e9:.2f}B params, {tokens} tokens/step "
          f"({s.image_tokens} image tokens/sample), {flops['total'] / 1e12:.1f} TFLOP/step; "
          f"checkpoint built in {build_s:.0f}s", flush=True)
    rows = []
    for side in args.sides:
        result = work / f"result_{side}.json"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--only", side, "--result",
               str(result), *(argv if argv is not None else sys.argv[1:])]
        t = time.time()
        rc = subprocess.run(cmd).returncode
        if result.exists():
            r = json.loads(result.read_text())
        else:
            r = {"label": side, "error": f"exit code {rc}, no result written"}
        r["wall_s"] = time.time() - t
        if "error" not in r:
            step_s = sorted(r["times"])[len(r["times"]) // 2]  # median
            r.update(step_s=step_s, tokens_per_s=tokens / step_s,
                     tflops=flops["total"] / step_s / 1e12,
                     peak_mem_gib=r["peak_mem_bytes"] / 2**30)
            r["mfu"] = r["tflops"] / peak if peak else None
        rows.append(r)
    out = {"device": device, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "peak_tflops": peak, "peak_source": peak_src, "shape": asdict(s),
           "params": param_counts(s), "flops_per_step": flops, "tokens_per_step": tokens,
           "build_s": build_s, "total_s": time.time() - t0, "sides": rows}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"gpu_check: full results in {Path(args.out).resolve()} "
          f"({time.time() - t0:.0f}s total)\n")
    print(format_table(rows, peak, peak_src, device))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
