"""Training objectives by name: ``mvlm pt`` and ``mvlm sft`` pick theirs from :data:`OBJECTIVES`.

Entries are ``"module:Class"`` strings, imported on first use, so listing or validating names
(``mvlm sft --help``) imports neither torch nor Megatron-Core. How an objective plugs in:
:mod:`mvlm.train.objectives.base`.
"""
from __future__ import annotations

import importlib
from typing import Any

OBJECTIVES: dict[str, str] = {
    "sft": "mvlm.train.objectives.sft:SFTObjective",
    "pt": "mvlm.train.objectives.pt:PTObjective",
}


def objective_names() -> list[str]:
    return sorted(OBJECTIVES)


def get_objective(name: str, **kwargs: Any):
    """A new instance of the objective registered as ``name``."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown training objective {name!r}: registered are "
                         f"{objective_names()} (add one to OBJECTIVES in "
                         "mvlm/train/objectives/__init__.py)")
    module, cls = OBJECTIVES[name].split(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)
