"""Qwen2.5-Omni thinker with ``USE_AUDIO_IN_VIDEO=true`` (ms-swift's switch; HF's processor
``use_audio_in_video`` / ``load_audio_from_video``): a video's audio track, given in the row's
``audios`` in tag order, is interleaved with its frames by time chunk.

* The template equals ``Qwen2_5OmniProcessor`` (apply_chat_template + processor call with
  ``use_audio_in_video=True`` and ``audio_from_video_indices``) on a video-with-audio row and on
  a row with a standalone audio, a video with its track and an image: input ids exactly
  (several video chunks around the audio chunk), ``input_features`` / ``feature_attention_mask``
  / video pixels / grids exactly, labels exactly the assistant turn.
* Positions (template and the model side's ``position_ids``) equal transformers'
  ``get_rope_index(use_audio_in_video=True)``.
* Logits and loss of the Megatron model equal the thinker's with ``use_audio_in_video=True``
  (fp32, one rank, in a subprocess for Megatron's global state): bound 1e-5 / 1e-6 relative;
  measured max |dlogits| 0.0 and |dloss| <= 9.5e-7 on losses of 6.8-7.0 (2026-12-02).
* A row whose ``audios`` lack the video's track is refused naming the switch.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "dist"))
from _omni_data import write_wav  # noqa: E402

TAG = re.compile(r"(<image>|<audio>|<video>)")


def _frames(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 255, (56, 84, 3), np.uint8)) for _ in range(n)]


def rows(d: Path) -> dict[str, dict]:
    """Rows with videos given as frame lists (8 frames: 4 temporal grid steps of 1 s, two
    50-position chunks) and wav tracks."""
    d.mkdir(parents=True, exist_ok=True)
    a, b = write_wav(d / "a.wav", 0.7, 1), write_wav(d / "b.wav", 1.9, 2)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 84, 3), np.uint8)).save(
        d / "i.png")
    return {
        "video_with_audio": {"messages": [{"role": "user", "content": "<video>What is heard?"},
                                          {"role": "assistant", "content": "A tone."}],
                             "videos": [_frames(8)], "audios": [str(b)]},
        "audio_video_image": {"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<audio>then<video>and<image>?"},
            {"role": "assistant", "content": "All three."}],
            "videos": [_frames(8)], "audios": [str(a), str(b)], "images": [str(d / "i.png")]},
    }


def _hf_messages(messages):
    return [{"role": m["role"], "content": [
        {"type": p[1:-1]} if p in ("<image>", "<audio>", "<video>") else
        {"type": "text", "text": p} for p in TAG.split(m["content"]) if p]}
        for m in messages]


def _waveform(path: str) -> np.ndarray:
    import wave

    with wave.open(path) as w:
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return tiny_ckpt("qwen2_5_omni")


@pytest.fixture
def audio_in_video(monkeypatch):
    monkeypatch.setenv("USE_AUDIO_IN_VIDEO", "true")


@pytest.mark.parametrize("name", ["video_with_audio", "audio_video_image"])
def test_encode_equals_hf_processor(ckpt, tmp_path, audio_in_video, name):
    from transformers import AutoProcessor, Qwen2_5OmniThinkerForConditionalGeneration

    from mvlm.data.template import get_template
    from mvlm.models.registry import get_family

    row = rows(tmp_path)[name]
    proc = AutoProcessor.from_pretrained(ckpt)
    text = proc.apply_chat_template(_hf_messages(row["messages"]), tokenize=False)
    # the audio slots in tag order: standalone (None) or the track of video i
    tags = [t for m in row["messages"] for t in TAG.findall(m["content"]) if t != "<image>"]
    slots = [None if t == "<audio>" else tags[:k].count("<video>") for k, t in enumerate(tags)]
    ref = proc(text=[text], videos=row["videos"], images=[Image.open(p) for p in
                                                           row.get("images", [])] or None,
               audio=[_waveform(a) for a in row["audios"]], audio_from_video_indices=slots,
               use_audio_in_video=True, return_tensors="pt",
               # the frames' own size (mvlm's video budget keeps it; HF's default minimum
               # would upsample), so both see the same grid
               videos_kwargs={"size": {"shortest_edge": 56 * 84, "longest_edge": 768 * 28 * 28}})
    tpl = get_template(ckpt)
    got = tpl.encode(row)
    ids = got["input_ids"]
    assert torch.equal(ids, ref["input_ids"][0])
    v, a = tpl.video_token_id, tpl.audio_token_id
    kinds = [k for k, n in __import__("itertools").groupby(ids.tolist()) if k in (v, a)]
    assert kinds[-3:] == [v, a, v], kinds  # two video chunks around the track's one
    for key in ("input_features", "feature_attention_mask", "pixel_values_videos",
                "video_grid_thw", "pixel_values", "image_grid_thw"):
        assert (key in got) == (key in ref), key
        if key in ref:
            assert torch.equal(got[key], ref[key].to(got[key].dtype)), key
    assert torch.equal(got["second_per_grid_ts"], ref["video_second_per_grid"].float())
    labels = got["labels"]
    assert tpl.tokenizer.decode(labels[labels != -100]) == \
        row["messages"][-1]["content"] + "<|im_end|>"
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(ckpt)
    pos, _ = model.model.get_rope_index(
        ref["input_ids"], ref.get("image_grid_thw"), ref["video_grid_thw"],
        torch.ones_like(ref["input_ids"]), True, ref["feature_attention_mask"].sum(-1),
        ref["video_second_per_grid"])
    assert torch.equal(got["position_ids"], pos[:, 0])
    spec = get_family(model.config.model_type)
    side = {k: got[k] for k in spec.batch_keys if k in got}
    assert torch.equal(spec.position_ids(model.config, ids[None], side)[:, 0], pos[:, 0])


def test_missing_track_is_refused(ckpt, tmp_path, audio_in_video):
    from mvlm.data.errors import BadSampleError
    from mvlm.data.template import get_template

    row = dict(rows(tmp_path)["audio_video_image"])
    row["audios"] = row["audios"][:1]
    with pytest.raises(BadSampleError, match="each video needs its audio track"):
        get_template(ckpt).encode(row)
    row["audios"] = row["audios"][:0]  # neither count: refused while parsing, both counts named
    with pytest.raises(BadSampleError, match=r"1 <audio> tag\(s\).*0 audios.*or 2 where"):
        get_template(ckpt).encode(row)


def test_switch_is_ignored_by_families_without_sound_in_video(tmp_path, audio_in_video,
                                                              monkeypatch):
    """ms-swift's switch is global; a video row for a family without audio (no ``audios``) still
    parses under it, and a value that is neither true nor false is refused by name."""
    from mvlm.data.formats import parse_row

    row = {"messages": [{"role": "user", "content": "<video>what moves?"},
                        {"role": "assistant", "content": "a square"}],
           "videos": [str(tmp_path / "v.mp4")]}
    assert parse_row(row).videos == row["videos"]
    assert parse_row(row).audios == []
    monkeypatch.setenv("USE_AUDIO_IN_VIDEO", "yes please")
    with pytest.raises(ValueError, match="USE_AUDIO_IN_VIDEO='yes please': use true or false"):
        parse_row(row)


_MODEL_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    from pathlib import Path
    os.environ["USE_AUDIO_IN_VIDEO"] = "true"
    from mvlm.convert.bridge import load_hf_weights
    from mvlm.convert.verify import _hf_forward, mcore_forward
    from mvlm.data.template import get_template
    from mvlm.models.vlm import build_model
    from mvlm.runtime.parallel import ParallelLayout
    from mvlm.runtime.startup import startup
    import transformers
    sys.path.insert(0, sys.argv[3])
    from test_qwen2_5_omni_audio_in_video import rows

    ckpt = sys.argv[1]
    startup(ParallelLayout(), seed=0, device="cpu")
    hf = transformers.Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(ckpt).eval()
    bundle = build_model(hf.config, ParallelLayout(), dtype=torch.float32, device="cpu")
    load_hf_weights(bundle, ckpt)
    tpl = get_template(ckpt)
    res = {}
    for name, row in rows(Path(sys.argv[2])).items():
        enc = tpl.encode(row)
        b = {k: (v[None] if k in ("input_ids", "labels") else v) for k, v in enc.items()
             if isinstance(v, torch.Tensor)}
        b["position_ids"] = enc["position_ids"][:, None]
        lab = torch.full_like(b["input_ids"], -100)
        lab[:, :-1] = b["labels"][:, 1:]
        b["labels"] = lab
        with torch.no_grad():
            logits = mcore_forward(bundle, b)
            tok = mcore_forward(bundle, b, with_loss=True)
            ref, ref_loss = _hf_forward(hf, b)
        loss = float(tok.sum() / (lab >= 0).sum())
        res[name] = [float((logits.float() - ref).abs().max()), abs(loss - ref_loss), ref_loss]
    print("RESULT " + json.dumps(res))
""")


def test_logits_equal_transformers(ckpt, tmp_path):
    script = tmp_path / "omni_aiv.py"
    script.write_text(_MODEL_SCRIPT)
    here = str(Path(__file__).parent)
    p = subprocess.run([sys.executable, str(script), str(ckpt), str(tmp_path / "m"), here],
                       capture_output=True, text=True, timeout=900)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-3000:]
    res = json.loads(line[0][7:])
    assert set(res) == {"video_with_audio", "audio_video_image"}
    for name, (dlogits, dloss, loss) in res.items():
        print(f"{name}: max|dlogits| {dlogits:.2e} |dloss| {dloss:.2e} (loss {loss:.4f})")
        assert dlogits <= 1e-5 and dloss <= 1e-6 * max(1.0, loss), (name, dlogits, dloss)
