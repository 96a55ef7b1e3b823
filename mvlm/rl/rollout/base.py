"""The rollout-engine interface GRPO talks to: prompts in, groups of sampled completions out.

An engine generates ``num_generations`` completions per prompt and returns, for every completion,
the token ids, the per-token log-probabilities of the sampled tokens, and why it stopped. It can
be given new policy weights. The built-in engine (:mod:`mvlm.rl.rollout.builtin`) samples on the
training model itself; vLLM engines implement the same interface.

Which log-probabilities, and why two of them
--------------------------------------------
The failure users of other frameworks report most is a silent mismatch between what the rollout
engine sampled and what the trainer computes. So an engine returns:

* ``logprobs``: ``log_softmax(logits / temperature)`` at the sampled token, over the whole
  vocabulary, *before* repetition penalty, top-k, top-p and suppressed tokens. This is exactly what
  the trainer computes from a full-sequence forward of the same tokens (TRL's and ms-swift's GRPO
  divide the logits by ``temperature`` before the log-softmax), so comparing the two measures the
  engine/trainer mismatch (``token_mult_prob_error``) and nothing else. With greedy decoding
  (``temperature == 0``) the logits are not scaled (temperature 1).
* ``sampling_logprobs``: the log-probability under the distribution the token was actually drawn
  from (after repetition penalty, temperature, top-k, top-p and suppression; vLLM's
  ``processed_logprobs``). It equals ``logprobs`` when none of those processors is active, and is
  0 for greedy decoding (the token was chosen with probability one).
"""
from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

StopReason = Literal["eos", "length"]


@dataclass
class SamplingParams:
    """How to sample, with ms-swift / TRL flag names (``--num_generations``,
    ``--max_completion_length``, ``--temperature``, ``--top_p``, ``--top_k``,
    ``--repetition_penalty``).

    ``temperature == 0`` means greedy decoding (argmax; vLLM's convention). ``top_k`` 0 or -1 and
    ``top_p`` 1.0 switch those filters off. ``seed`` makes the draw reproducible and identical on
    every rank of a model-parallel group; None lets the engine derive one from its own seed and
    call count (still identical across the group). ``suppress_token_ids`` can never be sampled
    (for example a VLM's image/video placeholder tokens, which must not appear in completions).
    """

    num_generations: int = 1
    max_completion_length: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0
    seed: int | None = None
    suppress_token_ids: Sequence[int] = ()

    def __post_init__(self) -> None:
        if self.num_generations < 1:
            raise ValueError(f"--num_generations must be >= 1, got {self.num_generations}")
        if self.max_completion_length < 1:
            raise ValueError(
                f"--max_completion_length must be >= 1, got {self.max_completion_length}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0:
            self.top_k = -1
        if self.top_k < -1:
            raise ValueError(f"--top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"--repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class RolloutPrompt:
    """One prompt, already encoded: token ids (with the generation prompt of the chat template)
    and, for a VLM, the media batch tensors of this prompt alone (e.g. ``pixel_values`` and
    ``image_grid_thw``, as the family's processor produces them)."""

    input_ids: Sequence[int]
    media: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.input_ids) == 0:
            raise ValueError("RolloutPrompt.input_ids is empty: every prompt needs >= 1 token")


@dataclass
class Completion:
    """One sampled completion. ``token_ids`` include the EOS token when ``stop_reason == "eos"``;
    ``logprobs`` / ``sampling_logprobs`` have one entry per token (see the module docstring)."""

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]
    sampling_logprobs: list[float]
    stop_reason: StopReason


@dataclass
class RolloutGroup:
    """The ``num_generations`` completions of one prompt, in generation order."""

    prompt_index: int
    completions: list[Completion]


class RolloutEngine(abc.ABC):
    """What GRPO needs from a rollout engine.

    Collective: in a model-parallel run every rank of the model-parallel group calls
    :meth:`generate` with the same prompts and parameters and gets the same result back.
    """

    @abc.abstractmethod
    def generate(self, prompts: Sequence[RolloutPrompt], params: SamplingParams
                 ) -> list[RolloutGroup]:
        """``params.num_generations`` completions for each prompt, one group per prompt."""

    @abc.abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load new policy weights given as (Hugging Face name, full tensor) pairs, the stream
        :func:`mvlm.convert.stream.iter_hf_tensors` yields. Returns the new weight version."""

    @property
    @abc.abstractmethod
    def weight_version(self) -> int:
        """Increases by one on every :meth:`load_weights`; rollouts can be tagged with it."""


def token_mult_prob_error(engine_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor,
                          mask: torch.Tensor | None = None) -> tuple[float, float]:
    """(mean exp|Δlogp|, max |Δlogp|) over the masked tokens: 1.0 and 0.0 mean the engine and
    the trainer agree exactly on every sampled token's probability."""
    d = (engine_logprobs.double() - trainer_logprobs.double()).abs()
    if mask is not None:
        d = d[mask.bool()]
    if d.numel() == 0:
        raise ValueError("token_mult_prob_error over zero tokens: the mask selects nothing")
    return float(d.exp().mean()), float(d.max())
