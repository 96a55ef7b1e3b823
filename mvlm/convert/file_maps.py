"""Copy-on-write file maps as tensors, and an output stream that copies mapped bytes in the kernel.

Why: a converter mostly passes tensors through unchanged. A pass-through parameter can be a
tensor over a memory map of the input file (no allocation, no read); when the output writer
then hands such a tensor's bytes to ``write``, the bytes would be faulted into this process's
page tables and copied from user space into the output file's page cache. The same bytes are
already in the kernel's page cache of the input file, so the output writers take them from
the file instead: read into the ``O_DIRECT`` staging buffer (:mod:`mvlm.convert.direct_io`), or
where output goes through the page cache, copied file to file by the kernel
(``os.copy_file_range``): microbenchmark on this VM (470 MB, warm page cache, ext4), ``write``
of the memory-mapped bytes 0.37-0.66 CPU s against 0.12-0.19 for the kernel copy.

Exactness: the copy takes the file's bytes, so it is used only where they are the tensor's
bytes. The maps are copy-on-write (``MAP_PRIVATE``): a page someone wrote to becomes an
anonymous page of this process and the file no longer holds its bytes. Before each such
copy the region's pages are looked up in ``/proc/self/pagemap``; one page that is present and not
file-backed (or swapped out) means "written to", and the bytes are written from memory as a
plain ``write`` would. Where pagemap cannot be read, every write is a plain one.
"""
from __future__ import annotations

import io
import mmap
import os
from pathlib import Path

import numpy as np
import torch

from mvlm.convert.direct_io import BlockWriter

# One copy-on-write map per file version, shared by every user in the process (the converter
# maps parameters, the loaders recognise them): key -> (map, its address, path).
_MAPS: dict[tuple, tuple[mmap.mmap, int, str]] = {}
_PAGE = mmap.PAGESIZE
KERNEL_COPY_MIN_BYTES = 1 << 16  # below this a plain write is as cheap as the checks


def map_key(path: str | os.PathLike) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)


def file_map(path: str | os.PathLike) -> tuple[mmap.mmap, int]:
    """The process's copy-on-write map of ``path`` (made on first use) and its address."""
    key = map_key(path)
    hit = _MAPS.get(key)
    if hit is None:
        with open(path, "rb") as f:  # the map outlives the descriptor
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        addr = torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr()
        hit = _MAPS[key] = (mm, addr, key[0])
    return hit[0], hit[1]


def mapped_address(path: str | os.PathLike) -> int:
    """Address of ``path``'s live map, -1 if it has none."""
    if not _MAPS:
        return -1
    hit = _MAPS.get(map_key(path))
    return -1 if hit is None else hit[1]


def map_tensor(path: str | os.PathLike, offset: int, dtype: torch.dtype,
               shape: list[int] | torch.Size) -> torch.Tensor:
    """``shape`` elements of ``dtype`` at byte ``offset`` of ``path``, as a tensor over the map,
    with its own storage of exactly these bytes (a view of a whole-file storage would make
    torch.distributed.checkpoint clone it before saving)."""
    mm, _ = file_map(path)
    n = 1
    for s in shape:
        n *= s
    esize = torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(mm, dtype=torch.uint8, count=n * esize,
                            offset=offset).view(dtype).view(list(shape))


def release_file_maps() -> None:
    """Forget the cached maps; tensors made from one keep it mapped until they are freed."""
    _MAPS.clear()


def mapped_source(addr: int, nbytes: int) -> tuple[str, int] | None:
    """(file, byte offset) whose bytes ``[addr, addr + nbytes)`` are, if that range lies in one
    live map and none of its pages was written to; else None."""
    for mm, base, path in list(_MAPS.values()):
        if base <= addr and addr + nbytes <= base + len(mm):
            return (path, addr - base) if pages_unmodified(addr, nbytes) else None
    return None


def pages_unmodified(addr: int, nbytes: int) -> bool:
    """True when no page of ``[addr, addr + nbytes)`` of a private file map is this process's
    own copy (present and anonymous, or swapped out): then the file holds the bytes."""
    first, last = addr // _PAGE, (addr + nbytes - 1) // _PAGE
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            raw = os.pread(f.fileno(), (last - first + 1) * 8, first * 8)
    except OSError:
        return False
    if len(raw) != (last - first + 1) * 8:
        return False
    e = np.frombuffer(raw, dtype=np.uint64)
    present, swapped, filep = (e >> np.uint64(63)) & np.uint64(1), \
        (e >> np.uint64(62)) & np.uint64(1), (e >> np.uint64(61)) & np.uint64(1)
    return not bool(np.any((present & (filep ^ np.uint64(1))) | swapped))


def buffer_address(b) -> tuple[int, int] | None:
    """(address, byte length) of a C-contiguous buffer, None for anything else."""
    mv = memoryview(b)
    if not mv.c_contiguous or mv.nbytes == 0:
        return None
    return np.frombuffer(mv.cast("B"), dtype=np.uint8).ctypes.data, mv.nbytes


def write_at(out: BlockWriter, offset: int, b) -> int:
    """Write all of buffer ``b`` at byte ``offset`` of ``out``; bytes that lie in a live,
    unmodified file map are taken from their file (:meth:`BlockWriter.write_from_file`), not
    from this process's memory. Returns the bytes taken from a file (0 or all of them)."""
    mv = memoryview(b)
    loc = buffer_address(mv) if _MAPS and mv.nbytes >= KERNEL_COPY_MIN_BYTES else None
    src = mapped_source(*loc) if loc is not None else None
    if src is not None:
        out.write_from_file(offset, src[0], src[1], loc[1])
        return loc[1]
    out.write_buffer(offset, mv)
    return 0


class KernelCopyFile(io.RawIOBase):
    """A new binary output file written as a stream (``torch.save``, the safetensors writer)
    through a :class:`~mvlm.convert.direct_io.BlockWriter`: bytes that lie in a live,
    unmodified file map (:func:`file_map`) are taken from their file, every other write from
    memory; whole blocks go around the page cache where the filesystem allows. Same bytes in
    the file either way. ``kernel_bytes`` counts what was taken from input files."""

    def __init__(self, path: str | os.PathLike, mode: str = "wb") -> None:
        if mode not in ("wb", "xb"):
            raise ValueError(f"KernelCopyFile writes new files, mode {mode!r}")
        if mode == "xb" and os.path.exists(path):
            raise FileExistsError(path)
        self._w = BlockWriter(path, create=True)
        self.name = str(path)
        self._pos = 0

    @property
    def kernel_bytes(self) -> int:
        return self._w.file_bytes

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._w.fd

    def write(self, b) -> int:
        n = memoryview(b).nbytes
        write_at(self._w, self._pos, b)  # always all of it: torch.save ignores short writes
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._w.end}[whence]
        self._pos = base + offset
        return self._pos

    def truncate(self, size: int | None = None) -> int:
        raise io.UnsupportedOperation("KernelCopyFile writes each byte once; no truncate")

    def close(self) -> None:
        if not self.closed:
            self._w.close()
        super().close()


def open_output(path: str | os.PathLike) -> KernelCopyFile:
    return KernelCopyFile(Path(path), "wb")
