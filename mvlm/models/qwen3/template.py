"""Qwen3 chat template: ChatML without a default system prompt, and the hybrid-thinking empty
think block that ``--add_non_thinking_prefix`` / ``--loss_scale ignore_empty_think`` use."""
from __future__ import annotations

from mvlm.data.template import Template


class Qwen3Template(Template):
    family = "qwen3"
    default_system = None  # Qwen3 adds no default system prompt
    non_thinking_prefix = "<think>\n\n</think>\n\n"  # what enable_thinking=false renders
