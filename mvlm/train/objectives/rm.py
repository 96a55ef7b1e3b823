"""Reward model on the Trainer (``mvlm rlhf --rlhf_type rm``): a scalar value head on the
Megatron model, the Bradley-Terry loss on chosen/rejected pairs, TRL's ``RewardTrainer``.

The head is HF's sequence-classification score: ``score.weight`` [1, hidden] without bias,
applied to the language model's last hidden state (after the final norm) at the last token of
each sequence. It is a parameter of the last pipeline stage's model (``mvlm_value_head``), added
before DDP and the optimizer are built (:meth:`RewardModelObjective.extend_model`), replicated
over TP (every TP rank holds the full hidden state there), initialised from the run's seed like
HF's ``_init_weights`` (normal, std ``initializer_range``), so every layout starts from the same
head.

Data are the pair rows of DPO, packed the same way (one forward per pair). The model is run
without labels; a forward hook on the LM head's input takes the final hidden states and the head
gives one value per position; each segment's reward is its last real token's value (under CP
only the rank holding that token contributes, and the rewards are all-reduced over CP with
autograd, as :func:`~mvlm.train.objectives.dpo.sequence_logps` does). The loss is
:func:`~mvlm.train.objectives.dpo_losses.reward_model_loss` (``--center_rewards_coefficient``
adds TRL's centring term); the unit is the pair.

Export (:mod:`mvlm.train.reward_export`): a family whose HF text model has a
``*ForSequenceClassification`` class is written in that layout (``score.weight`` instead of
``lm_head.weight``, ``architectures`` and ``num_labels: 1`` in the config); other families (the
VLMs) get ``value_head.safetensors`` beside the HF model. :func:`mvlm.rl.reward_model.
load_reward_model` reads both.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from mvlm.train.objectives import dpo_losses as dl
from mvlm.train.objectives.base import segment_sums
from mvlm.train.objectives.dpo import PairObjective
from mvlm.train.steps import unwrap

if TYPE_CHECKING:
    from mvlm.train.trainer import Trainer

HEAD = "mvlm_value_head"
RM_METRICS = ("loss", "accuracy", "margin", "mean_reward", "rewards/chosen", "rewards/rejected")


def value_head(model: Any) -> torch.nn.Linear | None:
    """The value head of a model chunk (None off the last stage)."""
    return getattr(unwrap(model), HEAD, None)


def add_value_head(bundle: Any, seed: int) -> None:
    """Give the last stage's (last virtual chunk's) model a [1, hidden] score head, initialised
    identically on every rank from ``seed``."""
    m = bundle.models[-1]
    if not m.post_process:
        return
    h = bundle.arch.hidden_size
    std = float(getattr(bundle.hf_config.get_text_config(), "initializer_range", 0.02) or 0.02)
    gen = torch.Generator().manual_seed(int(seed))
    w = torch.empty(1, h).normal_(0.0, std, generator=gen)
    dev = next(m.parameters()).device
    head = torch.nn.Linear(h, 1, bias=False, device=dev, dtype=bundle.config.params_dtype)
    with torch.no_grad():
        head.weight.copy_(w)
    setattr(m, HEAD, head)


def last_token_values(batch: dict, values: torch.Tensor) -> torch.Tensor:
    """Per-segment value at each segment's last real token, complete on every CP rank."""
    v = values.reshape(-1)
    seq_len = batch["input_ids"].shape[-1]
    cu = batch["cu_seqlens"].to(v.device).long()
    real = batch.get("cu_seqlens_unpadded")
    real = cu if real is None else torch.as_tensor(real, device=v.device).long()
    last = torch.full((seq_len,), -1, dtype=torch.long, device=v.device)
    last[real[1:] - 1] = torch.arange(len(cu) - 1, device=v.device)
    return segment_sums(v, last, len(cu) - 1)


class RewardModelObjective(PairObjective):
    """Bradley-Terry reward model (TRL RewardTrainer) with a value head on the Megatron model."""

    name = "rm"
    batch_keys: ClassVar[tuple[str, ...]] = ("input_ids", "position_ids", "cu_seqlens",
                                             "chosen_index", "rejected_index")
    metrics = RM_METRICS

    def __init__(self, center_rewards_coefficient: float | None = None, seed: int = 0):
        super().__init__(uses_reference=False)
        self.center_rewards_coefficient = center_rewards_coefficient
        self.seed = seed

    def extend_model(self, trainer: Trainer) -> None:
        cfg = trainer.cfg
        if cfg.tuner.train_type != "full":
            raise ValueError(f"--rlhf_type rm with --train_type {cfg.tuner.train_type}: the "
                             "reward model trains its value head with the full model only "
                             "(its export is a full HF model plus the head); use --train_type "
                             "full")
        if cfg.parallel.sequence_parallel:
            raise ValueError("--rlhf_type rm with --sequence_parallel: the value head reads "
                             "the whole sequence's last hidden states on every TP rank; drop "
                             "--sequence_parallel")
        add_value_head(trainer.bundle, self.seed if cfg.seed is None else cfg.seed)

    def setup(self, trainer: Trainer) -> None:
        return None

    def prepare_step(self, trainer: Trainer, batches: list[dict]) -> list[dict]:
        return self.share_prefix(trainer, batches)  # each pair's prompt once (shared_prefix.py)

    def model_output(self, model: Any, batch: dict) -> torch.Tensor:
        """Inner stages: hidden states. Last stage: the head's value at every position [b, s]."""
        m = unwrap(model)
        nolabels = {k: v for k, v in batch.items() if k != "labels"}
        if not m.post_process:
            return self.forward_pair(model, nolabels)
        seen: list[torch.Tensor] = []
        hook = m.language_model.output_layer.register_forward_hook(
            lambda mod, args, out: seen.append(args[0]))
        try:
            logits = self.forward_pair(model, nolabels)
        finally:
            hook.remove()
        hidden = seen[0]  # [s_local, b, h], after the final norm
        values = getattr(m, HEAD)(hidden).squeeze(-1).transpose(0, 1).float()  # [b, s_local]
        del logits  # the LM head's output is not read (the hook took its input)
        return values

    def pair_loss(self, batch: dict, output: torch.Tensor) -> dl.PreferenceLoss:
        r = last_token_values(batch, output)
        return dl.reward_model_loss(r[batch["chosen_index"]], r[batch["rejected_index"]],
                                    center_rewards_coefficient=self.center_rewards_coefficient)

    def before_export(self, trainer: Trainer):
        """The head leaves the model while the HF weights are written (it has no Megatron -> HF
        mapping); the returned callable puts it back and writes it in the HF directory."""
        from mvlm.train.reward_export import detach_value_head

        return detach_value_head(trainer)
