"""Packing, collation and the resumable sampler at the data level."""
import numpy as np
import pytest
import torch

from mvlm.data.collate import (
    Collator,
    collate_packed,
    collate_packed_rows,
    collate_padded,
    pad_samples_for_cp,
    shift_labels,
    unpack,
)
from mvlm.data.loader import ResumableDistributedSampler, build_dataloader
from mvlm.data.packing import PackedDataset, pack_lengths, pack_stream, packing_efficiency
from mvlm.runtime.cp import cp_chunk_indices, cp_packed_indices


def _sample(n, seed, prompt=3, vision=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 100, (n,), generator=g)
    labels = ids.clone()
    labels[:prompt] = -100
    pos = torch.arange(n).expand(3, -1).clone()
    pos[1] += seed  # make rows distinguishable, like mRoPE
    s = {"input_ids": ids, "labels": labels, "position_ids": pos, "length": n}
    if vision:
        s["pixel_values"] = torch.full((vision, 6), float(seed))
        s["image_grid_thw"] = torch.tensor([[1, 2, vision // 2]])
    return s


def test_packed_batch_positions_cu_seqlens_and_labels():
    samples = [_sample(7, 1, vision=4), _sample(5, 2), _sample(9, 3, vision=2)]
    b = collate_packed(samples, pad_token_id=0, pad_to_multiple_of=8)
    assert b["input_ids"].shape == (1, 24) and b["position_ids"].shape == (3, 1, 24)
    assert b["cu_seqlens"].tolist() == [0, 7, 12, 21] and b["max_seqlen"] == 9
    assert b["cu_seqlens"].dtype == torch.int32 and b["num_samples"] == 3
    assert "attention_mask" not in b
    cu = b["cu_seqlens"].tolist()
    for k, s in enumerate(samples):
        a, e = cu[k], cu[k + 1]
        assert torch.equal(b["input_ids"][0, a:e], s["input_ids"])
        assert torch.equal(b["position_ids"][:, 0, a:e], s["position_ids"])  # restart per sample
        assert b["position_ids"][0, 0, a] == 0
        # labels never cross samples: the last position of each sample has no target
        assert b["labels"][0, e - 1] == -100
        assert torch.equal(b["labels"][0, a:e], shift_labels(s["labels"]))
    assert (b["labels"][0, 21:] == -100).all() and (b["input_ids"][0, 21:] == 0).all()
    assert (b["position_ids"][:, 0, 21:] == 0).all()
    assert torch.equal(b["loss_mask"], (b["labels"] != -100).float())
    parts = unpack(b)
    assert [p["span"] for p in parts] == [(0, 7), (7, 12), (12, 21)]
    assert torch.equal(parts[1]["input_ids"], samples[1]["input_ids"])
    # images stay with their sample, in sample order
    assert b["pixel_values"][:, 0].tolist() == [1.0] * 4 + [3.0] * 2
    assert b["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 1]]


def test_packed_loss_equals_unpacked():
    """Token-level CE summed over the packed row equals the per-sample sums (same targets)."""
    samples = [_sample(n, i) for i, n in enumerate([6, 11, 4])]
    vocab = 100
    logits_per = [torch.randn(len(s["input_ids"]), vocab, generator=torch.Generator()
                              .manual_seed(i)) for i, s in enumerate(samples)]
    ce = torch.nn.functional.cross_entropy
    ref = sum(ce(lg, shift_labels(s["labels"]), ignore_index=-100, reduction="sum")
              for lg, s in zip(logits_per, samples))
    b = collate_packed(samples, 0, pad_to_multiple_of=4)
    logits = torch.cat(logits_per + [torch.zeros(b["input_ids"].shape[1] - 21, vocab)])
    got = ce(logits, b["labels"][0], ignore_index=-100, reduction="sum")
    assert torch.allclose(got, ref)
    assert int(b["loss_mask"].sum()) == sum(int((shift_labels(s["labels"]) != -100).sum())
                                            for s in samples)


def test_padded_batch():
    samples = [_sample(5, 1), _sample(3, 2, vision=2)]
    b = collate_padded(samples, pad_token_id=0, pad_to_multiple_of=4)
    assert b["input_ids"].shape == (2, 8) and b["attention_mask"].dtype == torch.bool
    assert b["attention_mask"].sum(1).tolist() == [5, 3]
    assert "cu_seqlens" not in b and b["pixel_values"].shape == (2, 6)
    assert (b["position_ids"][:, 1, 3:] == 0).all()


def test_text_only_batch_has_no_vision_keys():
    b = Collator(0, packing=True)([[_sample(4, 1), _sample(4, 2)]])
    assert not any(k in b for k in ("pixel_values", "image_grid_thw", "pixel_values_videos"))


def test_bin_packing_utilisation_on_realistic_mix():
    rng = np.random.default_rng(0)
    # long-tailed chat lengths (lognormal, median ~400) plus a few near-max samples
    lengths = np.clip(rng.lognormal(6.0, 0.8, 5000).astype(int), 16, 4096).tolist()
    packs = pack_lengths(lengths, 4096)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= 4096 for p in packs)
    eff = packing_efficiency(lengths, packs, 4096)
    assert eff >= 0.95, eff
    assert pack_lengths(lengths, 4096) == packs  # deterministic
    streamed = list(pack_stream(({"input_ids": [0] * n} for n in lengths), 4096, window=2000))
    assert sum(len(p) for p in streamed) == len(lengths)


def test_cp_split_load_balanced():
    idx = [cp_chunk_indices(16, 2, r).tolist() for r in range(2)]
    assert idx == [[0, 1, 2, 3, 12, 13, 14, 15], [4, 5, 6, 7, 8, 9, 10, 11]]
    samples, cu = pad_samples_for_cp([_sample(5, 1), _sample(8, 2)], cp_size=2, pad_token_id=0)
    assert cu.tolist() == [0, 8, 16]
    b = collate_packed(samples, 0)
    got = sorted(cp_packed_indices(cu, 2, 0).tolist() + cp_packed_indices(cu, 2, 1).tolist())
    assert got == list(range(16))
    with pytest.raises(ValueError, match="multiple of 2"):
        cp_chunk_indices(10, 2, 0)
    assert b["labels"][0, 4:8].eq(-100).all()
    # through the Collator: per-sample padding, tail to 2*CP*TP, the row fully covered
    b = Collator(0, packing=True, pad_to_multiple_of=8, cp_size=2)([[_sample(5, 1),
                                                                     _sample(9, 2)]])
    assert b["cu_seqlens"].tolist() == [0, 8, 20]
    assert b["cu_seqlens_unpadded"].tolist() == [0, 5, 14]
    s = b["input_ids"].shape[1]
    assert s == 24 and b["max_seqlen"] == 9
    got = sorted(sum((cp_packed_indices(b["cu_seqlens"], 2, r, s).tolist() for r in range(2)),
                     []))
    assert got == list(range(s))
    assert (b["labels"][0, 5:8] == -100).all() and (b["position_ids"][:, 0, 5:8] == 0).all()


def _stream(sampler, steps):
    it = iter(sampler)
    return [next(it) for _ in range(steps)]


@pytest.mark.parametrize("shuffle", [True, False])
def test_resume_order_equals_uninterrupted(shuffle):
    n, mbs, dp = 37, 2, 3
    full = {r: _stream(ResumableDistributedSampler(n, micro_batch_size=mbs, dp_rank=r,
                                                   dp_size=dp, shuffle=shuffle, seed=7), 20)
            for r in range(dp)}
    for k_steps in (1, 6, 13):  # 13 steps crosses the epoch boundary (13*6 > 37)
        for r in range(dp):
            resumed = _stream(ResumableDistributedSampler(
                n, micro_batch_size=mbs, dp_rank=r, dp_size=dp, shuffle=shuffle, seed=7,
                consumed_samples=k_steps * mbs * dp), 20 - k_steps)
            assert resumed == full[r][k_steps:]
    # ranks partition each step; each epoch is a permutation
    first_epoch = []
    for step in range(6):
        for r in range(dp):
            first_epoch += full[r][step]
    assert len(set(first_epoch)) == 36


def test_dataloader_resume():
    data = [_sample(4 + i % 5, i) for i in range(20)]
    coll = Collator(0, packing=False)
    a = [b["input_ids"] for _, b in zip(range(8), build_dataloader(data, coll,
                                                                   micro_batch_size=2))]
    b = [x["input_ids"] for _, x in zip(range(5), build_dataloader(data, coll, micro_batch_size=2,
                                                                   consumed_samples=6))]
    assert all(torch.equal(x, y) for x, y in zip(a[3:], b))


def test_micro_batch_of_n_packed_rows_is_one_concatenated_row():
    """N packed rows per micro-batch -> one row: every sample keeps its own segment, positions,
    shifted labels and images, exactly as in its own micro-batch of one row."""
    rows = [[_sample(7, 1, vision=4), _sample(5, 2)], [_sample(9, 3, vision=2)],
            [_sample(3, 4), _sample(6, 5)]]
    coll = Collator(0, packing=True, pad_to_multiple_of=8)
    b = coll(rows)
    flat = [s for r in rows for s in r]
    assert b["num_rows"] == 3 and b["num_samples"] == 5
    assert b["input_ids"].shape == (1, 32)  # 30 tokens, tail padded to the multiple of 8
    assert b["cu_seqlens"].tolist() == [0, 7, 12, 21, 24, 30] and b["max_seqlen"] == 9
    assert "attention_mask" not in b
    ref = collate_packed(flat, 0, pad_to_multiple_of=8)
    for k in ("input_ids", "labels", "loss_mask", "position_ids", "cu_seqlens", "pixel_values",
              "image_grid_thw"):
        assert torch.equal(b[k], ref[k]), k
    # the same tokens, positions and targets as the rows collated one per micro-batch
    singles = [coll([r]) for r in rows]
    for part, sub in zip(unpack(b), (p for sb in singles for p in unpack(sb)), strict=True):
        for k in ("input_ids", "labels", "loss_mask", "position_ids"):
            assert torch.equal(part[k], sub[k]), k
    assert sum(int(sb["loss_mask"].sum()) for sb in singles) == int(b["loss_mask"].sum())
    assert torch.equal(torch.cat([sb["pixel_values"] for sb in singles if "pixel_values" in sb]),
                       b["pixel_values"])
    assert (b["labels"][0, 30:] == -100).all() and (b["position_ids"][:, 0, 30:] == 0).all()
    assert collate_packed_rows(rows, 0, 8)["cu_seqlens"].tolist() == b["cu_seqlens"].tolist()
    with pytest.raises(ValueError, match="at least one sample"):
        collate_packed_rows([[]], 0)


def test_micro_batch_of_n_packed_rows_under_cp():
    """CP: every sample of every row is padded to a multiple of 2*CP on its own, so the whole-row
    split and the per-sample (THD) split both cover the concatenated row exactly."""
    rows = [[_sample(5, 1), _sample(9, 2)], [_sample(6, 3)]]
    b = Collator(0, packing=True, pad_to_multiple_of=8, cp_size=2)(rows)
    assert b["cu_seqlens"].tolist() == [0, 8, 20, 28]
    assert b["cu_seqlens_unpadded"].tolist() == [0, 5, 14, 20]
    assert b["input_ids"].shape[1] == 32 and b["max_seqlen"] == 9 and b["num_rows"] == 2
    s = b["input_ids"].shape[1]
    got = sorted(sum((cp_packed_indices(b["cu_seqlens"], 2, r, s).tolist() for r in range(2)),
                     []))
    assert got == list(range(s))
    one = Collator(0, packing=True, pad_to_multiple_of=8, cp_size=2)([rows[1]])
    assert torch.equal(b["input_ids"][0, 20:26], one["input_ids"][0, :6])
    assert torch.equal(b["labels"][0, 20:28], one["labels"][0, :8])


def test_packed_loader_micro_batch_n_takes_n_rows_of_the_stream():
    """micro_batch_size=2 over packed rows sees the rows that two micro-batches of 1 see, in the
    same order: the global batch counts packed rows either way."""
    data = [_sample(3 + i % 4, i) for i in range(12)]
    packs = pack_lengths([len(s["input_ids"]) for s in data], 12)
    ds = PackedDataset(data, packs)
    coll = Collator(0, packing=True)
    one = [b for _, b in zip(range(4), build_dataloader(ds, coll, micro_batch_size=1, seed=3))]
    two = [b for _, b in zip(range(2), build_dataloader(ds, coll, micro_batch_size=2, seed=3))]
    for k, b in enumerate(two):
        a, c = one[2 * k], one[2 * k + 1]
        n = int(a["cu_seqlens"][-1])
        assert torch.equal(b["input_ids"][0, :n], a["input_ids"][0, :n])
        assert torch.equal(b["input_ids"][0, n:n + int(c["cu_seqlens"][-1])],
                           c["input_ids"][0, :int(c["cu_seqlens"][-1])])
        assert b["num_samples"] == a["num_samples"] + c["num_samples"] and b["num_rows"] == 2
    resumed = next(iter(build_dataloader(ds, coll, micro_batch_size=2, seed=3,
                                         consumed_samples=2)))
    assert torch.equal(resumed["input_ids"], two[1]["input_ids"])
