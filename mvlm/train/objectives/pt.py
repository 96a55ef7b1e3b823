"""``pt`` (continued pre-training): the same token-mean next-token cross-entropy as ``sft``.

What makes pre-training different is which tokens carry labels, and that is decided by the data
pipeline: ``mvlm pt`` renders rows with task ``pt``, which labels every text token (``--loss_scale
all`` does the same for ``mvlm sft``). The loss over whatever is labelled is the same reduction
as SFT's, so this objective reuses it under its own name: the run records and registry say
``pt``, and the numbers equal those of the pre-refactor trainer bit for bit.
"""
from __future__ import annotations

from mvlm.train.objectives.sft import SFTObjective


class PTObjective(SFTObjective):
    """Cross-entropy on every labelled text token (the ``pt`` data task labels all of them)."""

    name = "pt"
