"""HF checkpoint I/O: a lazy safetensors reader and a streaming writer, both peak ~one tensor.

Reading: ``safe_open`` memory-maps each shard and ``get_slice`` copies only the rows/columns a
rank owns, so a TP rank never holds the full weight. Writing: safetensors' own ``save_file``
needs every tensor of a file in memory at once; our writer computes the header from the planned
(name, dtype, shape) list first, then appends each tensor's bytes as it arrives, so export
memory is bounded by the largest tensor rather than by the shard or the model.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from safetensors import safe_open

from mvlm.convert.mapping import hub_name
from mvlm.convert.publish import (  # noqa: F401 - re-exported (older import path)
    fault_point,
    make_staging_dir,
    prepare_output_dir,
    publish_dir,
    staged_publish,
)
from mvlm.models.registry import module_tree_prefixes

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_DTYPE_TO_ST = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}

# Everything in an HF model directory that is not weights: configs, tokenizer, processor,
# chat template. Copied verbatim on export so the result loads like the original download.
AUX_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".py", ".tiktoken", ".md")


class CheckpointError(ValueError):
    """A missing or unreadable checkpoint file; the message says which file and what to do."""


def _model_type(model_dir: Path) -> str | None:
    """``config.json``'s model_type (None when the directory has no readable config): which
    family's module-tree layout the reader accepts."""
    try:
        return json.loads((model_dir / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


class SafetensorsReader:
    """Lazy reader over a HF directory (``model.safetensors`` or an index with shards).

    Names are served in the hub layout the weight tables use whichever layout is on disk: a
    checkpoint in transformers' module-tree layout (e.g. Qwen-VL's ``model.language_model.*``,
    ``model.visual.*``) answers to ``model.*`` / ``visual.*`` too (the families'
    ``module_tree_prefixes``, see :func:`mvlm.convert.mapping.hub_name`); :meth:`keys` stays the
    on-disk names and :meth:`disk_name` maps back, so coverage checks name what is really in the
    files.
    """

    def __init__(self, model_dir: str | os.PathLike) -> None:
        self.dir = Path(model_dir)
        index = self.dir / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e}); "
                                      "re-download or re-export the checkpoint") from e
        elif (self.dir / SINGLE_NAME).exists():
            weight_map = None
        else:
            raise CheckpointError(
                f"no {SINGLE_NAME} or {INDEX_NAME} in {self.dir}: point --model at a Hugging "
                "Face model directory with safetensors weights")
        self._shapes: dict[str, list[int]] = {}
        if weight_map is None:
            self.weight_map = {k: SINGLE_NAME for k in self._validate(SINGLE_NAME)}
        else:
            self.weight_map = dict(weight_map)
            for fname in sorted(set(self.weight_map.values())):
                self._validate(fname)
        self._prefixes = module_tree_prefixes(_model_type(self.dir))
        self._aliases = self._hub_aliases()

    def _hub_aliases(self) -> dict[str, str]:
        """Hub-layout name -> on-disk module-tree name; both layouts at once is an error (one of
        the two copies would be silently ignored)."""
        aliases: dict[str, str] = {}
        both = []
        for k in self.weight_map:
            h = hub_name(k, self._prefixes)
            if h == k:
                continue
            if h in self.weight_map:
                both.append((h, k))
            aliases[h] = k
        if both:
            raise CheckpointError(
                f"{self.dir} mixes the hub layout and transformers' module-tree layout: "
                f"{len(both)} tensors are stored under both names (e.g. {both[0][0]!r} and "
                f"{both[0][1]!r}); keep one copy of each tensor (re-save with save_pretrained)")
        return aliases

    def disk_name(self, name: str) -> str:
        """The name ``name`` is stored under on disk (itself, or its module-tree spelling)."""
        return name if name in self.weight_map else self._aliases.get(name, name)

    def _validate(self, fname: str) -> list[str]:
        """Open every shard once up front so a missing or corrupt file fails before any
        output exists; remember shapes so planning needs no further opens."""
        h = self._open(fname)
        keys = list(h.keys())
        for k in keys:
            self._shapes[k] = list(h.get_slice(k).get_shape())
        return keys

    def _open(self, fname: str):
        # Deliberately not cached: a long-lived memory map keeps every page this rank touched
        # resident, so RSS would grow to the size of all slices read. Reopening per tensor
        # (a header parse) keeps peak memory at about one tensor.
        path = self.dir / fname
        if not path.exists():
            raise CheckpointError(
                f"shard {path} is listed in {INDEX_NAME} but missing: the download or copy "
                "is incomplete; fetch the missing file again")
        try:
            return safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(
                f"shard {path} is corrupt or truncated ({type(e).__name__}: {e}); "
                "re-download it") from e

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map or name in self._aliases

    def shape(self, name: str) -> list[int]:
        name = self.disk_name(name)
        if name not in self._shapes:
            raise CheckpointError(f"tensor {name!r} not found in {self.dir}")
        return list(self._shapes[name])

    def read(self, name: str, dim: int | None = None, start: int | None = None,
             stop: int | None = None) -> torch.Tensor:
        name = self.disk_name(name)
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name!r} not found in {self.dir}")
        handle = self._open(self.weight_map[name])
        sl = handle.get_slice(name)
        try:
            if dim is None:
                t = sl[:]
            elif dim == 0:
                t = sl[start:stop]
            elif dim == 1:
                t = sl[:, start:stop]
            else:
                raise ValueError(f"slicing along dim {dim} is not supported")
        except Exception as e:
            if isinstance(e, ValueError) and "not supported" in str(e):
                raise
            raise CheckpointError(f"reading {name!r} from {self.dir} failed ({e}); the shard "
                                  "is likely corrupt: re-download it") from e
        t = t.clone() if t.is_contiguous() else t.contiguous()
        del sl, handle
        return t


class StreamingSafetensorsWriter:
    """Writes one safetensors file whose header is known up front; tensors arrive in order."""

    def __init__(self, path: str | os.PathLike,
                 specs: list[tuple[str, torch.dtype, list[int]]]) -> None:
        self.path = Path(path)
        self.specs = specs
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in specs:
            n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPE_TO_ST[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, dtype, shape = self.specs[self._next]
        if name != exp_name or tensor.dtype != dtype or list(tensor.shape) != list(shape):
            raise RuntimeError(
                f"streaming writer expected {exp_name} {dtype} {shape}, got {name} "
                f"{tensor.dtype} {list(tensor.shape)}")
        t = tensor.detach().contiguous().cpu()
        self._f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.specs):
            raise RuntimeError(f"{self.path}: wrote {self._next} of {len(self.specs)} tensors")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        fault_point("mid_write", self.path)  # tests: a kill lands with one shard complete


def write_index(out_dir: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size},
             "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def copy_aux_files(src: Path, dst: Path, skip: tuple[str, ...] = (INDEX_NAME,)) -> list[str]:
    """Copy config/tokenizer/processor/chat-template files (not weights)."""
    copied = []
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name not in skip and p.suffix in AUX_SUFFIXES:
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
    return copied


def staged_output(out: Path, overwrite: bool) -> AbstractContextManager[Path]:
    """Yield a staging dir, publish it as ``out`` on success, delete it on failure: the one
    protocol of :func:`mvlm.convert.publish.staged_publish` (collective when distributed)."""
    return staged_publish(out, overwrite=overwrite)
