"""Media: video frames (PyAV) through the Qwen2.5-VL template, audio decoding, DALI gating,
EXIF orientation, and the header-only probe agreeing with full decoding."""
import functools
import io
import types

import av
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoProcessor

from mvlm.data import media
from mvlm.data.errors import BadSampleError
from mvlm.data.media import (
    MediaConfig,
    load_audio,
    load_image,
    load_video,
    probe_image,
    sample_frame_indices,
)
from mvlm.data.template import get_template
from mvlm.testing.tiny_models import build_tiny_checkpoint


def _video(path, n=16, fps=8, w=64, h=48):
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            arr = np.full((h, w, 3), (i * 15) % 255, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_checkpoint("qwen2_5_vl", tmp_path_factory.mktemp("m") / "ckpt")


def test_video_sample_matches_hf(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("FPS", "4")
    monkeypatch.setenv("FPS_MAX_FRAMES", "6")
    _video(tmp_path / "v.mp4")
    row = {"messages": [{"role": "user", "content": "<video>What happens?"},
                        {"role": "assistant", "content": "It gets brighter."}],
           "videos": ["v.mp4"]}
    tpl = get_template(ckpt)
    got = tpl.encode(row, base_dir=str(tmp_path))
    clip = load_video("v.mp4", MediaConfig.from_env(), str(tmp_path))
    assert clip.frames.shape[0] == 6 and abs(clip.sample_fps - 3.0) < 1e-6  # 6 of 16 @ 8 fps
    proc = AutoProcessor.from_pretrained(ckpt)
    ref_v = proc.video_processor(videos=[torch.from_numpy(clip.frames)], do_sample_frames=False,
                                 return_tensors="pt")
    assert torch.equal(got["video_grid_thw"], ref_v["video_grid_thw"])
    assert torch.equal(got["pixel_values_videos"], ref_v["pixel_values_videos"])
    assert torch.allclose(got["second_per_grid_ts"], torch.tensor([2 / 3.0]))
    text = proc.apply_chat_template([{"role": "user", "content": [
        {"type": "video"}, {"type": "text", "text": "What happens?"}]},
        {"role": "assistant", "content": "It gets brighter."}], tokenize=False)
    ref = proc(text=[text], videos=[torch.from_numpy(clip.frames)], do_sample_frames=False,
               return_tensors="pt")
    assert torch.equal(got["input_ids"], ref["input_ids"][0])
    cls = transformers.Qwen2_5_VLModel
    stub = types.SimpleNamespace(config=transformers.AutoConfig.from_pretrained(ckpt),
                                 get_vision_position_ids=functools.partial(
                                     cls.get_vision_position_ids, None))
    pos, _ = cls.get_rope_index(stub, ref["input_ids"], ref["mm_token_type_ids"], None,
                                ref["video_grid_thw"],
                                second_per_grid_ts=got["second_per_grid_ts"])
    assert torch.equal(got["position_ids"], pos[:, 0])


def test_frame_sampling_rules():
    idx = sample_frame_indices(100, 25.0, fps=2.0, min_frames=4, max_frames=768)
    assert len(idx) == 8 and idx[0] == 0 and idx[-1] == 99
    assert len(sample_frame_indices(10, 30.0, 2.0, 4, 768)) == 4  # min frames
    assert len(sample_frame_indices(10_000, 30.0, 2.0, 4, 16)) == 16  # FPS_MAX_FRAMES


def test_audio_resampled_mono(tmp_path):
    sr, n = 8000, 8000
    with av.open(str(tmp_path / "a.wav"), "w") as c:
        s = c.add_stream("pcm_s16le", rate=sr, layout="stereo")
        t = np.arange(n) / sr
        wave = (np.sin(2 * np.pi * 440 * t) * 10000).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.stack([wave, wave]).reshape(1, -1),
                                           format="s16", layout="stereo")
        frame.sample_rate = sr
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    a = load_audio(str(tmp_path / "a.wav"), sampling_rate=16000)
    assert a.dtype == np.float32 and a.ndim == 1 and abs(len(a) - 16000) < 200
    with pytest.raises(BadSampleError, match="missing_media"):
        load_audio(str(tmp_path / "none.wav"))


def test_exif_orientation_and_probe(tmp_path):
    img = Image.fromarray(np.zeros((30, 80, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 80x30 shows as 30x80
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    data = buf.getvalue()
    assert load_image(data).size == (30, 80)
    info = probe_image(data)
    assert (info.height, info.width) == (80, 30) and info.data == data
    rgba = Image.new("RGBA", (5, 5), (0, 0, 0, 0))
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)


def test_dali_backend_gated(ckpt, monkeypatch):
    if media.dali_available():
        pytest.skip("DALI installed: covered by test_dali_matches_pil")
    with pytest.raises(ImportError, match=r"mvlm\[gpu\]"):
        get_template(ckpt, media=MediaConfig.from_env(image_backend="dali"))


@pytest.mark.skipif(not media.dali_available(), reason="nvidia.dali not importable")
def test_dali_matches_pil(ckpt, tmp_path):
    """DALI decode+resize vs the PIL path: normalised pixels within mean |d| 0.005, max 0.1.

    Measured on the CPU pipeline (DALI 2.4): mean 0.0003, max 0.015.
    """
    rng = np.random.default_rng(0)
    arr = (rng.random((90, 140, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    row = {"messages": [{"role": "user", "content": "<image>hi"},
                        {"role": "assistant", "content": "ok"}], "images": ["x.png"]}
    pil = get_template(ckpt).encode(row, str(tmp_path))
    tpl = get_template(ckpt, media=MediaConfig.from_env(image_backend="dali"))
    dali = tpl.load_pixels(tpl.encode(row, str(tmp_path), with_pixels=False))
    assert torch.equal(pil["image_grid_thw"], dali["image_grid_thw"])
    d = (pil["pixel_values"] - dali["pixel_values"]).abs()
    print(f"DALI vs PIL: mean |d| {d.mean():.4f}, max |d| {d.max():.4f}")
    assert d.mean() < 0.005 and d.max() < 0.1, (d.mean(), d.max())


def test_image_reference_forms(tmp_path, monkeypatch):
    import base64

    img = Image.fromarray(np.full((20, 30, 3), 7, np.uint8))
    (tmp_path / "root").mkdir()
    img.save(tmp_path / "root" / "r.png")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    raw = buf.getvalue()
    b64 = base64.b64encode(raw).decode()
    monkeypatch.setenv("ROOT_IMAGE_DIR", str(tmp_path / "root"))
    for ref in ("r.png", f"file://{tmp_path / 'root' / 'r.png'}", f"data:image/png;base64,{b64}",
                b64 * 1, raw, {"bytes": raw, "path": None}, {"path": str(tmp_path / "root/r.png")},
                img):
        assert load_image(ref, base_dir=str(tmp_path)).size == (30, 20), ref if isinstance(
            ref, str) and len(ref) < 200 else type(ref)
        info = probe_image(ref, base_dir=str(tmp_path))
        assert (info.height, info.width) == (20, 30)
    with pytest.raises(BadSampleError, match="remote media"):
        load_image("https://example.com/x.png")
