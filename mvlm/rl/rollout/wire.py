"""What the rollout server and its client say to each other: routes, the weight manifest, and
safetensors buckets. Standard library + torch + safetensors only, because both sides import it:
the trainer (mvlm's venv) and ``mvlm rollout`` (vLLM's own venv, where Megatron-Core is absent).

Why safetensors over HTTP for the CPU transport: a bucket is one self-describing byte string
(names, shapes, dtypes in its header), it needs no shared filesystem between trainer and server
(they may be on different hosts), and both ends already depend on the library. On GPUs the same
protocol carries the manifest and the bucket boundaries while an NCCL group would carry the bytes.

Manifest: one entry per Hugging Face tensor, ``{"name", "shape", "dtype"}`` (dtype as torch
spells it without the prefix, e.g. ``"float32"``). A sync is valid only when every manifest
entry arrives exactly once with its shape and dtype, and nothing else arrives.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

# Routes (all JSON unless noted).
HEALTH = "/health"                 # GET  -> {"status": "ok", "weight_version", "model", ...}
MANIFEST = "/weights/manifest"     # GET  -> {"manifest": [...]} of the served checkpoint
GENERATE = "/generate"             # POST {"prompts": [[ids]], "sampling": {...}} -> groups
SYNC_BEGIN = "/weights/begin"      # POST {"manifest": [...]} -> {"sync_id"}
SYNC_BUCKET = "/weights/bucket"    # POST ?sync_id=..  body: safetensors bytes -> {"received"}
SYNC_FINISH = "/weights/finish"    # POST {"sync_id"} -> {"weight_version", ...}
SYNC_ABORT = "/weights/abort"      # POST {"sync_id"} -> {} (engine marked stale until a sync)
READ_WEIGHTS = "/weights/read"     # POST {"names": [...]} -> safetensors bytes
DIGEST_WEIGHTS = "/weights/digest"  # POST {"names": [...]} -> {"dtype", "digests": {name: hex}}

_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    d = getattr(torch, name, None)
    if not isinstance(d, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a weight manifest")
    return d


def manifest_entry(name: str, t: torch.Tensor) -> dict:
    return {"name": name, "shape": list(t.shape), "dtype": dtype_name(t.dtype)}


def safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file (read without loading any tensor)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def checkpoint_manifest(model_dir: str | Path) -> list[dict]:
    """Every tensor of a Hugging Face checkpoint directory, from the safetensors headers: what
    an engine serving that checkpoint loaded, so what a full weight update must deliver."""
    d = Path(model_dir)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{d}: no *.safetensors files; `mvlm rollout --model` needs a "
                                "Hugging Face checkpoint directory with safetensors weights")
    out = []
    for f in files:
        for name, meta in safetensors_header(f).items():
            if name == "__metadata__":
                continue
            dt = _ST_DTYPES.get(meta["dtype"])
            if dt is None:
                raise ValueError(f"{f}: tensor {name} has dtype {meta['dtype']}, unknown here")
            out.append({"name": name, "shape": list(meta["shape"]), "dtype": dt})
    return sorted(out, key=lambda e: e["name"])


def check_manifest(manifest: Iterable[Mapping]) -> dict[str, tuple[list[int], str]]:
    """name -> (shape, dtype), refusing malformed entries and duplicate names."""
    out: dict[str, tuple[list[int], str]] = {}
    for i, e in enumerate(manifest):
        try:
            name, shape, dt = str(e["name"]), [int(s) for s in e["shape"]], str(e["dtype"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"weight manifest entry {i} is malformed ({err!r}): each entry "
                             "needs name, shape (list of ints) and dtype") from err
        torch_dtype(dt)
        if name in out:
            raise ValueError(f"weight manifest lists {name} twice: each HF tensor must appear "
                             "exactly once")
        out[name] = (shape, dt)
    if not out:
        raise ValueError("weight manifest is empty")
    return out


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (shape and dtype included): equal digests = equal tensors."""
    import hashlib

    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{dtype_name(t.dtype)}{list(t.shape)}".encode())
    h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def pack_bucket(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """safetensors bytes of one bucket (contiguous CPU copies made only where needed)."""
    from safetensors.torch import save

    return save({n: t.detach().to("cpu").contiguous() for n, t in tensors.items()})


def unpack_bucket(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)
