"""Qwen2.5-Omni thinker: the template equals ``Qwen2_5OmniProcessor`` (apply_chat_template +
processor call on the same waveforms) on audio rows -- input_ids, input_features,
feature_attention_mask, pixel values and grids exactly equal -- and its positions equal
transformers' ``get_rope_index``; the tower equals ``get_audio_features`` / ``get_image_features``
bit for bit; truncation drops a whole audio block; a checkpoint whose weights lack the audio
encoder is refused naming the tensor, and the full Omni checkpoint is refused with the fix.
"""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_mvlm
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, Qwen2_5OmniThinkerForConditionalGeneration

from mvlm.data.errors import BadSampleError
from mvlm.data.template import TemplateConfig, get_template
from mvlm.models.qwen2_5_omni.tower import audio_output_lengths, pack_audio
from mvlm.models.registry import UnsupportedModelError, get_family

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dist"))
from _omni_data import write_wav  # noqa: E402

TAG = re.compile(r"(<image>|<audio>)")


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return tiny_ckpt("qwen2_5_omni")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("omni_media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (56, 84, 3), np.uint8)).save(d / "i.png")
    # 0.7 s and 1.9 s: one and several 40-frame encoder chunks; 2.6 s is cut to the 2 s window
    return {"a": write_wav(d / "a.wav", 0.7, 1), "b": write_wav(d / "b.wav", 1.9, 2),
            "long": write_wav(d / "long.wav", 2.6, 3), "img": d / "i.png"}


def _rows(m):
    return {
        "audio_only": {"messages": [{"role": "user", "content": "<audio>What is it?"},
                                    {"role": "assistant", "content": "A tone."}],
                       "audios": [m["a"]]},
        "two_audios_and_image_multi_turn_system": {
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "<audio>Same as<image>?"},
                         {"role": "assistant", "content": "Yes."},
                         {"role": "user", "content": "And<audio>"},
                         {"role": "assistant", "content": "No."}],
            "audios": [m["a"], m["b"]], "images": [m["img"]]},
        "audio_cut_to_window": {"messages": [{"role": "user", "content": "<audio>Long?"},
                                             {"role": "assistant", "content": "Yes."}],
                                "audios": [m["long"]]},
        "text_only": {"messages": [{"role": "user", "content": "Two plus two?"},
                                   {"role": "assistant", "content": "Four."}]},
    }


def _hf_messages(messages):
    out = []
    for msg in messages:
        parts = [{"type": p[1:-1]} if p in ("<image>", "<audio>") else {"type": "text", "text": p}
                 for p in TAG.split(msg["content"]) if p]
        out.append({"role": msg["role"], "content": parts})
    return out


def _waveform(path: Path) -> np.ndarray:
    import wave

    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768


@pytest.mark.parametrize("name", ["audio_only", "two_audios_and_image_multi_turn_system",
                                  "audio_cut_to_window", "text_only"])
def test_encode_equals_hf_processor(ckpt, media, name):
    row = {k: [str(x) for x in v] if k in ("audios", "images") else v
           for k, v in _rows(media)[name].items()}
    proc = AutoProcessor.from_pretrained(ckpt)
    text = proc.apply_chat_template(_hf_messages(row["messages"]), tokenize=False)
    audios = [_waveform(Path(a)) for a in row.get("audios", [])]
    images = [Image.open(p) for p in row.get("images", [])]
    ref = proc(text=[text], audio=audios or None, images=images or None, return_tensors="pt")
    tpl = get_template(ckpt)
    got = tpl.encode(row)
    assert torch.equal(got["input_ids"], ref["input_ids"][0])
    for key in ("input_features", "feature_attention_mask", "pixel_values", "image_grid_thw"):
        assert (key in got) == (key in ref), key
        if key in ref:
            assert torch.equal(got[key], ref[key].to(got[key].dtype)), key
    # labels: exactly the assistant turns, never a media token
    ids, labels = got["input_ids"], got["labels"]
    answers = [m["content"] + "<|im_end|>" for m in row["messages"] if m["role"] == "assistant"]
    assert tpl.tokenizer.decode(labels[labels != -100]) == "".join(answers)
    # positions: transformers' mRoPE of the thinker on the same processor output
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(ckpt)
    mask = ref.get("feature_attention_mask")
    pos, _ = model.model.get_rope_index(ref["input_ids"], ref.get("image_grid_thw"), None,
                                        torch.ones_like(ref["input_ids"]), False,
                                        None if mask is None else mask.sum(-1), None)
    assert torch.equal(got["position_ids"], pos[:, 0])
    spec = get_family(model.config.model_type)
    side = {k: got[k] for k in spec.batch_keys if k in got}
    assert torch.equal(spec.position_ids(model.config, ids[None], side)[:, 0], pos[:, 0])
    if name == "two_audios_and_image_multi_turn_system":
        with torch.no_grad():
            tower = spec.vision.build(model.config, torch.float32, "cpu")
            sd = {k[len("model."):]: v for k, v in model.state_dict().items()
                  if k.startswith(("model.visual.", "model.audio_tower."))}
            tower.load_state_dict(sd, strict=True)
            a = tower(pack_audio(got["input_features"], got["feature_attention_mask"]), None)
            a_ref = model.model.get_audio_features(
                ref["input_features"], ref["feature_attention_mask"]).last_hidden_state
            i = tower(got["pixel_values"], got["image_grid_thw"])
            i_ref = torch.cat(model.model.get_image_features(
                ref["pixel_values"], ref["image_grid_thw"]).pooler_output)
        assert a.shape[0] == int((ids == model.config.audio_token_id).sum())
        assert torch.equal(a, a_ref) and torch.equal(i, i_ref)


def test_truncation_drops_whole_audio_blocks(ckpt, media):
    row = {"messages": [{"role": "user", "content": "<audio>and<audio>?"},
                        {"role": "assistant", "content": "Two tones, the second longer."}],
           "audios": [str(media["a"]), str(media["b"])]}
    full = get_template(ckpt).encode(row)
    tok = get_template(ckpt).audio_token_id
    first = int((full["input_ids"] == tok).nonzero()[0])
    cut = first + 3  # inside the first audio block
    tpl = get_template(ckpt, cfg=TemplateConfig(max_length=len(full["input_ids"]) - cut,
                                                truncation_strategy="left"))
    got = tpl.encode(row)
    n_second = int(full["feature_attention_mask"][1].sum())
    assert got["feature_attention_mask"].shape[0] == 1  # the cut audio went with its block
    assert int(got["feature_attention_mask"][0].sum()) == n_second
    assert torch.equal(got["input_features"][0], full["input_features"][1])
    # only the second audio's pads are left, all of them: no orphaned pad of the first
    assert int((got["input_ids"] == tok).sum()) == int(audio_output_lengths(torch.tensor(n_second)))


def test_audio_tag_without_audio_is_refused(ckpt):
    row = {"messages": [{"role": "user", "content": "What is <|AUDIO|> here?"},
                        {"role": "assistant", "content": "Nothing."}]}
    with pytest.raises(BadSampleError, match="audio placeholders"):
        get_template(ckpt).encode(row)


def test_full_omni_checkpoint_is_refused_with_the_fix(ckpt):
    from transformers import AutoConfig, Qwen2_5OmniConfig

    thinker = AutoConfig.from_pretrained(ckpt)
    full = Qwen2_5OmniConfig(thinker_config=thinker.to_dict())
    with pytest.raises(UnsupportedModelError, match=r"\.thinker\.save_pretrained"):
        get_family(full.model_type).text_arch(full)


def test_weights_without_audio_encoder_are_refused_by_name(ckpt, tmp_path):
    bad = tmp_path / "no_audio"
    shutil.copytree(ckpt, bad)
    sd = load_file(bad / "model.safetensors")
    save_file({k: v for k, v in sd.items() if not k.startswith("audio_tower.")},
              bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "mc"
    p = run_mvlm(["convert", "--to", "mcore", "--model", str(bad), "--output", str(out)],
                 check=False)
    log = p.stderr + p.stdout
    assert p.returncode != 0
    assert "missing" in log and re.search(r"audio_tower\.\S+", log), log[-3000:]
    assert not out.exists()


def test_video_image_audio_positions_equal_transformers(ckpt, media, tmp_path):
    """A row with an image, a video (time spaced by position_id_per_seconds x seconds per grid)
    and an audio: the template's positions equal transformers' ``get_rope_index`` on the same
    ids, grids, seconds per grid and audio lengths."""
    import av

    with av.open(str(tmp_path / "v.mp4"), "w") as c:
        st = c.add_stream("mpeg4", rate=4)
        st.width, st.height, st.pix_fmt = 64, 48, "yuv420p"
        for i in range(8):
            frame = np.full((48, 64, 3), i * 30, np.uint8)
            for pkt in st.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)
    row = {"messages": [{"role": "user", "content": "<image>then<video>and<audio>?"},
                        {"role": "assistant", "content": "All three."}],
           "images": [str(media["img"])], "videos": [str(tmp_path / "v.mp4")],
           "audios": [str(media["b"])]}
    got = get_template(ckpt).encode(row)
    assert got["video_grid_thw"][0, 0] > 1 and "second_per_grid_ts" in got
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(ckpt)
    ids = got["input_ids"][None]
    pos, _ = model.model.get_rope_index(ids, got["image_grid_thw"], got["video_grid_thw"],
                                        torch.ones_like(ids), False,
                                        got["feature_attention_mask"].sum(-1),
                                        got["second_per_grid_ts"])
    assert torch.equal(got["position_ids"], pos[:, 0])
    # the video's time span pushes the text after it past its height/width (Omni, not VL)
    assert int(pos.max()) + 1 > ids.shape[1]
    spec = get_family(model.config.model_type)
    side = {k: got[k] for k in spec.batch_keys if k in got}
    assert torch.equal(spec.position_ids(model.config, ids, side)[:, 0], pos[:, 0])


def test_sampling_rate_other_than_the_feature_extractors_is_refused(ckpt):
    from mvlm.data.media import MediaConfig

    with pytest.raises(ValueError, match="SAMPLING_RATE=8000 .* takes 16000 Hz"):
        get_template(ckpt, media=MediaConfig(sampling_rate=8000))
