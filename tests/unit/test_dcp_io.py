"""mvlm's torch_dist writer and direct reader (mvlm.convert.dcp_save / dcp_load), one rank.

The writer must produce a directory Megatron-Core's own loader reads back bit-exactly; the
reader must fill whole shards and row slices straight from the file and hand every other
request (column slices, dtype changes) to PyTorch's reader, with the same bytes either way.
Multi-rank round trips through these paths: tests/dist/test_convert_roundtrip.py,
tests/dist/test_resume_layouts.py.
"""
from __future__ import annotations

import pytest
import torch


def _sd(tensors: dict, fragments: dict | None = None) -> dict:
    """Sharded state dict: each tensor whole, or (axis, index, count) of it."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out = {}
    for k, t in tensors.items():
        frag = (fragments or {}).get(k)
        out[k] = (ShardedTensor.from_rank_offsets(k, t, frag, replica_id=0) if frag
                  else ShardedTensor.from_rank_offsets(k, t, replica_id=0))
    return out


def test_write_then_read_direct_and_fallback(one_rank, tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    from mvlm.convert.dcp_load import DirectFileSystemReader, DirectTorchDistLoad
    from mvlm.convert.dcp_save import InProcessTorchDistSave

    g = torch.Generator().manual_seed(0)
    full = {"w": torch.randn(8, 6, generator=g).to(torch.bfloat16),
            "b": torch.randn(5, generator=g), "s": torch.tensor(3.5)}
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    dist_checkpointing.save(_sd(full), str(ckpt), sharded_strategy=InProcessTorchDistSave())
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp"]
    # Megatron-Core's own default loader reads what the in-process writer wrote.
    back = dist_checkpointing.load(_sd({k: torch.zeros_like(v) for k, v in full.items()}),
                                   str(ckpt))
    assert all(torch.equal(back[k], full[k]) for k in full)

    paths = []
    orig = DirectFileSystemReader._read_direct

    def spy(self, f, req, planner):
        ok = orig(self, f, req, planner)
        paths.append((req.storage_index.fqn, ok))
        return ok

    monkeypatch.setattr(DirectFileSystemReader, "_read_direct", spy)

    def load(tensors, fragments=None):
        paths.clear()
        # one rank reading a fragment: the group-wide "every shard read once" check would fail
        return dist_checkpointing.load(_sd(tensors, fragments), str(ckpt),
                                       sharded_strategy=DirectTorchDistLoad(),
                                       validate_access_integrity=fragments is None)

    # whole tensors: every one read directly into the destination
    got = load({k: torch.zeros_like(v) for k, v in full.items()})
    assert all(torch.equal(got[k], full[k]) for k in full)
    assert sorted(paths) == [("b", True), ("s", True), ("w", True)]
    # a row slice (second half of dim 0, as a TP rank of a column-parallel layer): direct
    got = load({"w": torch.zeros(4, 6, dtype=torch.bfloat16)}, {"w": (0, 1, 2)})
    assert torch.equal(got["w"], full["w"][4:]) and paths == [("w", True)]
    # a column slice is not one byte range: PyTorch's reader, same values
    got = load({"w": torch.zeros(8, 3, dtype=torch.bfloat16)}, {"w": (1, 1, 2)})
    assert torch.equal(got["w"], full["w"][:, 3:]) and paths == [("w", False)]
    # another dtype than stored: PyTorch's reader casts
    got = load({"w": torch.zeros(8, 6)})
    assert torch.equal(got["w"], full["w"].float()) and paths == [("w", False)]


def test_pass_through_params_are_mapped_not_copied(tmp_path, monkeypatch):
    """`--to mcore` points unchanged parameters at the memory-mapped HF file (no copy): a row
    slice of one tensor is mapped with its own storage (else DCP's saver clones it), the
    loader's read into it is a no-op, writes stay private (copy-on-write), and what needs a
    transform (QKV interleave, column slice, dtype change) is left to the loader."""
    from safetensors.torch import save_file

    from mvlm.convert import bridge, command
    from mvlm.convert.hf_io import SafetensorsReader, release_file_maps
    from mvlm.convert.mapping import QKV, Column, Row, ShardCtx

    g = torch.Generator().manual_seed(0)
    t = {n: torch.randn(8, 6, generator=g) for n in ("w", "r", "q", "k", "v")}
    save_file(t, str(tmp_path / "model.safetensors"))
    reader = SafetensorsReader(tmp_path)
    view = reader.map_view("w", 0, 4, 8)
    assert torch.equal(view, t["w"][4:]) and view.untyped_storage().nbytes() == view.nbytes
    assert reader.map_view("w", 1, 0, 3) is None  # column slice: not one byte run
    assert torch.equal(reader.map_view("w", 1, 0, 6), t["w"])  # whole rows are
    monkeypatch.setattr(SafetensorsReader, "_read", lambda *a: pytest.fail("copied"))
    reader.read_into("w", view, 0, 4, 8)  # already the file's bytes: nothing to do
    monkeypatch.undo()
    view.zero_()  # copy-on-write: the file keeps its bytes
    assert torch.equal(SafetensorsReader(tmp_path).read("w", 0, 4, 8), t["w"][4:])

    ctx = ShardCtx(tp_rank=1, tp_size=2, vocab_size=8, vocab_padded=8, num_heads=4,
                   num_kv_heads=2, head_dim=1)
    entries = [bridge.ParamEntry(n, n, torch.nn.Parameter(torch.empty(s, dtype=d)), m, {})
               for n, s, d, m in [("a", (4, 6), torch.float32, Column("a", "w")),
                                  ("b", (8, 3), torch.float32, Row("b", "r")),
                                  ("c", (4, 6), torch.bfloat16, Column("c", "w")),
                                  ("d", (8, 6), torch.float32, QKV("d", "q", "k", "v"))]]
    monkeypatch.setattr(bridge, "param_entries", lambda bundle: entries)
    monkeypatch.setattr(bridge, "shard_ctx", lambda bundle, m: ctx)
    try:
        assert command.map_unchanged_params(None, tmp_path) == 4 * 6 * 4
    finally:
        release_file_maps()
    a = entries[0].param
    assert torch.equal(a, t["w"][4:]) and a.untyped_storage().nbytes() == a.nbytes
    assert [e.param.untyped_storage().nbytes() for e in entries[1:]] == [96, 48, 192]
