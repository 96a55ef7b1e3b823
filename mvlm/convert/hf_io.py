"""HF checkpoint I/O: a lazy safetensors reader and a streaming writer, both peak ~one tensor.

Reading: the header says where each tensor's bytes are; ``read_into`` reads only the rows (or,
per row, the columns) a rank owns with ``preadv``, straight into the destination parameter, so
a TP rank never holds the full weight and loading makes no intermediate copy. Writing:
safetensors' own ``save_file`` needs every tensor of a file in memory at once; our writer
computes the header from the planned (name, dtype, shape) list first, then appends each
tensor's bytes as it arrives (no copy of them), so export memory is bounded by the largest
tensor rather than by the shard or the model.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from mvlm.convert.direct_io import BlockWriter
from mvlm.convert.file_maps import (  # noqa: F401 - release_file_maps re-exported
    KernelCopyFile,
    map_tensor,
    mapped_address,
    release_file_maps,
    write_at,
)
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


_ST_TO_DTYPE = {v: k for k, v in _DTYPE_TO_ST.items()}


@dataclass(frozen=True)
class _TensorLoc:
    """Where one tensor's bytes are: file, absolute byte offset, dtype, shape."""

    name: str
    file: str
    offset: int
    dtype: torch.dtype
    shape: list[int]


TensorLoc = _TensorLoc  # public name: where a planned export writes each tensor


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
        self._locs: dict[str, _TensorLoc] = {}
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
        del h
        with open(self.dir / fname, "rb") as f:  # safe_open checked the header above
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
        for k in keys:
            info = header[k]
            self._shapes[k] = list(info["shape"])
            if info["dtype"] not in _ST_TO_DTYPE:
                raise CheckpointError(f"{self.dir / fname}: tensor {k!r} has dtype "
                                      f"{info['dtype']}, which mvlm convert does not read; "
                                      f"supported: {sorted(_ST_TO_DTYPE)}")
            self._locs[k] = _TensorLoc(k, fname, 8 + n + info["data_offsets"][0],
                                       _ST_TO_DTYPE[info["dtype"]], list(info["shape"]))
        return keys

    def _open(self, fname: str):
        # Only used to validate a shard (safetensors checks header and sizes); data is read
        # with plain preadv (see read_into), never through a long-lived memory map, which would
        # keep every page this rank touched resident.
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
        """A new tensor with the slice ``[start:stop]`` along ``dim`` (whole tensor if None),
        in the dtype on disk."""
        loc = self._loc(name)
        out = torch.empty(self._slice_shape(loc, dim, start, stop), dtype=loc.dtype)
        self._read(loc, out, dim, start, stop)
        return out

    def read_into(self, name: str, out: torch.Tensor, dim: int | None = None,
                  start: int | None = None, stop: int | None = None) -> None:
        """Copy the slice ``[start:stop]`` along ``dim`` straight from the file into ``out``.

        Why not ``safe_open(...).get_slice``: that builds a new tensor (one copy), which a
        converter then has to copy into its parameter (a second copy, and a second buffer the
        size of the slice). Here the bytes go from the page cache into ``out``'s own memory with
        ``preadv``: no mmap (so nothing stays resident after the call) and no temporary, unless
        ``out`` has another dtype than the file (then one slice-sized buffer, cast into ``out``).
        """
        loc = self._loc(name)
        shape = self._slice_shape(loc, dim, start, stop)
        if list(out.shape) != shape:
            raise ValueError(f"read_into {name!r}: destination has shape {list(out.shape)}, "
                             f"the slice has {shape}")
        if out.numel() and out.dtype == loc.dtype and out.device.type == "cpu" \
                and out.data_ptr() == self._mapped_address(loc, dim, start, stop):
            return  # ``out`` is this very slice of the file, mapped (:meth:`map_view`)
        if out.dtype == loc.dtype and out.is_contiguous() and out.device.type == "cpu":
            self._read(loc, out, dim, start, stop)
        else:
            buf = torch.empty(shape, dtype=loc.dtype)
            self._read(loc, buf, dim, start, stop)
            out.copy_(buf)

    def map_view(self, name: str, dim: int | None = None, start: int | None = None,
                 stop: int | None = None) -> torch.Tensor | None:
        """The slice as a tensor over a copy-on-write memory map of the file, or None when the
        slice is not one contiguous, dtype-aligned byte range.

        Why: a converter that only passes a tensor through (no interleave, no dtype change)
        need not copy it into fresh memory at all: the mapped pages are the page cache's own,
        so the output writer reads the file's bytes where they already are (no allocation, no
        first-touch faults for a second copy). Copy-on-write (``MAP_PRIVATE``): writing to the
        view changes this process's pages only, never the file. ``read_into`` with this view
        as ``out`` is then a no-op, so the ordinary load path needs no special case."""
        loc = self._loc(name)
        shape = self._slice_shape(loc, dim, start, stop)
        esize = torch.empty((), dtype=loc.dtype).element_size()
        offset, contiguous = self._slice_offset(loc, dim, start, shape)
        n = _numel(shape)
        if not contiguous or n == 0 or offset % esize:
            return None
        return map_tensor(self.dir / loc.file, offset, loc.dtype, shape)

    def _slice_offset(self, loc: _TensorLoc, dim: int | None, start: int | None,
                      shape: list[int]) -> tuple[int, bool]:
        """(absolute byte offset of the slice's first element, whether it is one byte run)."""
        esize = torch.empty((), dtype=loc.dtype).element_size()
        full = loc.shape
        lo = start or 0
        if dim is None:
            return loc.offset, True
        if dim == 0:
            return loc.offset + lo * esize * _numel(full[1:]), True
        # dim 1: contiguous only when every row's run is whole, or there is one row
        inner = esize * _numel(full[2:])
        return loc.offset + lo * inner, shape[1] == full[1] or full[0] == 1

    def _mapped_address(self, loc: _TensorLoc, dim: int | None, start: int | None,
                        stop: int | None) -> int:
        """Where the slice starting at ``start`` lies in this file's live mapping (-1: none)."""
        base = mapped_address(self.dir / loc.file)
        if base < 0:
            return -1
        shape = self._slice_shape(loc, dim, start, stop)
        offset, contiguous = self._slice_offset(loc, dim, start, shape)
        return base + offset if contiguous else -1

    def _loc(self, name: str) -> _TensorLoc:
        disk = self.disk_name(name)
        if disk not in self.weight_map:
            raise CheckpointError(f"tensor {name!r} not found in {self.dir}")
        return self._locs[disk]

    def _slice_shape(self, loc: _TensorLoc, dim: int | None, start: int | None,
                     stop: int | None) -> list[int]:
        shape = list(loc.shape)
        if dim is None:
            return shape
        if dim not in (0, 1) or dim >= len(shape):
            raise ValueError(f"slicing along dim {dim} is not supported")
        lo = 0 if start is None else start
        hi = shape[dim] if stop is None else stop
        if not 0 <= lo <= hi <= shape[dim]:
            raise CheckpointError(f"reading {loc.name!r} from {self.dir}: slice [{start}:{stop}] "
                                  f"along dim {dim} is outside its shape {shape}")
        shape[dim] = hi - lo
        return shape

    def _read(self, loc: _TensorLoc, out: torch.Tensor, dim: int | None, start: int | None,
              stop: int | None) -> None:
        """Fill contiguous CPU ``out`` (the file's dtype) with the slice, by direct reads."""
        if out.numel() == 0:
            return
        dst = memoryview(out.reshape(-1).view(torch.uint8).numpy()).cast("B")
        esize = out.element_size()
        shape = loc.shape
        path = self.dir / loc.file
        with open(path, "rb", buffering=0) as f:
            fd = f.fileno()
            if dim is None or dim == 0:
                # whole rows: one contiguous byte range of the file
                row = esize * _numel(shape[1:])
                lo = (start or 0) if dim == 0 else 0
                _pread_full(fd, dst, loc.offset + lo * row, path)
                return
            # dim 1: every row contributes one contiguous run of columns
            lo = start or 0
            inner = esize * _numel(shape[2:])
            src_row, run = shape[1] * inner, out.shape[1] * inner
            base = loc.offset + lo * inner
            for r in range(shape[0]):
                _pread_full(fd, dst[r * run:(r + 1) * run], base + r * src_row, path)


def open_hf_reader(model_dir: str | os.PathLike) -> SafetensorsReader:
    """The reader for an HF directory: :class:`SafetensorsReader`, or the family's adapter when
    the directory is in a layout transformers cannot load by itself (``FamilySpec.
    foreign_layouts``, e.g. OpenGVLab's original InternVL), which serves the same hub names."""
    from mvlm.models.registry import foreign_layout

    adapter = foreign_layout(model_dir)
    return adapter.reader(model_dir) if adapter is not None else SafetensorsReader(model_dir)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _pread_full(fd: int, dst: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(dst):
        n = os.preadv(fd, [dst[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"shard {path} is corrupt or truncated (ends before byte "
                                  f"{offset + len(dst)}); re-download it")
        done += n


Spec = tuple[str, torch.dtype, list[int]]


def _nbytes(dtype: torch.dtype, shape) -> int:
    return _numel(shape) * torch.empty((), dtype=dtype).element_size()


def safetensors_header(specs: list[Spec]) -> tuple[bytes, list[int], int]:
    """(the file's first bytes: 8-byte length + JSON header padded to 8, each tensor's data
    offset relative to the end of those bytes, total data bytes) for tensors stored in
    ``specs`` order. One definition for the streaming writer and the planned (TP) export, so
    both lay out the same tensors byte for byte alike."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offsets, offset = [], 0
    for name, dtype, shape in specs:
        n = _nbytes(dtype, shape)
        header[name] = {"dtype": _DTYPE_TO_ST[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offsets.append(offset)
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets, offset


@dataclass(frozen=True)
class PlannedFile:
    """One output file of a planned export: its name, tensors (in order), first bytes, size."""

    name: str
    specs: list[Spec]
    head: bytes
    size: int


def plan_files(groups: list[list[Spec]], max_shard_bytes: int
               ) -> tuple[list[PlannedFile], dict[str, _TensorLoc]]:
    """Lay ``groups`` of tensors (in order; a group, e.g. one parameter's q/k/v, never spans two
    files) out in files of at most ``max_shard_bytes`` of data (a group alone may exceed it):
    ``model.safetensors``, or ``model-0000k-of-0000n.safetensors``. Returns the files and where
    every tensor's bytes go. Pure function of its input, so every rank computes the same plan."""
    split: list[list[Spec]] = []
    size = 0
    for group in groups:
        nbytes = sum(_nbytes(d, s) for _, d, s in group)
        if not split or (split[-1] and size + nbytes > max_shard_bytes):
            split.append([])
            size = 0
        split[-1].extend(group)
        size += nbytes
    n = len(split)
    files, locs = [], {}
    for i, specs in enumerate(split):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else SINGLE_NAME
        head, offsets, data = safetensors_header(specs)
        files.append(PlannedFile(fname, specs, head, len(head) + data))
        for (name, dtype, shape), off in zip(specs, offsets, strict=True):
            if name in locs:
                raise RuntimeError(f"{name} planned twice")
            locs[name] = _TensorLoc(name, fname, len(head) + off, dtype, list(shape))
    return files, locs


def create_planned_file(path: str | os.PathLike, plan: PlannedFile) -> None:
    """Create ``path`` with its header written and its full size allocated (data not yet
    written): the ranks of a TP export then write their pieces into it at their offsets."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        if os.pwrite(fd, plan.head, 0) != len(plan.head):
            raise OSError(f"{path}: short write of the safetensors header")
        if plan.size > len(plan.head):
            try:  # the whole file's blocks at once (as StreamingSafetensorsWriter)
                os.posix_fallocate(fd, 0, plan.size)
            except OSError:  # not supported by this filesystem: sparse until written
                pass
        os.ftruncate(fd, plan.size)
    finally:
        os.close(fd)


def write_piece(out: BlockWriter, loc: _TensorLoc, dim: int, start: int, t: torch.Tensor) -> int:
    """Write ``t`` = ``tensor[loc].narrow(dim, start, t.shape[dim])`` into its place in the file
    of ``out`` (planned by :func:`plan_files`). A whole tensor or a dim-0 block is one
    contiguous range (taken from its input file when it is an unmodified memory map,
    :func:`write_at`); a block along a later dim is one write per run of the dims before it
    (per row for a dim-1 block). Returns the bytes taken from an input file."""
    shape = list(loc.shape)
    got = list(t.shape)
    whole = got == shape and start == 0
    if t.dtype != loc.dtype or not whole and (
            len(got) != len(shape) or not 0 <= dim < len(shape) or start < 0
            or start + got[dim] > shape[dim]
            or got[:dim] + got[dim + 1:] != shape[:dim] + shape[dim + 1:]):
        raise RuntimeError(f"{loc.name}: piece {t.dtype} {got} at dim {dim} start {start} does "
                           f"not fit the planned {loc.dtype} {shape}")
    if t.numel() == 0:
        return 0
    t = t.detach().cpu().contiguous()
    src = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    esize = t.element_size()
    inner = esize * _numel(shape[dim + 1:]) if not whole else 0
    if whole or dim == 0 or _numel(shape[:dim]) == 1:  # one contiguous byte range
        return write_at(out, loc.offset + start * inner, src)
    run, stride = got[dim] * inner, shape[dim] * inner
    base = loc.offset + start * inner
    for r in range(_numel(shape[:dim])):
        write_at(out, base + r * stride, src[r * run:(r + 1) * run])
    return 0


class StreamingSafetensorsWriter:
    """Writes one safetensors file whose header is known up front; tensors arrive in order."""

    def __init__(self, path: str | os.PathLike,
                 specs: list[tuple[str, torch.dtype, list[int]]]) -> None:
        self.path = Path(path)
        self.specs = specs
        head, _, data = safetensors_header(specs)
        # Tensor bytes that are an unmodified memory map of an input file (a pass-through
        # parameter, see ``mvlm.convert.file_maps``) are copied file to file by the kernel.
        self._f = KernelCopyFile(self.path, "wb")
        self.size = len(head) + data
        if data:
            try:  # the whole file's blocks at once instead of extent by extent as it grows
                os.posix_fallocate(self._f.fileno(), 0, self.size)
            except OSError:  # not supported by this filesystem: grow as it goes
                pass
        self._f.write(head)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, dtype, shape = self.specs[self._next]
        if name != exp_name or tensor.dtype != dtype or list(tensor.shape) != list(shape):
            raise RuntimeError(
                f"streaming writer expected {exp_name} {dtype} {shape}, got {name} "
                f"{tensor.dtype} {list(tensor.shape)}")
        t = tensor.detach().cpu().contiguous()
        if t.numel():  # the tensor's own bytes, no bytes() copy of it
            self._f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.specs):
            raise RuntimeError(f"{self.path}: wrote {self._next} of {len(self.specs)} tensors")
        # No fsync per file: what makes an output trustworthy is the staged directory renamed
        # into place only when every file is complete (mvlm.convert.publish), which a killed
        # process cannot break; durability across a power loss is the filesystem's, as for
        # transformers' save_pretrained. An fsync here cost the disk's full write time per shard.
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
