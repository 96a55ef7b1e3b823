"""Mistral instruct template (the v0.3 ``[INST]`` format): ``<s>``, then ``[INST] QUERY[/INST]``
for user turns and `` ANSWER</s>`` for assistant turns; a system prompt goes in front of the last
user turn, separated by a blank line (Mistral's own template does the same); no default system
prompt. Loss on each answer with the space before it (the BPE merges it into the answer's
first token) and its ``</s>``."""
from __future__ import annotations

from mvlm.data.template import Template


class MistralTemplate(Template):
    family = "mistral"
    default_system = None
    bos = "<s>"
    eos = "</s>"

    def render_native(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        system = self.system_prompt
        if messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        parts, spans, n = [self.bos], [], len(self.bos)
        for i, m in enumerate(messages):
            content = self._expand_tags(m["content"])
            if m["role"] == "user":
                if i == last_user and system:
                    content = f"{system}\n\n{content}"
                piece = f"[INST] {content}[/INST]"
            elif m["role"] == "assistant":
                piece = f" {content}{self.eos}"
                spans.append((n, n + len(piece)))
            else:
                raise ValueError(f"Mistral's template has no {m['role']!r} turns after the "
                                 "first message: use user/assistant (system only first)")
            parts.append(piece)
            n += len(piece)
        return "".join(parts), spans

    def render(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        if self.cfg.task == "rl" and self.backend == "native":
            return self.render_native(messages)[0], []  # ends with [/INST]: the answer follows
        return super().render(messages)
