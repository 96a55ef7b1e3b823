"""Gemma chat template: ``<bos>``, then ``<start_of_turn>ROLE\\nCONTENT<end_of_turn>\\n`` with the
assistant's role written ``model``; no system role, so a system prompt opens the first user turn
followed by a blank line (Gemma 3's rule); no default system prompt. Loss on the answer and its
``<end_of_turn>``."""
from __future__ import annotations

from mvlm.data.template import Template


class GemmaTemplate(Template):
    family = "gemma"
    default_system = None
    bos = "<bos>"
    turn_start = "<start_of_turn>"
    turn_end = "<end_of_turn>"

    def render_native(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        system = self.system_prompt
        if messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        parts, spans, n = [self.bos], [], len(self.bos)
        for i, m in enumerate(messages):
            content = self._expand_tags(m["content"])
            if i == 0 and system:
                content = f"{system}\n\n{content}"
            role = "model" if m["role"] == "assistant" else m["role"]
            head, body = f"{self.turn_start}{role}\n", f"{content}{self.turn_end}"
            if m["role"] == "assistant":
                spans.append((n + len(head), n + len(head) + len(body)))
            parts += [head, body, "\n"]
            n += len(head) + len(body) + 1
        return "".join(parts), spans

    def render(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        if self.cfg.task == "rl" and self.backend == "native":
            return self.render_native(messages)[0] + f"{self.turn_start}model\n", []
        return super().render(messages)
