"""Output files written around the page cache: whole blocks with ``O_DIRECT``.

Why: a conversion writes its whole output (1.4 GB for the bench checkpoint) once and does not
read it back. Written through the page cache, every byte first lands in newly allocated cache
pages; on the VMs this project runs on that allocation is the conversion's largest cost
(bench/convert.py, docs/benchmarks.md: 336 MB written to a new file took 1.59-2.02 CPU s the
first time, 0.05 CPU s with ``O_DIRECT``). With ``O_DIRECT`` the disk reads the bytes from one
reused staging buffer and no cache page is allocated; bytes that come from an input file
(pass-through parameters) are read into that buffer with ``preadv`` from the input's cache.

``O_DIRECT`` needs block-aligned offsets, lengths and buffers, and the writers here place
arbitrary byte ranges (safetensors and ``torch.save`` layouts, TP ranks filling one file at
their own offsets). :class:`BlockWriter` therefore sends every whole block a write covers
straight to the disk and keeps the partial head and tail blocks in memory until the rest of the
block arrives (then the block goes out whole) or the writer is closed (then only the bytes this
writer was given are written, through the page cache, so blocks shared with another TP rank
keep that rank's bytes). Bytes given twice for a held block are refused (every output byte
has one writer; a held block would otherwise go out with whichever bytes came last).
Writes that hold no whole block and start no held block (the per-row runs of a TP piece split
along columns) go through the page cache at once, and at most ``MAX_HELD_BLOCKS`` blocks are
held (the oldest is written through the cache beyond that), so memory stays bounded.

The disk writes run on one thread per file with two staging buffers, so the disk's time
overlaps the caller's next tensor (``O_DIRECT`` writes are synchronous).

Where ``O_DIRECT`` is unavailable (tmpfs, some network filesystems) or refused at the first
write, or with ``MVLM_DIRECT_IO=0`` in the environment, the same calls write through the page
cache, with input-file bytes copied file to file by the kernel (``copy_file_range``). The
bytes in the file are the same either way (tests/unit/test_convert_direct_io.py).
"""
from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

# O_DIRECT's unit: a multiple of every logical block size Linux filesystems use, and at least a
# memory page, so a block written around the cache never shares a page-cache page with bytes
# written through it (64 KiB pages on some ARM servers).
BLOCK = max(4096, mmap.PAGESIZE)
STAGE_BYTES = 8 << 20  # size of each of the two page-aligned buffers the disk reads from
MAX_HELD_BLOCKS = 1024  # partial blocks kept waiting for their other bytes (4 MiB)


def direct_io_wanted() -> bool:
    """``MVLM_DIRECT_IO=0`` writes every output through the page cache (e.g. to keep a fresh
    conversion in memory for an immediate load on a machine with a slow disk)."""
    return os.environ.get("MVLM_DIRECT_IO", "1") != "0"


@dataclass
class _Partial:
    """The bytes of one block received so far, and which ranges of it they are."""

    data: bytearray = field(default_factory=lambda: bytearray(BLOCK))
    ranges: list[tuple[int, int]] = field(default_factory=list)
    covered: int = 0

    def add(self, lo: int, b: memoryview, where: str) -> None:
        hi = lo + len(b)
        for a, z in self.ranges:
            if lo < z and a < hi:
                raise RuntimeError(f"{where}: bytes {lo}-{hi} of a block written twice")
        self.data[lo:hi] = b
        self.ranges.append((lo, hi))
        self.covered += hi - lo


class _DiskThread:
    """Makes the ``O_DIRECT`` writes of one file on a thread, from two staging buffers: the
    caller fills one while the disk reads the other. If the filesystem refuses ``O_DIRECT``
    at a write (after accepting the open), that buffer and every later one are written
    through the page cache instead (``refused`` tells the caller to stop holding blocks)."""

    def __init__(self, dfd: int, fd: int, path: str) -> None:
        self.dfd, self.fd, self.path = dfd, fd, path
        self.refused = False
        self.error: BaseException | None = None
        self.bytes = 0
        self._free: queue.Queue = queue.Queue()
        self._buffers = [mmap.mmap(-1, STAGE_BYTES) for _ in range(2)]  # page-aligned
        for b in self._buffers:
            self._free.put(b)
        self._work: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="mvlm-direct-io", daemon=True)
        self._thread.start()

    def buffer(self) -> mmap.mmap:
        """A staging buffer to fill (waits while both are with the disk)."""
        b = self._free.get()
        if self.error is not None:
            self._free.put(b)
            raise self.error
        return b

    def submit(self, buf: mmap.mmap, n: int, pos: int) -> None:
        self._work.put((buf, n, pos))

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            buf, n, pos = item
            try:
                if self.error is None:
                    self._write(memoryview(buf)[:n], pos)
            except BaseException as e:  # handed to the caller at its next call
                self.error = e
            finally:
                self._free.put(buf)

    def _write(self, mv: memoryview, pos: int) -> None:
        done = 0
        while done < len(mv) and not self.refused:
            try:
                k = os.pwrite(self.dfd, mv[done:], pos + done)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                self.refused = True
                break
            if k <= 0 or k % BLOCK:
                raise OSError(f"{self.path}: O_DIRECT write at byte {pos + done} wrote {k}")
            done += k
        if done < len(mv):
            _pwrite_all(self.fd, mv[done:], pos + done)
        self.bytes += done

    def drain(self) -> None:
        """Wait for every submitted write; raise the first error one of them met."""
        held = [self._free.get() for _ in self._buffers]
        for b in held:
            self._free.put(b)
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self._work.put(None)
        self._thread.join()
        for b in self._buffers:
            b.close()


class BlockWriter:
    """Positional writes into one existing or new file; see the module docstring.

    ``size`` (when known up front, e.g. a planned safetensors file) lets the file's last,
    short block go out as soon as it is complete; otherwise :meth:`close` gives it.
    ``file_bytes`` counts the bytes taken from input files rather than from memory,
    ``direct_bytes`` the bytes written around the page cache.
    """

    def __init__(self, path: str | os.PathLike, create: bool = False,
                 size: int | None = None) -> None:
        self.path = str(path)
        flags = os.O_WRONLY | ((os.O_CREAT | os.O_TRUNC) if create else 0)
        self.fd = os.open(self.path, flags, 0o666)
        self._disk: _DiskThread | None = None
        if direct_io_wanted():
            try:
                dfd = os.open(self.path, os.O_WRONLY | os.O_DIRECT)
            except OSError:  # EINVAL on filesystems without O_DIRECT
                dfd = None
            if dfd is not None:
                self._dfd = dfd
                self._disk = _DiskThread(dfd, self.fd, self.path)
        self.size = size
        self.end = 0  # one past the highest byte written
        self.file_bytes = 0
        self.direct_bytes = 0
        self._padded = False
        self._partials: dict[int, _Partial] = {}
        self._sources: dict[str, int] = {}

    @property
    def direct(self) -> bool:
        """Whether whole blocks still go around the page cache."""
        if self._disk is not None and self._disk.refused:
            self._give_up_direct()
        return self._disk is not None

    # -- the two kinds of input ---------------------------------------------------------------
    def write_buffer(self, offset: int, b) -> None:
        """Write all of buffer ``b`` at ``offset``."""
        mv = memoryview(b)
        mv = mv.cast("B") if mv.ndim != 1 or mv.format != "B" else mv
        n = len(mv)
        if n == 0:
            return
        self.end = max(self.end, offset + n)
        lo, hi = _whole_blocks(offset, n)
        if not self.direct or lo >= hi and not self._holds(offset, n):
            _pwrite_all(self.fd, mv, offset)
            return
        if lo >= hi:
            self._keep(offset, mv)
            return
        self._keep(offset, mv[:lo - offset])
        self._keep(hi, mv[hi - offset:])
        for pos in range(lo, hi, STAGE_BYTES):
            k = min(STAGE_BYTES, hi - pos)
            buf = self._disk.buffer()
            memoryview(buf)[:k] = mv[pos - offset:pos - offset + k]
            self._disk.submit(buf, k, pos)

    def write_from_file(self, offset: int, src: str, src_offset: int, nbytes: int) -> None:
        """Write ``nbytes`` of file ``src`` from ``src_offset`` at ``offset``: read into a
        staging buffer from the input's page cache, or copied file to file by the kernel
        where the output goes through the page cache."""
        if nbytes == 0:
            return
        self.end = max(self.end, offset + nbytes)
        self.file_bytes += nbytes
        lo, hi = _whole_blocks(offset, nbytes)
        if not self.direct or lo >= hi and not self._holds(offset, nbytes):
            _kernel_copy(src, src_offset, self.fd, nbytes, offset)
            return
        sfd = self._source(src)
        if lo >= hi:
            self._keep(offset, _pread_exact(sfd, nbytes, src_offset, src))
            return
        self._keep(offset, _pread_exact(sfd, lo - offset, src_offset, src))
        self._keep(hi, _pread_exact(sfd, offset + nbytes - hi, src_offset + hi - offset, src))
        for pos in range(lo, hi, STAGE_BYTES):
            k = min(STAGE_BYTES, hi - pos)
            buf = self._disk.buffer()
            _preadv_exact(sfd, memoryview(buf)[:k], src_offset + pos - offset, src)
            self._disk.submit(buf, k, pos)

    # -- blocks ---------------------------------------------------------------------------------
    def _holds(self, offset: int, n: int) -> bool:
        return offset // BLOCK in self._partials or (offset + n - 1) // BLOCK in self._partials

    def _keep(self, offset: int, b: memoryview | bytes) -> None:
        """Hold ``b`` (inside whole blocks' edges: at most two blocks) until its blocks fill."""
        mv = memoryview(b)
        while len(mv):
            k, at = divmod(offset, BLOCK)
            take = min(len(mv), BLOCK - at)
            if not self.direct:
                _pwrite_all(self.fd, mv[:take], offset)
            else:
                p = self._partials.get(k)
                if p is None:
                    if len(self._partials) >= MAX_HELD_BLOCKS:
                        oldest = next(iter(self._partials))
                        self._write_ranges(oldest, self._partials.pop(oldest))
                    p = self._partials[k] = _Partial()
                p.add(at, mv[:take], self.path)
                self._flush_if_complete(k)
            offset += take
            mv = mv[take:]

    def _flush_if_complete(self, k: int) -> None:
        p = self._partials[k]
        want = BLOCK if self.size is None or (k + 1) * BLOCK <= self.size \
            else self.size - k * BLOCK
        if p.covered != want:
            return
        del self._partials[k]
        buf = self._disk.buffer()
        buf[:BLOCK] = bytes(p.data) if want == BLOCK else bytes(p.data[:want]).ljust(BLOCK, b"\0")
        self._disk.submit(buf, BLOCK, k * BLOCK)
        self._padded = self._padded or want < BLOCK  # cut back to ``size`` at close

    def _write_ranges(self, k: int, p: _Partial) -> None:
        for a, z in p.ranges:
            _pwrite_all(self.fd, memoryview(p.data)[a:z], k * BLOCK + a)

    def _give_up_direct(self) -> None:
        disk, self._disk = self._disk, None
        disk.drain()
        disk.stop()
        os.close(self._dfd)
        self.direct_bytes += disk.bytes
        held, self._partials = self._partials, {}
        for k, p in held.items():
            self._write_ranges(k, p)

    def _source(self, src: str) -> int:
        if src not in self._sources:
            self._sources[src] = os.open(src, os.O_RDONLY)
        return self._sources[src]

    # -- end --------------------------------------------------------------------------------------
    def close(self, size: int | None = None) -> None:
        """Give out what is held: blocks complete at the final ``size`` (default: the end of
        what was written) whole, the rest as the byte ranges this writer was given; wait for
        the disk."""
        if self.fd < 0:
            return
        try:
            if self.direct:
                self.size = size if size is not None else (
                    self.size if self.size is not None else self.end)
                for k in sorted(self._partials):
                    self._flush_if_complete(k)
            for k, p in sorted(self._partials.items()):
                self._write_ranges(k, p)
            self._partials.clear()
            if self._disk is not None:
                self._disk.drain()
            if self._padded:  # a short last block went out padded to a whole block
                os.ftruncate(self.fd, self.size)
        finally:
            if self._disk is not None:
                self._disk.stop()
                os.close(self._dfd)
                self.direct_bytes += self._disk.bytes
                self._disk = None
            for fd in self._sources.values():
                os.close(fd)
            os.close(self.fd)
            self.fd, self._sources = -1, {}

    def __enter__(self) -> BlockWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _whole_blocks(offset: int, n: int) -> tuple[int, int]:
    """The block-aligned byte range [lo, hi) inside [offset, offset + n)."""
    lo = -(-offset // BLOCK) * BLOCK
    hi = (offset + n) // BLOCK * BLOCK
    return lo, hi


def _pwrite_all(fd: int, mv: memoryview, offset: int) -> None:
    done = 0
    while done < len(mv):
        n = os.pwrite(fd, mv[done:], offset + done)
        if n <= 0:
            raise OSError(f"pwrite at byte {offset + done} wrote nothing")
        done += n


def _pread_exact(fd: int, n: int, offset: int, path: str) -> bytes:
    parts, done = [], 0
    while done < n:
        b = os.pread(fd, n - done, offset + done)
        if not b:
            raise OSError(f"{path} ends before byte {offset + n}")
        parts.append(b)
        done += len(b)
    return b"".join(parts)


def _preadv_exact(fd: int, mv: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < len(mv):
        k = os.preadv(fd, [mv[done:]], offset + done)
        if k <= 0:
            raise OSError(f"{path} ends before byte {offset + len(mv)}")
        done += k


def _kernel_copy(src: str | os.PathLike, src_offset: int, dst_fd: int, nbytes: int,
                 dst_offset: int) -> None:
    """``nbytes`` of ``src`` copied file to file by the kernel to ``dst_offset`` of ``dst_fd``
    (``copy_file_range``, else ``sendfile``)."""
    with open(Path(src), "rb", buffering=0) as f:
        fd, done = f.fileno(), 0
        while done < nbytes:
            at = dst_offset + done
            try:
                k = os.copy_file_range(fd, dst_fd, nbytes - done, src_offset + done, at)
            except OSError:  # e.g. across filesystems on old kernels: sendfile does the same
                os.lseek(dst_fd, at, os.SEEK_SET)
                k = os.sendfile(dst_fd, fd, src_offset + done, nbytes - done)
            if k <= 0:
                raise OSError(f"{src} ends before byte {src_offset + nbytes}")
            done += k
