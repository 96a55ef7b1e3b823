"""Qwen3(-MoE) chat template: ChatML without a default system prompt, and the hybrid-thinking
empty think block that ``--add_non_thinking_prefix`` / ``--loss_scale ignore_empty_think`` use."""
from __future__ import annotations

from mvlm.data.template import Template


class Qwen3MoeTemplate(Template):
    family = "qwen3_moe"
    default_system = None  # Qwen3 adds no default system prompt
    non_thinking_prefix = "<think>\n\n</think>\n\n"  # Qwen3 hybrid thinking (ms-swift's qwen3)
