"""Qwen2 chat template: ChatML with the default system prompt "You are a helpful assistant."
(the generic :class:`~mvlm.data.template.Template` as is; the checkpoint's own chat template is
checked against it at construction)."""
from __future__ import annotations

from mvlm.data.template import Template


class Qwen2Template(Template):
    family = "qwen2"
