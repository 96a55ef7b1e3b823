"""Llama 3 chat template (ms-swift's ``llama3``): ``<|begin_of_text|>``, then per turn
``<|start_header_id|>ROLE<|end_header_id|>\\n\\nCONTENT<|eot_id|>``; no default system prompt;
contents are stripped as the official template does. Loss on assistant content + ``<|eot_id|>``.

Llama 3.1+'s official template also writes a knowledge-cutoff/date header into the system turn;
for such a checkpoint the native/jinja probe at construction switches to the checkpoint's own
template (``--template_backend jinja``), as for any checkpoint whose template differs.
"""
from __future__ import annotations

from mvlm.data.template import Template


class Llama3Template(Template):
    family = "llama"
    default_system = None
    bos = "<|begin_of_text|>"
    header_start = "<|start_header_id|>"
    header_end = "<|end_header_id|>\n\n"
    eot = "<|eot_id|>"

    def header(self, role: str) -> str:
        return f"{self.header_start}{role}{self.header_end}"

    def render_native(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        parts = [self.bos]
        spans: list[tuple[int, int]] = []
        n = len(self.bos)
        if messages[0]["role"] != "system" and self.system_prompt:
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        for m in messages:
            head = self.header(m["role"])
            body = self._expand_tags(m["content"]).strip() + self.eot
            if m["role"] == "assistant":
                spans.append((n + len(head), n + len(head) + len(body)))
            parts += [head, body]
            n += len(head) + len(body)
        return "".join(parts), spans

    def render(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        if self.cfg.task == "rl" and self.backend == "native":
            # a prompt for generation: no loss, ends with the assistant header
            return self.render_native(messages)[0] + self.header("assistant"), []
        return super().render(messages)
