"""Numerical checks of a converted model against the HF original: logits and loss.

Runs the Megatron model through Megatron-Core's own schedule (so PP stages pass activations as in
training) and the HF model on the last pipeline stage, on text-only and image+text inputs.
Under CP each rank compares its own load-balanced chunk of the sequence; under TP the logits are
gathered. The worst difference over all ranks decides, and the result is raised, not printed.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from mvlm.models.positions import batch_position_ids
from mvlm.models.registry import get_family
from mvlm.models.vlm import ModelBundle
from mvlm.runtime.cp import split_for_cp

log = logging.getLogger(__name__)


class VerificationError(RuntimeError):
    pass


@dataclass
class CheckResult:
    name: str
    max_abs_logits: float
    loss_mcore: float
    loss_hf: float


def _to_device(batch: dict, device: str) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


@contextlib.contextmanager
def hf_attention_kernel(bundle: ModelBundle) -> Iterator[None]:
    """Core-attention modules left on ``--attn_impl auto`` run SDPA, the kernel transformers'
    models run, while the check runs: the comparison then measures the conversion and the model
    code, not two attention kernels' rounding (on CPU ``auto`` may take
    :mod:`mvlm.runtime.causal_blocks`, whose fp32 results differ from SDPA's by rounding:
    ``tests/unit/test_causal_blocks.py``)."""
    from mvlm.models.attention import SDPACoreAttention

    mods = [m for model in bundle.models for m in model.modules()
            if isinstance(m, SDPACoreAttention) and m.impl == "auto"]
    for m in mods:
        m.impl = "sdpa"
    try:
        yield
    finally:
        for m in mods:
            m.impl = "auto"


@torch.no_grad()
def mcore_forward(bundle: ModelBundle, batch: dict, with_loss: bool = False
                  ) -> torch.Tensor | None:
    """Logits [b, s_local_cp, vocab] (TP-gathered) or per-token loss on the last stage, with
    the attention kernel transformers runs (:func:`hf_attention_kernel`): this forward is the
    one compared with the HF model."""
    for m in bundle.models:
        m.eval()
    seq = batch["input_ids"].shape[1]
    fb = get_forward_backward_func()

    def step(data_iter, model):
        b = next(data_iter)
        media = {k: b[k] for k in bundle.family.batch_keys if k in b}
        out = model(b["input_ids"], b["position_ids"],
                    labels=b.get("labels") if with_loss else None,
                    gather_logits=not with_loss, **media)
        return out, None

    with hf_attention_kernel(bundle):
        store = fb(forward_step_func=step, data_iterator=iter([batch]), model=bundle.models,
                   num_microbatches=1, seq_length=seq,
                   micro_batch_size=batch["input_ids"].shape[0], forward_only=True)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return store[0]
    return None


def make_inputs(bundle: ModelBundle, hf_dir: Path, seq_pad: int) -> list[tuple[str, dict]]:
    """Deterministic test inputs: text-only, and for a family that takes images one image and
    two images of different sizes (rendered and processed by the checkpoint's own processor)."""
    cfg = bundle.hf_config
    family = bundle.family
    rng = np.random.default_rng(1234)
    out = []
    vocab = bundle.arch.vocab_size
    n = 24 if seq_pad <= 1 else ((24 + seq_pad - 1) // seq_pad) * seq_pad
    ids = torch.as_tensor(rng.integers(0, min(vocab, 500), (2, n)), dtype=torch.long)
    out.append(("text", {"input_ids": ids}))
    image = next((k for k in family.media if k.name == "image"), None)
    if image is not None:
        from PIL import Image
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(hf_dir)

        def img(h, w):
            return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))

        audio = next((k for k in family.media if k.name == "audio"), None)
        cases = [("image+text", [img(56, 84)], []), ("two-images", [img(56, 56), img(112, 84)], [])]
        if audio is not None:  # 0.7 s and 1.3 s of noise at the feature extractor's rate
            sr = proc.feature_extractor.sampling_rate
            cases += [("audio+text", [], [rng.standard_normal(int(0.7 * sr)) * 0.1]),
                      ("audio+image", [img(56, 84)], [rng.standard_normal(int(1.3 * sr)) * 0.1])]
        for name, images, audios in cases:
            content = [{"type": "image"} for _ in images] + [{"type": "audio"} for _ in audios] + [
                {"type": "text", "text": "Describe the picture in a few words."}]
            text = proc.apply_chat_template([{"role": "user", "content": content}],
                                            tokenize=False, add_generation_prompt=True)
            text += "A small red square."
            kwargs = {"audio": [a.astype(np.float32) for a in audios]} if audios else {}
            enc = proc(text=[text], images=images or None, return_tensors="pt", **kwargs)
            if family.vision.from_processor is not None:
                enc = {**enc, **family.vision.from_processor(cfg, enc)}
            L = enc["input_ids"].shape[1]
            pad = (-L) % seq_pad if seq_pad > 1 else 0
            batch = {k: enc[k] for k in ("input_ids", *family.batch_keys) if k in enc}
            if pad:
                # Extra text at the end keeps HF and mcore on identical (unpadded) inputs.
                extra = torch.full((1, pad), int(enc["input_ids"][0, -1]), dtype=torch.long)
                batch["input_ids"] = torch.cat([enc["input_ids"], extra], dim=1)
            out.append((name, batch))
    for _, b in out:
        media = {k: b[k] for k in family.batch_keys if k in b}
        b["position_ids"] = batch_position_ids(cfg, b["input_ids"], media)
        labels = torch.full_like(b["input_ids"], -100)
        labels[:, :-1] = b["input_ids"][:, 1:]
        labels[:, : b["input_ids"].shape[1] // 3] = -100  # a masked prompt, like SFT
        for tok in family.token_ids(cfg).values():  # no loss on media placeholders
            labels[b["input_ids"] == tok] = -100
        b["labels"] = labels
    return out


def _hf_forward(hf_model, b: dict) -> tuple[torch.Tensor, float]:
    """HF logits and mean loss on a check batch; the family says which inputs its forward takes."""
    kwargs = get_family(hf_model.config.model_type).hf_forward_inputs(hf_model.config, b)
    logits = hf_model(**kwargs).logits.float()
    lab = b["labels"]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             lab.reshape(-1), ignore_index=-100)
    return logits, float(loss)


def verify_against_hf(bundle: ModelBundle, hf_dir: str | Path, tol: float = 1e-4,
                      device: str = "cpu") -> list[CheckResult]:
    """Compare logits and loss with the HF model on every check input (the same attention
    kernel on both sides: :func:`mcore_forward`); raise on mismatch."""
    import transformers

    hf_dir = Path(hf_dir)
    cp = parallel_state.get_context_parallel_world_size()
    cp_rank = parallel_state.get_context_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    sp = bundle.config.sequence_parallel
    seq_pad = 2 * cp * (tp if sp else 1) if (cp > 1 or sp) else 1
    inputs = make_inputs(bundle, hf_dir, seq_pad)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    hf_model = None
    if last:
        cls = getattr(transformers, bundle.family.hf_model_class)
        hf_model = cls.from_pretrained(hf_dir, dtype=bundle.config.params_dtype).eval()
        hf_model.to(device)
    results = []
    for name, b in inputs:
        b = _to_device(b, device)
        logits = mcore_forward(bundle, b)
        tok_loss = mcore_forward(bundle, b, with_loss=True)
        diff = torch.zeros((), dtype=torch.float64)
        sums = torch.zeros(2, dtype=torch.float64)
        ref_loss = 0.0
        if last:
            with torch.no_grad():
                ref, ref_loss = _hf_forward(hf_model, b)
            ref_local = split_for_cp(ref, 1, cp, cp_rank)
            diff = (logits.float() - ref_local).abs().max().double().cpu()
            lab_local = split_for_cp(b["labels"], 1, cp, cp_rank)
            sums = torch.stack([tok_loss.double().sum(), (lab_local >= 0).double().sum()]).cpu()
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        # Loss: sum over CP chunks of the last stage (other ranks contribute zeros); the DP/TP
        # replicas hold copies, so count one replica per CP rank.
        if not (last and parallel_state.get_tensor_model_parallel_rank() == 0
                and parallel_state.get_data_parallel_rank() == 0):
            sums.zero_()
        dist.all_reduce(sums)
        t = torch.tensor([ref_loss if (last and parallel_state.get_tensor_model_parallel_rank()
                                       == 0 and parallel_state.get_data_parallel_rank() == 0
                                       and cp_rank == 0) else 0.0], dtype=torch.float64)
        dist.all_reduce(t)
        mloss = float(sums[0] / sums[1])
        results.append(CheckResult(name, float(diff), mloss, float(t)))
    bad = [r for r in results if r.max_abs_logits > tol or abs(r.loss_mcore - r.loss_hf) > tol]
    for r in results:
        log.info("verify %-10s max|dlogits|=%.3e loss mcore=%.6f hf=%.6f", r.name,
                 r.max_abs_logits, r.loss_mcore, r.loss_hf)
    if bad:
        raise VerificationError(
            "Megatron model does not match the HF model: " + "; ".join(
                f"{r.name}: max|dlogits|={r.max_abs_logits:.3e}, loss {r.loss_mcore:.6f} vs "
                f"{r.loss_hf:.6f}" for r in bad) + f" (tolerance {tol:g})")
    return results
