"""Kernel file-to-file copies and mapped (not read) checkpoint regions (mvlm.convert.file_maps).

Every fast path must give the bytes the plain path gives: a tensor over a copy-on-write map,
written through ``KernelCopyFile`` (torch.save, the torch_dist writer, the safetensors writer),
produces the same file as the tensor's own bytes written by ``write``; a page written to after
mapping turns the kernel copy off for that tensor; a checkpoint region mapped instead of read
holds the stored bytes and leaves the destination unread.
"""
from __future__ import annotations

import io

import pytest
import torch

from mvlm.convert import file_maps


@pytest.fixture
def small_copies(monkeypatch):
    monkeypatch.setattr(file_maps, "KERNEL_COPY_MIN_BYTES", 1)
    yield
    file_maps.release_file_maps()


def _mapped(tmp_path, tensors: dict) -> tuple[dict, dict]:
    """``tensors`` saved as safetensors, and each as a tensor over the file's map."""
    from safetensors.torch import save_file

    from mvlm.convert.hf_io import SafetensorsReader

    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = SafetensorsReader(tmp_path)
    return tensors, {k: reader.map_view(k) for k in tensors}


def _saved(t: torch.Tensor) -> bytes:
    b = io.BytesIO()
    torch.save(t, b)
    return b.getvalue()


def test_torch_save_through_kernel_copy_is_byte_equal(tmp_path, small_copies):
    g = torch.Generator().manual_seed(0)
    plain, mapped = _mapped(tmp_path, {"w": torch.randn(64, 48, generator=g).to(torch.bfloat16),
                                       "b": torch.randn(40, generator=g)})
    for k in plain:
        with file_maps.KernelCopyFile(tmp_path / f"{k}.pt") as f:
            torch.save(mapped[k], f)
            assert f.kernel_bytes == plain[k].nbytes  # the data went file to file
        assert (tmp_path / f"{k}.pt").read_bytes() == _saved(plain[k])
    # a write into the (copy-on-write) map: the file no longer holds the bytes, so they are
    # written from memory
    mapped["w"][3, 5] = 7.0
    with file_maps.KernelCopyFile(tmp_path / "w2.pt") as f:
        torch.save(mapped["w"], f)
        assert f.kernel_bytes == 0
    assert (tmp_path / "w2.pt").read_bytes() == _saved(mapped["w"].clone())
    assert not torch.equal(mapped["w"], plain["w"])
    # bytes outside any map (a fresh tensor): plain write
    fresh = plain["b"].clone()
    with file_maps.KernelCopyFile(tmp_path / "b2.pt") as f:
        torch.save(fresh, f)
        assert f.kernel_bytes == 0
    assert (tmp_path / "b2.pt").read_bytes() == _saved(plain["b"])


def test_unreadable_pagemap_falls_back_to_plain_writes(tmp_path, small_copies, monkeypatch):
    """Where /proc/self/pagemap cannot be read (another kernel, a sandbox) nothing proves the
    file still holds a map's bytes: every write goes from memory, the output is the same."""
    import builtins

    def no_pagemap(path, *a, **k):
        if str(path) == "/proc/self/pagemap":
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *a, **k)

    plain, mapped = _mapped(tmp_path, {"w": torch.arange(96, dtype=torch.float32)})
    with file_maps.KernelCopyFile(tmp_path / "w_ok.pt") as f:  # the control: a kernel copy
        torch.save(mapped["w"], f)
        assert f.kernel_bytes == plain["w"].nbytes
    monkeypatch.setattr(file_maps, "open", no_pagemap, raising=False)
    assert not file_maps.pages_unmodified(*file_maps.buffer_address(mapped["w"].numpy()))
    with file_maps.KernelCopyFile(tmp_path / "w.pt") as f:
        torch.save(mapped["w"], f)
        assert f.kernel_bytes == 0
    assert (tmp_path / "w.pt").read_bytes() == _saved(plain["w"])


def test_safetensors_writer_kernel_copy_is_byte_equal(tmp_path, small_copies):
    from safetensors.torch import load_file

    from mvlm.convert.hf_io import StreamingSafetensorsWriter

    g = torch.Generator().manual_seed(1)
    src = tmp_path / "src"
    src.mkdir()
    plain, mapped = _mapped(src, {"a": torch.randn(33, 17, generator=g),
                                  "e": torch.randn(100, 8, generator=g).to(torch.bfloat16)})
    specs = [(k, v.dtype, list(v.shape)) for k, v in plain.items()]
    outs = {}
    for tag, ts in (("plain", {k: v.clone() for k, v in plain.items()}), ("mapped", mapped)):
        w = StreamingSafetensorsWriter(tmp_path / f"{tag}.safetensors", specs)
        for k, _, _ in specs:
            w.write(k, ts[k])
        kernel = w._f.kernel_bytes
        w.close()
        outs[tag] = ((tmp_path / f"{tag}.safetensors").read_bytes(), kernel)
    assert outs["mapped"][0] == outs["plain"][0]
    assert outs["plain"][1] == 0 and outs["mapped"][1] == sum(v.nbytes for v in plain.values())
    back = load_file(str(tmp_path / "mapped.safetensors"))
    assert all(torch.equal(back[k], plain[k]) for k in plain)


def _sd(tensors: dict, mismatch: tuple = ()) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return {k: ShardedTensor.from_rank_offsets(k, t, replica_id=0,
                                               allow_shape_mismatch=k in mismatch)
            for k, t in tensors.items()}


def test_torch_dist_write_and_mapped_load(one_rank, tmp_path, small_copies, monkeypatch):
    """The torch_dist writer copies mapped tensors in the kernel (same .distcp bytes as from
    memory); a load with MappedReads maps the allowed whole tensors (destination left unread,
    the mapped tensor holds the stored bytes) and reads the rest; an allow_shape_mismatch
    tensor of the stored shape is read without being zeroed first, with the same result."""
    from megatron.core import dist_checkpointing

    from mvlm.convert import dcp_load
    from mvlm.convert.dcp_load import DirectTorchDistLoad, MappedReads
    from mvlm.convert.dcp_save import InProcessTorchDistSave

    monkeypatch.setattr(dcp_load, "MAP_MIN_BYTES", 1)
    g = torch.Generator().manual_seed(2)
    plain, mapped = _mapped(tmp_path, {"w": torch.randn(16, 12, generator=g),
                                       "e": torch.randn(20, 6, generator=g),
                                       "b": torch.randn(9, generator=g)})
    for tag, ts in (("mem", {k: v.clone() for k, v in plain.items()}), ("map", mapped)):
        (tmp_path / tag).mkdir()
        dist_checkpointing.save(_sd(ts), str(tmp_path / tag),
                                sharded_strategy=InProcessTorchDistSave())
    distcp = [(tmp_path / t / "__0_0.distcp").read_bytes() for t in ("mem", "map")]
    assert distcp[0] == distcp[1]

    dest = {k: torch.zeros_like(v) for k, v in plain.items()}
    zeroed = []
    orig_zero = torch.Tensor.zero_
    monkeypatch.setattr(torch.Tensor, "zero_",
                        lambda t: (zeroed.append(tuple(t.shape)), orig_zero(t))[1])
    maps = MappedReads([dest["w"], dest["e"]])
    got = dist_checkpointing.load(_sd(dest, mismatch=("e",)), str(tmp_path / "map"),
                                  sharded_strategy=DirectTorchDistLoad(maps))
    monkeypatch.undo()
    assert torch.equal(got["b"], plain["b"])  # not allowed: read
    assert not dest["w"].any() and not dest["e"].any()  # mapped instead of read
    swaps = {k: maps.swaps[(dest[k].data_ptr(), dest[k].dtype, tuple(dest[k].shape))]
             for k in ("w", "e")}
    assert all(torch.equal(swaps[k], plain[k]) for k in swaps)
    assert zeroed == []  # "e" has the stored shape: no zeroing pass
    # the flag is restored after the load
    sd = _sd(dest, mismatch=("e",))
    dist_checkpointing.load(sd, str(tmp_path / "map"), sharded_strategy=DirectTorchDistLoad())
    assert sd["e"].allow_shape_mismatch and torch.equal(dest["e"], plain["e"])
