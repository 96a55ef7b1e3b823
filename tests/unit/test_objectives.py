"""The objective registry and the sft/pt reduction (issue 10), in one process without a model."""
from __future__ import annotations

import pytest
import torch

from mvlm.train.objectives import OBJECTIVES, get_objective, objective_names
from mvlm.train.objectives.base import Objective, token_logps
from mvlm.train.objectives.sft import token_mean_loss


def test_registry_names_and_instances():
    assert {"sft", "pt"} <= set(objective_names())
    for name in ("sft", "pt"):
        obj = get_objective(name)
        assert isinstance(obj, Objective) and obj.name == name
        assert obj.metrics[0] == "lm_loss" and "labels" in obj.batch_keys
    assert get_objective("sft") is not get_objective("sft")  # a fresh instance per run
    with pytest.raises(ValueError, match="unknown training objective 'kto'.*OBJECTIVES"):
        get_objective("kto")
    assert all(":" in v for v in OBJECTIVES.values())


def test_check_batch_names_missing_keys():
    obj = get_objective("sft")
    obj.check_batch({"input_ids": 1, "position_ids": 2, "labels": 3})
    with pytest.raises(ValueError, match=r"objective 'sft' needs micro-batch keys \['labels'\]"):
        obj.check_batch({"input_ids": 1, "position_ids": 2})


def test_token_mean_loss_is_sum_and_count():
    per_token = torch.tensor([[1.5, 2.0, 0.0], [0.25, 0.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    loss_sum, n, rep = token_mean_loss(mask, per_token)
    assert float(loss_sum) == 7.75 and int(n) == 4 and n.dtype == torch.int32
    assert rep["lm_loss"].tolist() == [7.75, 4.0]
    assert torch.equal(token_logps(per_token), -per_token)


def test_an_objective_must_define_its_loss():
    class NoLoss(Objective):
        name = "no_loss"

    with pytest.raises(TypeError, match="abstract"):
        NoLoss()
