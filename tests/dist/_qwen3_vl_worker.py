"""torchrun worker (2 ranks) for test_qwen3_vl_layouts.py: the tiny Qwen3-VL against transformers
under TP2 + sequence parallel and under CP2, the tiny Qwen3-VL-MoE under EP2, on text, images and
video; then the Qwen3-VL-MoE SFT runs of the spec (TP2 + SP, PP2, EP2, LoRA) in the same
process group (``import megatron`` is paid once).

For each layout: ``verify_against_hf`` (text, one image, two images of different sizes) and two
more batches built with the checkpoint's processor -- a video (timestamped frames) and an
image + video row (DeepStack's joint image/video order) -- compared with the HF model's logits
and loss; then the last DeepStack merger is perturbed and the video check must see it (the
comparison is live).

argv: HF_DIR MOE_HF_DIR TRAIN_SPEC_JSON OUT_JSON (spec as ``_train_worker.py``'s)
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from _worker_common import drop_groups, run_trainings, worker_process_group


def _media_batches(hf: str, cfg, seq_pad: int) -> list[tuple[str, dict]]:
    from PIL import Image
    from transformers import AutoProcessor
    from transformers.video_utils import VideoMetadata

    from mvlm.models.positions import batch_position_ids
    from mvlm.models.registry import get_family

    proc = AutoProcessor.from_pretrained(hf)
    rng = np.random.default_rng(7)
    frames = rng.integers(0, 255, (4, 64, 96, 3), dtype=np.uint8)
    meta = VideoMetadata(total_num_frames=4, fps=2.0, frames_indices=list(range(4)))
    image = Image.fromarray(rng.integers(0, 255, (80, 48, 3), dtype=np.uint8))
    out = []
    for name, parts, images in (("video", [{"type": "video"}], None),
                                ("image+video", [{"type": "image"}, {"type": "video"}],
                                 [image])):
        msgs = [{"role": "user", "content": [*parts, {"type": "text", "text": "What is it?"}]}]
        text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        enc = proc(text=[text + "A ball."], images=images, videos=[frames],
                   video_metadata=[meta], do_sample_frames=False, return_tensors="pt")
        ids = enc["input_ids"]
        pad = (-ids.shape[1]) % seq_pad
        if pad:
            ids = torch.cat([ids, ids[:, -1:].expand(1, pad)], dim=1)
        b = {"input_ids": ids}
        b.update({k: enc[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos",
                                      "video_grid_thw") if k in enc})
        family = get_family(cfg.model_type)
        b["position_ids"] = batch_position_ids(cfg, ids, {k: b[k] for k in family.batch_keys
                                                          if k in b})
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        labels[:, : ids.shape[1] // 3] = -100
        labels[(ids == cfg.image_token_id) | (ids == cfg.video_token_id)] = -100
        b["labels"] = labels
        out.append((name, b))
    return out


def _compare(bundle, hf_model, b: dict) -> list[float]:
    """[max |dlogits| over ranks, mean loss mcore, mean loss hf] for one batch."""
    from megatron.core import parallel_state

    from mvlm.convert.verify import _hf_forward, mcore_forward
    from mvlm.runtime.cp import split_for_cp

    cp = parallel_state.get_context_parallel_world_size()
    cp_rank = parallel_state.get_context_parallel_rank()
    logits = mcore_forward(bundle, b)
    tok_loss = mcore_forward(bundle, b, with_loss=True)
    with torch.no_grad():
        ref, ref_loss = _hf_forward(hf_model, b)
    diff = (logits.float() - split_for_cp(ref, 1, cp, cp_rank)).abs().max().double()
    lab = split_for_cp(b["labels"], 1, cp, cp_rank)
    sums = torch.stack([tok_loss.double().sum(), (lab >= 0).double().sum()])
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if parallel_state.get_tensor_model_parallel_rank() != 0:
        sums.zero_()
    dist.all_reduce(sums)
    return [float(diff), float(sums[0] / sums[1]), ref_loss]


def check(hf: str, layout_kw: dict, sequence_parallel: bool) -> dict:
    import transformers
    from transformers import AutoConfig

    from mvlm.convert.bridge import load_hf_weights
    from mvlm.convert.verify import verify_against_hf
    from mvlm.models.registry import get_family
    from mvlm.models.vlm import build_model
    from mvlm.runtime.parallel import ParallelLayout
    from mvlm.runtime.startup import startup

    layout = ParallelLayout(**layout_kw)
    startup(layout, seed=1234, device="cpu")
    cfg = AutoConfig.from_pretrained(hf)
    bundle = build_model(cfg, layout, dtype=torch.float32, device="cpu", backend="local",
                         sequence_parallel=sequence_parallel, perform_initialization=False)
    load_hf_weights(bundle, hf)
    out = {"checks": {r.name: [r.max_abs_logits, r.loss_mcore, r.loss_hf]
                      for r in verify_against_hf(bundle, hf, tol=1e-4)}}
    hf_cls = getattr(transformers, get_family(cfg.model_type).hf_model_class)
    hf_model = hf_cls.from_pretrained(hf, dtype=torch.float32).eval()
    cp, tp = layout_kw.get("cp", 1), layout_kw.get("tp", 1)
    batches = _media_batches(hf, cfg, 2 * cp * (tp if sequence_parallel else 1))
    for name, b in batches:
        out["checks"][name] = _compare(bundle, hf_model, b)
    # live: a 1% change of the last DeepStack merger must move the video logits
    w = dict(bundle.models[0].named_parameters())
    key = next(k for k in w if "deepstack_merger_list.1." in k and k.endswith("fc2.weight"))
    with torch.no_grad():
        w[key].mul_(1.01)
    out["perturbed_video_dlogits"] = _compare(bundle, hf_model, batches[0][1])[0]
    drop_groups()
    return out


def main() -> None:
    hf, moe, spec, out_json = sys.argv[1:5]
    with worker_process_group() as rank:
        res = {"tp2_sp": check(hf, {"tp": 2}, True), "cp2": check(hf, {"cp": 2}, False),
               "moe_ep2": check(moe, {"ep": 2}, False)}
        run_trainings(json.loads(Path(spec).read_text())["runs"])
        if rank == 0:
            Path(out_json).write_text(json.dumps(res))
    print("WORKER OK", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
