"""Media loading: images, video frames and audio, plus the pixel/frame budgets users set.

Budgets come from environment variables (what ms-swift users export today) and from flags; a
flag wins over the environment. ``IMAGE_MAX_TOKEN_NUM`` / ``VIDEO_MAX_TOKEN_NUM`` are converted to
pixel caps once the family's patch geometry is known (``tokens * (patch * merge)**2``), because a
token budget is what users reason about and the pixel cap is what the image processor takes.

Image references may be: a local path (relative paths resolve against ``ROOT_IMAGE_DIR`` if set,
else the dataset file's directory), ``file://`` URLs, ``data:...;base64,`` URLs or bare base64,
raw bytes, ``{"bytes": ..., "path": ...}`` dicts (how parquet/arrow datasets store images), or
already-decoded PIL images. Every failure becomes a :class:`BadSampleError` naming the reference.

The optional DALI backend (``--image_backend dali``) decodes and resizes with NVIDIA DALI when
``nvidia.dali`` is importable; it is never imported otherwise.
"""
from __future__ import annotations

import base64
import binascii
import io
import logging
import math
import os
import re
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mvlm.data.errors import BadSampleError

logger = logging.getLogger(__name__)

# Qwen2-VL image processor defaults (patch 14, merge 2): what an unset budget means.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


def _env_float(name: str) -> float | None:
    v = os.environ.get(name)
    return float(v) if v not in (None, "") else None


@dataclass
class MediaConfig:
    """Pixel / frame / sample-rate budgets. ``None`` means "the processor's own default"."""

    max_pixels: int | None = None
    min_pixels: int | None = None
    image_max_token_num: int | None = None
    video_max_pixels: int | None = None
    video_min_pixels: int | None = None
    video_max_token_num: int | None = None
    fps: float | None = None
    fps_max_frames: int | None = None
    fps_min_frames: int | None = None
    sampling_rate: int = 16000
    # Audio budgets (ms-swift's SAMPLING_RATE / AUDIO_MAX_TOKEN_NUM). An audio family decodes at
    # its feature extractor's rate and refuses a sampling_rate that differs; audio_max_token_num
    # caps nothing (audio is cut at the extractor's window); mvlm.train.args says so when set.
    audio_max_token_num: int | None = None
    image_backend: str = "pil"
    root_image_dir: str | None = None

    ENV: ClassVar[dict] = {
           "max_pixels": ("MAX_PIXELS", _env_int), "min_pixels": ("MIN_PIXELS", _env_int),
           "image_max_token_num": ("IMAGE_MAX_TOKEN_NUM", _env_int),
           "video_max_pixels": ("VIDEO_MAX_PIXELS", _env_int),
           "video_min_pixels": ("VIDEO_MIN_PIXELS", _env_int),
           "video_max_token_num": ("VIDEO_MAX_TOKEN_NUM", _env_int),
           "fps": ("FPS", _env_float), "fps_max_frames": ("FPS_MAX_FRAMES", _env_int),
           "fps_min_frames": ("FPS_MIN_FRAMES", _env_int),
           "sampling_rate": ("SAMPLING_RATE", _env_int),
           "audio_max_token_num": ("AUDIO_MAX_TOKEN_NUM", _env_int),
           "root_image_dir": ("ROOT_IMAGE_DIR", os.environ.get)}

    @classmethod
    def from_env(cls, **flags: Any) -> MediaConfig:
        """Read the environment, then let any non-None flag override it."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in cls.ENV:
                env_name, conv = cls.ENV[f.name]
                v = conv(env_name)
                if v is not None or f.default is None:  # unset: keep the field's default
                    values[f.name] = v
            if flags.get(f.name) is not None:
                values[f.name] = flags[f.name]
        cfg = cls(**values)
        if cfg.image_backend not in ("pil", "dali"):
            raise ValueError(f"--image_backend must be pil or dali, got {cfg.image_backend!r}")
        return cfg

    def image_pixel_range(self, factor: int, default_min: int, default_max: int) -> tuple[int, int]:
        """(min_pixels, max_pixels) for images with ``factor = patch_size * merge_size``."""
        lo = self.min_pixels if self.min_pixels is not None else default_min
        hi = self.max_pixels if self.max_pixels is not None else default_max
        if self.image_max_token_num is not None:  # a token budget caps the area too
            cap = self.image_max_token_num * factor * factor
            hi = min(hi, cap) if self.max_pixels is not None else cap
        if lo > hi:
            if self.min_pixels is None:  # a small budget lowers the default floor with it
                return hi, hi
            raise ValueError(f"min_pixels {lo} > max_pixels {hi}: fix MIN_PIXELS/MAX_PIXELS")
        return lo, hi

    def video_pixel_range(self, factor: int, default_min: int, default_max: int) -> tuple[int, int]:
        lo = self.video_min_pixels if self.video_min_pixels is not None else default_min
        hi = self.video_max_pixels if self.video_max_pixels is not None else default_max
        if self.video_max_token_num is not None:
            hi = self.video_max_token_num * factor * factor
        return lo, max(lo, hi)


def smart_resize(height: int, width: int, factor: int, min_pixels: int,
                 max_pixels: int) -> tuple[int, int]:
    """Qwen-style target size: both sides multiples of ``factor``, area within [min, max].

    Used to count an image's tokens without touching pixels (length-based packing, budgets); the
    pixels themselves go through the family's HF image processor, which applies the same rule.
    """
    if min(height, width) <= 0:
        raise BadSampleError("corrupt_media", f"image has size {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise BadSampleError("bad_aspect_ratio",
                             f"aspect ratio {max(height, width) / min(height, width):.0f} > 200")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


# ----------------------------------------------------------------------------- reading bytes

_B64_RE = re.compile(r"[A-Za-z0-9+/]+={0,2}")
# Leading bytes of common image/video/audio containers: a bare base64 string must decode to one.
_MEDIA_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*",
                b"\x00\x00\x00", b"ID3", b"fLaC", b"OggS", b"\x1aE\xdf\xa3")


def _resolve_path(ref: str, base_dir: str | None, root_dir: str | None) -> str:
    ref = ref.removeprefix("file://")
    if os.path.isabs(ref):
        return ref
    for d in (root_dir or os.environ.get("ROOT_IMAGE_DIR"), base_dir):
        if d and os.path.exists(os.path.join(d, ref)):
            return os.path.join(d, ref)
    return os.path.join(root_dir or base_dir or "", ref)


def read_media_bytes(ref: Any, base_dir: str | None = None,
                     root_dir: str | None = None) -> bytes | str:
    """Return raw bytes for ``ref``, or a filesystem path when the media is a local file."""
    if isinstance(ref, dict):
        if ref.get("bytes") is not None:
            return bytes(ref["bytes"])
        if ref.get("path"):
            ref = ref["path"]
        else:
            raise BadSampleError("missing_media", f"media dict without bytes or path: {ref!r}")
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return bytes(ref)
    if not isinstance(ref, str) or not ref:
        raise BadSampleError("missing_media", f"unsupported media reference {type(ref).__name__}")
    if ref.startswith("data:"):
        try:
            return base64.b64decode(ref.split(",", 1)[1], validate=True)
        except (IndexError, binascii.Error) as e:
            raise BadSampleError("corrupt_media", f"bad base64 data URL ({e})") from e
    if ref.startswith(("http://", "https://")):
        raise BadSampleError("missing_media", f"remote media {ref!r}: download it first "
                             "(mvlm runs offline) and point the dataset at the local file")
    path = _resolve_path(ref, base_dir, root_dir)
    if os.path.isfile(path):
        return path
    if len(ref) >= 32 and _B64_RE.fullmatch(ref):  # bare base64 of a media file?
        try:
            data = base64.b64decode(ref, validate=True)
        except binascii.Error:
            data = b""
        if data.startswith(_MEDIA_MAGIC):
            return data
    raise BadSampleError("missing_media", f"file not found: {path!r} (set ROOT_IMAGE_DIR or use "
                         "paths relative to the dataset file)")


@dataclass
class ImageInfo:
    """An image's oriented size plus a storable reference (absolute path, or encoded bytes)."""

    height: int
    width: int
    path: str = ""
    data: bytes = b""

    def ref(self) -> str | bytes:
        return self.path or self.data


_EXIF_ORIENTATION = 0x0112


def _header_orientation(img: Image.Image) -> int:
    """EXIF orientation without decoding pixels.

    For PNG, ``getexif()`` decodes the whole image to find an eXIf chunk after the pixel data,
    so only an eXIf chunk seen while parsing the header counts (a trailing one is rare; should
    it rotate the image, the loader notices the grid change and reports the row).
    """
    try:
        if img.format == "PNG":
            raw = img.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
            return int(exif.get(_EXIF_ORIENTATION, 1))
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - unreadable EXIF: no rotation, like load_image
        return 1


def probe_image(ref: Any, base_dir: str | None = None, root_dir: str | None = None) -> ImageInfo:
    """Size of an image after EXIF orientation, reading only its header (no pixel decode).

    Why: the token count of an image depends only on its size, so encoding (tokens, labels,
    mRoPE positions, packing lengths) never needs pixels; they are produced later, in the loader
    workers, from the stored reference. A file whose header parses but whose body is broken is
    reported when the loader decodes it (as a BadSampleError, handled per --on_bad_sample).
    """
    if isinstance(ref, Image.Image):
        img = load_image(ref)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return ImageInfo(img.height, img.width, data=buf.getvalue())
    src = read_media_bytes(ref, base_dir, root_dir)
    try:
        with Image.open(src if isinstance(src, str) else io.BytesIO(src)) as img:
            w, h = img.size
            orientation = _header_orientation(img)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        name = src if isinstance(src, str) else f"<{len(src)} bytes>"
        raise BadSampleError("corrupt_media", f"cannot decode image {name}: {e}") from e
    if orientation in (5, 6, 7, 8):  # transposed orientations swap the sides
        w, h = h, w
    if w < 1 or h < 1:
        raise BadSampleError("corrupt_media", f"image has size {w}x{h}")
    if isinstance(src, str):
        return ImageInfo(h, w, path=os.path.abspath(src))
    return ImageInfo(h, w, data=src)


def load_image(ref: Any, base_dir: str | None = None, root_dir: str | None = None) -> Image.Image:
    """Decode an image reference to an RGB PIL image with EXIF orientation applied."""
    if isinstance(ref, Image.Image):
        img = ref
    else:
        src = read_media_bytes(ref, base_dir, root_dir)
        try:
            img = Image.open(src if isinstance(src, str) else io.BytesIO(src))
            img.load()
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            name = src if isinstance(src, str) else f"<{len(src)} bytes>"
            raise BadSampleError("corrupt_media", f"cannot decode image {name}: {e}") from e
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as e:  # a broken EXIF block should not lose the image  # noqa: BLE001
        logger.debug("ignoring unreadable EXIF orientation: %s", e)
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            bg = Image.new("RGB", img.size, (255, 255, 255))  # alpha over white, like ms-swift
            bg.paste(img.convert("RGBA"), mask=img.convert("RGBA").split()[-1])
            img = bg
        else:
            img = img.convert("RGB")
    w, h = img.size
    if w < 1 or h < 1:
        raise BadSampleError("corrupt_media", f"image has size {w}x{h}")
    return img


# ----------------------------------------------------------------------------- video

@dataclass
class VideoClip:
    """Sampled frames (uint8, [T, C, H, W]) and the rate they were sampled at."""

    frames: np.ndarray
    sample_fps: float


def sample_frame_indices(total: int, video_fps: float, fps: float, min_frames: int,
                         max_frames: int, frame_factor: int = 2) -> np.ndarray:
    """Uniform frame indices at ``fps``, clamped to [min_frames, max_frames], multiple of 2.

    The multiple-of-``frame_factor`` rule exists because Qwen-VL merges pairs of frames
    (temporal_patch_size=2); an odd count would be padded by the processor anyway.
    """
    if total <= 0:
        raise BadSampleError("corrupt_media", "video has no frames")
    n = total / max(video_fps, 1e-6) * fps
    lo = math.ceil(min_frames / frame_factor) * frame_factor
    hi = max(lo, math.floor(min(max_frames, total) / frame_factor) * frame_factor)
    n = min(max(n, lo), hi)
    n = max(frame_factor, round(n / frame_factor) * frame_factor)
    return np.linspace(0, total - 1, n).round().astype(np.int64)


def load_video(ref: Any, cfg: MediaConfig, base_dir: str | None = None) -> VideoClip:
    """Decode a video with PyAV and sample frames per FPS / FPS_MAX_FRAMES / FPS_MIN_FRAMES."""
    import av  # local: only video users pay the import

    if isinstance(ref, (list, tuple)):  # a list of frame images
        frames = [np.asarray(load_image(r, base_dir, cfg.root_image_dir)) for r in ref]
        if len({f.shape for f in frames}) != 1:
            raise BadSampleError("corrupt_media", "video frames have different sizes")
        arr = np.stack(frames).transpose(0, 3, 1, 2)
        return VideoClip(arr, float(cfg.fps or 2.0))
    src = read_media_bytes(ref, base_dir, cfg.root_image_dir)
    try:
        with av.open(src if isinstance(src, str) else io.BytesIO(src)) as container:
            stream = container.streams.video[0]
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            video_fps = float(stream.average_rate or stream.guessed_rate or 24.0)
    except (av.error.FFmpegError, IndexError, OSError, ValueError) as e:
        raise BadSampleError("corrupt_media", f"cannot decode video: {e}") from e
    idx = sample_frame_indices(len(decoded), video_fps, cfg.fps or 2.0, cfg.fps_min_frames or 4,
                               cfg.fps_max_frames or 768)
    arr = np.stack([decoded[i] for i in idx]).transpose(0, 3, 1, 2)
    sample_fps = len(idx) / len(decoded) * video_fps
    return VideoClip(np.ascontiguousarray(arr), sample_fps)


# ----------------------------------------------------------------------------- audio

def load_audio(ref: Any, sampling_rate: int = 16000, base_dir: str | None = None) -> np.ndarray:
    """Decode any audio PyAV reads to mono float32 at ``sampling_rate`` (for audio families)."""
    import av

    src = read_media_bytes(ref, base_dir)
    try:
        with av.open(src if isinstance(src, str) else io.BytesIO(src)) as container:
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sampling_rate)
            chunks = []
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except (av.error.FFmpegError, IndexError, OSError, ValueError) as e:
        raise BadSampleError("corrupt_media", f"cannot decode audio: {e}") from e
    if not chunks:
        raise BadSampleError("corrupt_media", "audio has no samples")
    return np.concatenate(chunks).astype(np.float32)


# ----------------------------------------------------------------------------- DALI

DALI_HINT = ("--image_backend dali needs NVIDIA DALI: pip install 'mvlm[gpu]' "
             "(or pip install nvidia-dali-cuda130)")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def dali_decode_resize(encoded: list[bytes], sizes: list[tuple[int, int]],
                       device_id: int | None = None) -> list[np.ndarray]:
    """Decode JPEG/PNG bytes and resize each to ``sizes[i] = (h, w)`` with DALI (HWC uint8).

    ``device_id=None`` runs the CPU pipeline. The result matches PIL decode + bicubic resize
    within the tolerance stated in the tests (different resampling kernels: not bit-exact).
    """
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as e:
        raise ImportError(DALI_HINT) from e
    out: list[np.ndarray] = []
    for data, (h, w) in zip(encoded, sizes):
        @pipeline_def(batch_size=1, num_threads=1, device_id=device_id)
        def pipe(data=data, h=h, w=w):
            raw = fn.external_source(source=[[np.frombuffer(data, dtype=np.uint8)]], cycle=True)
            img = fn.decoders.image(raw, device="cpu" if device_id is None else "mixed",
                                    output_type=types.RGB)
            return fn.resize(img, resize_x=w, resize_y=h, interp_type=types.INTERP_CUBIC,
                             antialias=True)
        p = pipe()
        p.build()
        (res,) = p.run()
        arr = res.as_cpu().at(0) if hasattr(res, "as_cpu") else res.at(0)
        out.append(np.asarray(arr))
    return out
