"""CHORD under pipeline parallelism (mvlm.train.objectives.grpo): the expert micro-batch is cut
into micro-batches of the GRPO rows' count (the last filled with empty rows) and every
micro-batch is right-padded to one length, with nothing to predict and nothing attended in the
padding, so the loss is unchanged (PP2 = one rank: tests/dist/test_grpo_objective.py)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from mvlm.train.objectives.grpo import _pad_seq, _rows_like

PAD = 7


def _trainer():
    return SimpleNamespace(pad_id=PAD, bundle=SimpleNamespace(
        family=SimpleNamespace(is_vlm=False), hf_config=None))


def _expert(rows: int, seq: int, mrope: bool) -> dict:
    ids = torch.arange(rows * seq).reshape(rows, seq) + 100
    pos = torch.arange(seq).expand(rows, seq)
    return {"input_ids": ids, "labels": ids + 1,
            "attention_mask": torch.ones(rows, seq, dtype=torch.bool),
            "position_ids": pos.expand(3, rows, seq).clone() if mrope else pos.clone()}


def test_expert_rows_split_and_filled():
    for mrope in (False, True):
        e = _expert(3, 5, mrope)
        parts = _rows_like(e, 2, _trainer())
        assert [p["input_ids"].shape for p in parts] == [torch.Size([2, 5])] * 2
        d = 1 if mrope else 0
        assert parts[1]["position_ids"].shape[d] == 2
        for k in e:
            joined = torch.cat([p[k] for p in parts], dim=d if k == "position_ids" else 0)
            real = joined.narrow(d if k == "position_ids" else 0, 0, 3)
            assert torch.equal(real, e[k]), k
        empty = {k: v[-1] if v.dim() == 2 else v[:, -1] for k, v in parts[1].items()}
        assert (empty["input_ids"] == PAD).all() and (empty["labels"] == -100).all()
        assert not empty["attention_mask"].any() and (empty["position_ids"] == 0).all()
    e = _expert(2, 5, False)
    assert _rows_like(e, 2, _trainer()) == [e]


def test_pad_seq_pads_every_per_token_key():
    b = {"input_ids": torch.ones(2, 3, dtype=torch.long),
         "labels": torch.ones(2, 3, dtype=torch.long),
         "attention_mask": torch.ones(2, 3, dtype=torch.bool),
         "position_ids": torch.ones(3, 2, 3, dtype=torch.long),
         "completion_mask": torch.ones(2, 3), "old_logps": -torch.ones(2, 3),
         "rollout_logps": -torch.ones(2, 3), "advantages": torch.ones(2)}
    out = _pad_seq(b, 5, PAD)
    assert out["input_ids"][:, 3:].eq(PAD).all() and out["labels"][:, 3:].eq(-100).all()
    assert not out["attention_mask"][:, 3:].any() and out["position_ids"].shape == (3, 2, 5)
    for k in ("completion_mask", "old_logps", "rollout_logps"):
        assert out[k].shape == (2, 5) and out[k][:, 3:].eq(0).all()
        assert torch.equal(out[k][:, :3], b[k])
    assert out["advantages"] is b["advantages"]
    assert _pad_seq(b, 3, PAD) is b
