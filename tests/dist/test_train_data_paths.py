"""Data paths through the real trainer: `mvlm pt`, video SFT, bad rows skipped mid-training.

One single-rank launch of ``_train_worker.py`` (fp32 CPU, 3 steps each; the global batch is the
whole dataset, so step 1 sees every row once whatever the shuffle):

1. ``mvlm pt`` on tiny Qwen2 with ``{"text": ...}`` rows: the pretraining objective puts the loss
   on every token of ``text + eos`` (no chat template). Hand computation: the HF tokenizer on
   ``text + eos``, the HF model's next-token cross entropy summed over all rows / all targets;
2. ``mvlm sft`` on tiny Qwen2.5-VL with two ``<video>`` rows (PyAV-written mp4s): frames through
   the vision tower, 3D positions, loss on the answer. Hand computation: the HF model on the
   encoded sample (mvlm's template; its ids, pixels and positions equal the HF processor's, see
   tests/unit/test_data_media.py), cross entropy over the answer tokens;
3. ``mvlm sft --on_bad_sample skip`` on tiny Qwen2 with four good rows among bad lines (broken
   JSON, invalid UTF-8, a row without an assistant turn, a row of unknown format), and the same
   four rows clean: the run trains, its last log record counts the skipped rows by reason, and
   its losses and grad norms equal the clean run's exactly (the bad rows take no part).

Bars: step-1 loss within 2e-7 relative of the hand computation (fp32; measured below), the
logged number of loss tokens equal to the hand count, and the loss falling over the 3 steps.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_parity import _launch, _train_lines

pytestmark = pytest.mark.dist

LOSS_TOL = 2e-7  # relative; measured 2026-12-02: pt 2.6e-8, video 1.8e-8

PT_TEXTS = ["The quick brown fox jumps over the lazy dog.",
            "Megatron splits layers across pipeline stages.",
            "One two three four five six seven.",
            "Tiny models train fast on a CPU."]


def _video(path: Path, n: int, fps: int, shade) -> None:
    import av

    w, h = 64, 48
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            arr = np.zeros((h, w, 3), np.uint8)
            arr[..., 0] = shade(i)
            arr[: h // 2, :, 1] = (i * 37) % 255
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _args(model: Path, data: Path, out: Path, gbs: int) -> list[str]:
    return ["--model", str(model), "--dataset", str(data), "--train_type", "full",
            "--torch_dtype", "float32", "--train_iters", "3", "--micro_batch_size", "1",
            "--global_batch_size", str(gbs), "--lr", "2e-3", "--min_lr", "1e-4",
            "--lr_warmup_iters", "0", "--max_length", "512", "--seed", "0",
            "--output_dir", str(out), "--save_final_checkpoint", "false",
            "--save_safetensors", "false", "--report_to", "none", "--disable_tqdm", "true",
            "--freeze_vit", "false", "--freeze_aligner", "false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_ckpt):
    tmp = tmp_path_factory.mktemp("pt_video")
    text_model, vl = tiny_ckpt("qwen2"), tiny_ckpt("qwen2_5_vl")
    pt_data = tmp / "pt.jsonl"
    pt_data.write_text("".join(json.dumps({"text": t}) + "\n" for t in PT_TEXTS))
    _video(tmp / "up.mp4", 16, 8, lambda i: (i * 15) % 255)
    _video(tmp / "flat.mp4", 12, 6, lambda i: 128)
    video_rows = [
        {"messages": [{"role": "user", "content": "<video>What happens?"},
                      {"role": "assistant", "content": "It gets brighter."}],
         "videos": [str(tmp / "up.mp4")]},
        {"messages": [{"role": "user", "content": "Describe <video> briefly."},
                      {"role": "assistant", "content": "A flat red clip with a stripe."}],
         "videos": [str(tmp / "flat.mp4")]},
    ]
    vid_data = tmp / "video.jsonl"
    vid_data.write_text("".join(json.dumps(r) + "\n" for r in video_rows))
    clean, dirty = tmp / "clean.jsonl", tmp / "dirty.jsonl"
    good = [json.dumps({"messages": [{"role": "user", "content": f"Say {i} twice."},
                                     {"role": "assistant", "content": f"{i} {i}"}]}).encode()
            for i in range(4)]
    clean.write_bytes(b"".join(g + b"\n" for g in good))
    dirty.write_bytes(b"\n".join([
        good[0], b'{"messages": [', good[1], b'{"text": "caf\xe9 \xff"}', good[2],
        json.dumps({"messages": [{"role": "user", "content": "no answer"}]}).encode(),
        json.dumps({"foo": 1}).encode(), good[3]]) + b"\n")
    out = {k: tmp / k for k in ("pt", "video", "clean", "dirty")}
    _launch({"runs": [
        {"name": "pt", "task": "pt", "argv": _args(text_model, pt_data, out["pt"], 4)},
        {"name": "video", "task": "sft", "argv": _args(vl, vid_data, out["video"], 2)},
        {"name": "clean", "argv": _args(text_model, clean, out["clean"], 4)},
        {"name": "dirty", "argv": _args(text_model, dirty, out["dirty"], 4) + [
            "--on_bad_sample", "skip"]},
    ]}, 1, tmp, "single")
    return {"out": out, "text_model": text_model, "vl": vl, "video_rows": video_rows}


def _sum_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Sum of next-token cross entropies (HF label convention: labels[t] is token t)."""
    lg, tg = logits[0, :-1].double(), labels[1:]
    keep = tg >= 0
    ce = torch.nn.functional.cross_entropy(lg[keep], tg[keep], reduction="sum")
    return float(ce), int(keep.sum())


def _check(name: str, lines: list[dict], hand_sum: float, hand_n: int) -> None:
    hand = hand_sum / hand_n
    got = lines[0]["loss"]
    rel = abs(got - hand) / abs(hand)
    print(f"{name}: step-1 loss {got:.8f} vs hand {hand:.8f} (rel {rel:.1e}); "
          f"loss tokens {lines[0]['loss_tokens']} vs {hand_n}; losses "
          f"{[round(r['loss'], 4) for r in lines]}")
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert lines[0]["loss_tokens"] == hand_n
    assert rel <= LOSS_TOL, (got, hand)
    assert lines[-1]["loss"] < lines[0]["loss"], lines


def test_pt_loss_is_on_all_text(runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = runs["text_model"]
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for t in PT_TEXTS:
            ids = torch.tensor([tok(t + tok.eos_token, add_special_tokens=False).input_ids])
            s, k = _sum_ce(model(ids).logits, ids[0])
            total, n = total + s, n + k
    _check("pt", _train_lines(runs["out"]["pt"]), total, n)


def test_video_sft_trains(runs):
    import transformers

    from mvlm.data.template import get_template

    d = runs["vl"]
    tpl = get_template(d)
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        d, dtype=torch.float32).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for row in runs["video_rows"]:
            enc = tpl.encode(row)
            assert enc["video_grid_thw"].shape[0] == 1 and int(enc["video_grid_thw"][0, 0]) >= 2
            ids = enc["input_ids"][None]
            assert int((ids == model.config.video_token_id).sum()) > 0
            logits = model(input_ids=ids, pixel_values_videos=enc["pixel_values_videos"],
                           video_grid_thw=enc["video_grid_thw"],
                           second_per_grid_ts=enc["second_per_grid_ts"],
                           position_ids=enc["position_ids"][:, None, :],
                           mm_token_type_ids=(ids == model.config.video_token_id).int() * 2
                           ).logits
            s, k = _sum_ce(logits, enc["labels"])
            total, n = total + s, n + k
    _check("video", _train_lines(runs["out"]["video"]), total, n)


def test_bad_rows_skipped_inside_training_and_counted(runs):
    from mvlm.train.logging import TIMING_FIELDS

    clean, dirty = (_train_lines(runs["out"][k]) for k in ("clean", "dirty"))
    last = dirty[-1]
    print(f"dirty run: skipped {last.get('bad_samples_skipped')} "
          f"{last.get('bad_samples_by_reason')}; losses {[r['loss'] for r in dirty]}")
    assert last["bad_samples_skipped"] == 4, last
    assert last["bad_samples_by_reason"] == {"bad_encoding": 1, "bad_json": 1,
                                             "no_assistant_turn": 1, "unknown_format": 1}, last
    assert clean[-1]["bad_samples_skipped"] == 0 and "bad_samples_by_reason" not in clean[-1]
    ignore = set(TIMING_FIELDS) | {"bad_samples_skipped", "bad_samples_by_reason"}

    def strip(rs):
        return [{k: v for k, v in r.items() if k not in ignore} for r in rs]

    assert strip(dirty) == strip(clean)
    assert clean[-1]["loss"] < clean[0]["loss"], clean
