"""Row formats: one dataset row (ms-swift's documented shapes) -> a validated :class:`Sample`.

Accepted shapes (the ones ms-swift users already have on disk):

* ``{"messages": [{"role": ..., "content": ...}, ...], "images": [...], "videos": [...],
  "audios": [...]}`` with ``<image>`` / ``<video>`` / ``<audio>`` tags inside the contents. A
  content may also be an OpenAI-style list of parts (``{"type": "text", "text": ...}``,
  ``{"type": "image", "image": ...}``); those parts are turned into tags plus media entries.
* ShareGPT ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}``.
* ``{"system"?, "query", "response", "history": [[q, r], ...]}``.
* Pretraining: ``{"text": ...}`` (or messages; every content is trained, no chat wrapping).
* Preference: messages ending in the chosen answer + ``"rejected_response"``, or
  ``{"chosen": msgs|str, "rejected": msgs|str, "prompt"?: msgs|str}``.
* RL: prompt messages (ending in a user turn); every other column (``solution``, ...) is carried
  through untouched in ``Sample.extra`` for reward functions.

Validation happens here, once, so that templates can assume well-formed input; every failure is
a :class:`BadSampleError` with a stable ``reason`` key that ``--on_bad_sample skip`` counts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mvlm.data.errors import BadSampleError

TASKS = ("pt", "sft", "preference", "rl")
ROLES = ("system", "user", "assistant", "tool", "tool_call", "tool_response")
MEDIA_TAGS = {"images": "<image>", "videos": "<video>", "audios": "<audio>"}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "tool": "tool", "function_call": "tool_call",
                   "observation": "tool_response"}
# Columns that belong to the row format itself; everything else is carried in Sample.extra.
_FORMAT_KEYS = {"messages", "conversations", "images", "videos", "audios", "query", "response",
                "history", "system", "text", "chosen", "rejected", "rejected_response",
                "prompt", "rejected_images"}


@dataclass
class Sample:
    """A validated row. ``messages`` contents are strings with media tags in place."""

    messages: list[dict[str, str]]
    images: list[Any] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)
    audios: list[Any] = field(default_factory=list)
    task: str = "sft"
    rejected_messages: list[dict[str, str]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def count_tags(self, key: str) -> int:
        tag = MEDIA_TAGS[key]
        return sum(m["content"].count(tag) for m in self.messages)


def _as_list(value: Any, what: str) -> list:
    if value is None:
        return []
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        return [value]
    try:
        return list(value)
    except TypeError as e:  # pragma: no cover - exotic iterables
        raise BadSampleError("bad_media_field", f"{what} must be a list, got {type(value)}") from e


def _content_to_text(content: Any, media: dict[str, list]) -> str:
    """Normalise a message content to a string; list-of-parts media go to ``media`` in order."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
                continue
            if not isinstance(part, dict):
                raise BadSampleError("bad_content", f"content part {part!r} is not a dict")
            ptype = part.get("type")
            if ptype == "text" or (ptype is None and "text" in part):
                out.append(str(part.get("text", "")))
                continue
            for key, tag in (("image", "<image>"), ("video", "<video>"), ("audio", "<audio>")):
                if ptype in (key, f"{key}_url") or key in part or f"{key}_url" in part:
                    ref = part.get(key, part.get(f"{key}_url"))
                    if isinstance(ref, dict) and "url" in ref:
                        ref = ref["url"]
                    if ref is None:
                        raise BadSampleError("bad_content", f"{key} part without a {key}")
                    media[key + "s"].append(ref)
                    out.append(tag)
                    break
            else:
                raise BadSampleError("bad_content", f"unknown content part type {ptype!r}")
        return "".join(out)
    raise BadSampleError("bad_content", f"message content must be a string, got {type(content)}")


def _parse_messages(raw: Any, media: dict[str, list], what: str = "messages") -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise BadSampleError("bad_messages", f"{what} must be a non-empty list")
    msgs = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise BadSampleError("bad_messages", f"{what}[{i}] is not a dict")
        if "from" in m and "role" not in m:  # ShareGPT turn
            role = _SHAREGPT_ROLES.get(str(m["from"]), str(m["from"]))
            content = m.get("value")
        else:
            role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise BadSampleError("unknown_role", f"{what}[{i}] has role {role!r}; "
                                 f"allowed: {', '.join(ROLES)}")
        if role == "system" and i != 0:
            raise BadSampleError("misplaced_system", f"{what}[{i}] is a system turn not first")
        msgs.append({"role": role, "content": _content_to_text(content, media)})
    return msgs


def _from_query_response(row: dict) -> list[dict]:
    msgs = []
    if row.get("system"):
        msgs.append({"role": "system", "content": row["system"]})
    for pair in row.get("history") or []:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise BadSampleError("bad_history", "history entries must be [query, response] pairs")
        msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    msgs.append({"role": "user", "content": row.get("query")})
    if row.get("response") is not None:
        msgs.append({"role": "assistant", "content": row.get("response")})
    return msgs


def _prompt_messages(prompt: Any, media: dict) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return _parse_messages(prompt, media, "prompt")


def parse_row(row: dict, task: str = "sft") -> Sample:
    """Validate one row for ``task`` (pt | sft | preference | rl) and return a :class:`Sample`."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not isinstance(row, dict):
        raise BadSampleError("bad_row", f"row must be a JSON object, got {type(row).__name__}")
    media: dict[str, list] = {"images": [], "videos": [], "audios": []}
    rejected = None
    if task == "preference" and "chosen" in row:
        prompt = _prompt_messages(row["prompt"], media) if row.get("prompt") is not None else []

        def conv(v: Any, what: str) -> list[dict]:
            if isinstance(v, str):
                return prompt + [{"role": "assistant", "content": v}]
            return prompt + _parse_messages(v, media, what)
        messages = conv(row["chosen"], "chosen")
        rejected = conv(row.get("rejected"), "rejected") if row.get("rejected") is not None \
            else None
    elif "messages" in row and row["messages"] is not None:
        messages = _parse_messages(row["messages"], media)
    elif "conversations" in row and row["conversations"] is not None:
        messages = _parse_messages(row["conversations"], media, "conversations")
    elif row.get("query") is not None:
        messages = _parse_messages(_from_query_response(row), media)
    elif task == "pt" and isinstance(row.get("text"), str):
        messages = [{"role": "assistant", "content": row["text"]}]
    elif task == "rl" and row.get("prompt") is not None:
        messages = _prompt_messages(row["prompt"], media)
    else:
        raise BadSampleError("unknown_format", "row has none of messages / conversations / "
                             "query+response / text; keys: " + ", ".join(sorted(map(str, row))))

    for key in ("images", "videos", "audios"):
        inline = media[key]
        listed = _as_list(row.get(key), key)
        if inline and listed:
            raise BadSampleError("media_count_mismatch",
                                 f"{key} given both inline in contents and in the '{key}' column")
        media[key] = inline or listed

    if task == "preference" and rejected is None:
        rr = row.get("rejected_response")
        if not isinstance(rr, str):
            raise BadSampleError("no_rejected_response",
                                 "preference rows need 'rejected_response' or 'rejected'")
        if not messages or messages[-1]["role"] != "assistant":
            raise BadSampleError("no_assistant_turn", "preference rows end with the chosen answer")
        rejected = messages[:-1] + [{"role": "assistant", "content": rr}]

    sample = Sample(messages=messages, task=task, rejected_messages=rejected,
                    extra={k: v for k, v in row.items() if k not in _FORMAT_KEYS},
                    **media)
    _validate(sample)
    return sample


def use_audio_in_video_from_env() -> bool:
    """ms-swift's ``USE_AUDIO_IN_VIDEO`` environment switch (true/1 on, false/0/unset off): a
    family whose videos carry sound (Qwen2.5-Omni) then takes each video's audio track from the
    row's ``audios``, in tag order. Other families ignore it, as ms-swift does."""
    import os

    v = os.environ.get("USE_AUDIO_IN_VIDEO", "false").strip().lower()
    if v not in ("1", "true", "0", "false", ""):
        raise ValueError(f"USE_AUDIO_IN_VIDEO={v!r}: use true or false")
    return v in ("1", "true")


def _validate(s: Sample) -> None:
    roles = [m["role"] for m in s.messages]
    if s.task in ("sft", "preference"):
        if "assistant" not in roles:
            raise BadSampleError("no_assistant_turn", "the conversation has no assistant turn")
        if roles[-1] != "assistant":
            raise BadSampleError("last_turn_not_assistant",
                                 f"the last turn is {roles[-1]!r}; nothing to train on after it")
    elif s.task == "rl":
        if roles[-1] == "assistant":  # the reference answer, kept for rewards
            s.extra.setdefault("response", s.messages[-1]["content"])
            s.messages = s.messages[:-1]
        if not s.messages or s.messages[-1]["role"] not in ("user", "tool", "tool_response"):
            raise BadSampleError("bad_prompt", "an RL prompt must end with a user turn")
    for key, tag in MEDIA_TAGS.items():
        n_tags = s.count_tags(key)
        n_media = len(getattr(s, key))
        why = ""
        if key == "audios" and use_audio_in_video_from_env():
            # a family with sound in its videos takes one track per <video> too; which families
            # do is the template's to say, so both counts pass here and the template checks
            with_tracks = n_tags + s.count_tags("videos")
            if n_media == with_tracks:
                n_tags = with_tracks
            why = (f" (USE_AUDIO_IN_VIDEO=true: or {with_tracks} where the family reads each "
                   "video's audio track from audios, one per <audio> and per <video> tag, "
                   "in tag order)")
        if n_tags != n_media:
            raise BadSampleError("media_count_mismatch",
                                 f"{n_tags} {tag} tag(s) in the messages but {n_media} {key}"
                                 + why)
        if s.rejected_messages is not None:
            n_rej = sum(m["content"].count(tag) for m in s.rejected_messages)
            if n_rej != n_media:
                raise BadSampleError("media_count_mismatch",
                                     f"rejected conversation has {n_rej} {tag} tag(s), "
                                     f"expected {n_media}")
