"""``mvlm.convert.direct_io.BlockWriter``: the file holds exactly the bytes it was given, whatever
the order, the sizes, the number of writers sharing the file and the path each block took.

The writer sends whole 4 KiB blocks around the page cache (``O_DIRECT``) from staging buffers on
a thread, holds partial blocks until their other bytes arrive, writes small unaligned runs and
blocks shared with another writer through the page cache, and falls back to the page cache when
the filesystem refuses ``O_DIRECT``. Each of those paths is made to run here with small staging
buffers and a small held-block limit, and the file is compared byte for byte with the expected
bytes. One test checks the point of it all: the output's pages are not left in the page cache.
"""
from __future__ import annotations

import ctypes
import errno
import io
import mmap
import os
import random

import numpy as np
import pytest
import torch

from mvlm.convert import direct_io, file_maps
from mvlm.convert.direct_io import BLOCK, BlockWriter


def _o_direct_works(d) -> bool:
    p = d / "probe"
    p.write_bytes(b"")
    try:
        os.close(os.open(p, os.O_WRONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        p.unlink()


@pytest.fixture
def small_stage(monkeypatch):
    """64 KiB staging buffers and 4 held blocks: many chunks and evictions in a few MB."""
    monkeypatch.setattr(direct_io, "STAGE_BYTES", 16 * BLOCK)
    monkeypatch.setattr(direct_io, "MAX_HELD_BLOCKS", 4)


def _ranges(size: int, rng: random.Random) -> list[tuple[int, int]]:
    """Disjoint ranges tiling [0, size): 1 byte to ~300 KB, many not block aligned."""
    out, at = [], 0
    while at < size:
        n = rng.choice([1, 7, BLOCK - 1, BLOCK, BLOCK + 3, 3 * BLOCK, 70_001, 300_000])
        n = min(n, size - at)
        out.append((at, at + n))
        at += n
    return out


@pytest.mark.parametrize("writers", [1, 2, 3])
@pytest.mark.parametrize("direct", ["1", "0"])
@pytest.mark.parametrize("block", [BLOCK, 16 * 4096])  # 4 KiB, and a 64 KiB-page machine's
def test_random_writes_give_the_expected_bytes(tmp_path, monkeypatch, small_stage, writers,
                                               direct, block):
    monkeypatch.setenv("MVLM_DIRECT_IO", direct)
    monkeypatch.setattr(direct_io, "BLOCK", block)
    rng = random.Random(writers * 10 + int(direct))
    size = 3 * 2**20 + 123  # a short last block
    want = rng.randbytes(size)
    src = tmp_path / "input.bin"
    src.write_bytes(b"xyz" + want)  # read from at an unaligned offset
    target = tmp_path / "out.bin"
    with open(target, "wb") as f:  # planned: full size up front, as create_planned_file
        f.truncate(size)
    ranges = _ranges(size, rng)
    rng.shuffle(ranges)
    per_writer = [ranges[i::writers] for i in range(writers)]
    total_direct = 0
    for mine in per_writer:
        w = BlockWriter(target, size=size)
        for lo, hi in mine:
            if rng.random() < 0.5:
                w.write_from_file(lo, str(src), 3 + lo, hi - lo)
            else:
                w.write_buffer(lo, memoryview(want)[lo:hi])
        w.close()
        total_direct += w.direct_bytes
    assert target.stat().st_size == size
    assert target.read_bytes() == want
    if direct == "0" or not _o_direct_works(tmp_path):
        assert total_direct == 0
    else:  # most bytes went around the page cache
        assert total_direct > size // 2, total_direct


def test_appended_stream_equals_torch_save(tmp_path, small_stage):
    """``torch.save`` through the stream (the torch_dist writer's path): same bytes as to memory,
    tensors of sizes that are not block multiples, one of them over an input file's map."""
    tensors = {"a": torch.randn(1000, 37), "b": torch.arange(5, dtype=torch.int16),
               "c": torch.randn(300, 300)}
    raw = tmp_path / "raw.bin"
    raw.write_bytes(tensors["c"].numpy().tobytes())
    tensors["c"] = file_maps.map_tensor(raw, 0, torch.float32, [300, 300])
    ref = io.BytesIO()
    torch.save(tensors, ref)
    with file_maps.KernelCopyFile(tmp_path / "t.pt") as f:
        torch.save(tensors, f)
        assert f.kernel_bytes == 300 * 300 * 4  # taken from the input file
    file_maps.release_file_maps()
    assert (tmp_path / "t.pt").read_bytes() == ref.getvalue()


def test_a_byte_written_twice_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MVLM_DIRECT_IO", "1")
    if not _o_direct_works(tmp_path):
        pytest.skip("no O_DIRECT on this filesystem: bytes go straight to the page cache")
    w = BlockWriter(tmp_path / "f", create=True)
    w.write_buffer(10, bytes(3 * BLOCK))  # its head, bytes 10-4095, is held for bytes 0-9
    with pytest.raises(RuntimeError, match="written twice"):
        w.write_buffer(8, b"xyzw")
    w.close()


def test_o_direct_refused_at_the_write_falls_back(tmp_path, monkeypatch, small_stage):
    """A filesystem that accepts the ``O_DIRECT`` open but refuses the write: every byte still
    lands (through the page cache), nothing counted as direct."""
    monkeypatch.setenv("MVLM_DIRECT_IO", "1")
    if not _o_direct_works(tmp_path):
        pytest.skip("no O_DIRECT on this filesystem")
    real = os.pwrite
    direct_fds: set[int] = set()

    def pwrite(fd, data, offset):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "refused")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    rng = random.Random(5)
    want = rng.randbytes(2**20 + 77)
    w = BlockWriter(tmp_path / "f", create=True)
    direct_fds.add(w._dfd)
    ranges = _ranges(len(want), rng)
    for lo, hi in ranges:
        w.write_buffer(lo, memoryview(want)[lo:hi])
    w.close()
    assert w.direct_bytes == 0
    assert (tmp_path / "f").read_bytes() == want


def _resident_pages(path) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages of the file), by mincore(2)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
    try:
        pages = -(-size // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * pages)()
        addr = np.frombuffer(mm, dtype=np.uint8).ctypes.data
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(v & 1 for v in vec), pages
    finally:
        mm.close()


@pytest.mark.parametrize("direct", ["1", "0"])
def test_output_pages_stay_out_of_the_page_cache(tmp_path, monkeypatch, direct):
    monkeypatch.setenv("MVLM_DIRECT_IO", direct)
    if direct == "1" and not _o_direct_works(tmp_path):
        pytest.skip("no O_DIRECT on this filesystem")
    data = random.Random(0).randbytes(8 * 2**20 + 5)
    w = BlockWriter(tmp_path / "f", create=True)
    w.write_buffer(0, data)
    w.close()
    resident, pages = _resident_pages(tmp_path / "f")
    if direct == "1":
        assert w.direct_bytes == len(data) - len(data) % BLOCK + BLOCK  # the padded last block
        assert resident <= 2, (resident, pages)
    else:
        assert w.direct_bytes == 0
        assert resident == pages
    assert (tmp_path / "f").read_bytes() == data
