"""Preference rows (DPO / SimPO / ORPO / CPO / RM pairs, KTO single answers): parse, validate,
encode, and pack each pair into ONE padding-free row.

Accepted pair shapes (what ms-swift and TRL users have on disk):

* the guide's (§5.6): ``messages`` = the prompt (ending in a user turn), ``chosen`` /
  ``rejected`` = the two answers, each a message ``{"role": "assistant", "content": ...}``, a
  string, or a list of messages (a multi-message continuation starting and ending with an
  assistant turn);
* ms-swift's ``messages`` ending in the chosen assistant answer + ``rejected_response`` (a
  string or a message); ``query`` / ``response`` / ``history`` and ShareGPT ``conversations`` in
  place of ``messages``;
* TRL's explicit prompt ``prompt`` (string or messages) + ``chosen`` / ``rejected``, and its
  implicit prompt: ``chosen`` / ``rejected`` as two full conversations, the prompt being their
  common leading turns.

``images`` / ``videos`` belong to the prompt and are shared by both answers (one pixel set per
pair); ``<image>`` tags inside an answer, or a ``rejected_images`` column, are refused (a pair
whose answers see different images is not a preference between answers). KTO rows
(``kind="kto"``) are a prompt + one answer -- ``messages`` ending in the assistant answer, or
``prompt`` + ``completion`` -- and ``label: true`` (desirable) / ``false`` (undesirable).

Every problem is a :class:`~mvlm.data.errors.BadSampleError` with a stable reason key (counted by
``--on_bad_sample skip``, located as ``FILE, line N`` by the dataset layer or by
:func:`read_preference_file`).

Encoding goes through the family's :class:`~mvlm.data.template.Template` (``encode_batch``), so
the two conversations are tokenised exactly as SFT rows are. Only the final answer carries labels
(the log-probabilities DPO compares): assistant turns inside a multi-turn prompt are masked.

Packing (:func:`collate_pairs`): a pair is two sequences, prompt+chosen and prompt+rejected,
side by side in one THD row with their own ``cu_seqlens`` segments (positions restart, attention
never crosses), so a pair costs one forward pass; many pairs can share a row. The batch says
which segment is which (``chosen_index`` / ``rejected_index``). The pair's pixels are stored
once; in the batch the rejected segment lists the same tensors again (the model merges one
vision feature per placeholder token, in order), and ``pair_media`` says how many rows and items
each pair has, so that the preference objectives run the vision tower on each pair's media once
and repeat the features (:mod:`mvlm.train.objectives.pair_media`). The pair objectives go one
step further where the model allows it: :mod:`mvlm.train.objectives.shared_prefix` turns the
row into ``[prompt][chosen][rejected]`` per pair (the prompt once, a tree attention mask).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mvlm.data.errors import BadSampleCounter, BadSampleError
from mvlm.data.formats import MEDIA_TAGS, Sample, _as_list, _from_query_response, _parse_messages

PAIR, KTO = "pair", "kto"
KINDS = (PAIR, KTO)
_PROMPT_END_ROLES = ("user", "tool", "tool_response")
# columns that make up the row's shape; every other column is carried in ``extra``
_SHAPE_KEYS = {"messages", "conversations", "query", "response", "history", "system", "prompt",
               "chosen", "rejected", "rejected_response", "completion", "label", "images",
               "videos", "audios", "rejected_images"}
_SEQ_KEYS = ("input_ids", "labels", "position_ids", "length")
# lazily stored media (references resolved at collate time) travel with the media tensors
_LAZY_MEDIA_KEYS = ("image_refs",)


@functools.cache
def _media_keys() -> tuple[str, ...]:
    """Every media key a registered family's batch may carry (pixels, grids, image sizes, audio
    features and masks...): a pair's two sequences share them. Read off the registry so a new
    family's keys (e.g. an audio tower's) reach preference pairs without editing this file."""
    from mvlm.models.registry import families

    keys = {k for f in families() for k in f.batch_keys}
    return tuple(sorted(keys)) + _LAZY_MEDIA_KEYS


@dataclass
class PreferenceRow:
    """A validated preference row: the shared prompt and the answer(s), all as message lists
    whose contents are strings with media tags (tags only in the prompt)."""

    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]  # the answer (KTO: the row's one answer)
    rejected: list[dict[str, str]] | None  # None for KTO rows
    images: list[Any] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)
    audios: list[Any] = field(default_factory=list)
    label: bool | None = None  # KTO only
    extra: dict[str, Any] = field(default_factory=dict)

    def pair_sample(self, second: list[dict[str, str]] | None = None) -> Sample:
        """Both conversations as one :class:`Sample` (what ``Template.encode_batch`` encodes into
        ``input_ids`` + ``rejected_input_ids``). ``second`` replaces the rejected answer (KTO's
        mismatched KL answer)."""
        other = self.rejected if second is None else second
        if other is None:
            raise ValueError("a KTO row has no second answer: pair it with kto_kl_rows first")
        extra = dict(self.extra)
        if self.label is not None:
            extra["label"] = self.label
        return Sample(self.prompt + self.chosen, list(self.images), list(self.videos),
                      list(self.audios), "preference", self.prompt + other, extra)


# ----------------------------------------------------------------------------- parsing

def _bad(reason: str, detail: str) -> BadSampleError:
    return BadSampleError(reason, detail)


def _count_tags(msgs: list[dict]) -> dict[str, int]:
    return {k: sum(m["content"].count(tag) for m in msgs) for k, tag in MEDIA_TAGS.items()}


def _answer(value: Any, what: str) -> list[dict[str, str]]:
    """An answer: a string, one message, or a list of messages starting and ending with an
    assistant turn; media are not allowed in it."""
    media: dict[str, list] = {"images": [], "videos": [], "audios": []}
    if isinstance(value, str):
        msgs = [{"role": "assistant", "content": value}]
    elif isinstance(value, dict):
        if "role" not in value and "from" not in value:
            value = {"role": "assistant", **value}
        if "content" not in value and "value" not in value:
            raise _bad("bad_answer", f"{what} is a message without 'content'")
        msgs = _parse_messages([value], media, what)
    elif isinstance(value, list):
        if not value:
            raise _bad("bad_answer", f"{what} is an empty list")
        msgs = _parse_messages(value, media, what)
    else:
        raise _bad("bad_answer", f"{what} must be a string, a message or a list of messages, "
                   f"got {type(value).__name__}")
    roles = [m["role"] for m in msgs]
    if roles[0] != "assistant" or roles[-1] != "assistant":
        raise _bad("bad_answer", f"{what} must start and end with an assistant turn, got roles "
                   f"{roles}")
    if "system" in roles:
        raise _bad("bad_answer", f"{what} holds a system turn; it belongs to the prompt")
    if any(media.values()) or any(_count_tags(msgs).values()):
        raise _bad("media_in_answer", f"{what} holds an image/video/audio: media belong to the "
                   "prompt and are shared by both answers")
    return msgs


def _prompt(value: Any, media: dict, what: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return _parse_messages(value, media, what)


def _conversation(row: dict, media: dict) -> tuple[list[dict], str] | None:
    """``messages`` / ``conversations`` / ``query``+``response`` as messages (None if none)."""
    for key in ("messages", "conversations"):
        if row.get(key) is not None:
            return _parse_messages(row[key], media, key), key
    if row.get("query") is not None:
        return _parse_messages(_from_query_response(row), media), "query/response"
    return None


def _split_last_answer(conv: list[dict], key: str, what: str) -> tuple[list[dict], list[dict]]:
    if conv[-1]["role"] != "assistant":
        raise _bad("no_chosen_answer", f"{key} ends with a {conv[-1]['role']!r} turn and the row "
                   f"has no '{what}': end {key} with the assistant's {what} answer, or give "
                   f"'{what}'")
    return conv[:-1], [conv[-1]]


def _common_prefix(a: list[dict], b: list[dict]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    while k > 0 and a[k - 1]["role"] == "assistant":  # each answer starts with the assistant
        k -= 1
    return k


def _pair_parts(row: dict, media: dict) -> tuple[list[dict], list[dict], list[dict]]:
    has_rej, has_rr = row.get("rejected") is not None, row.get("rejected_response") is not None
    if has_rej and has_rr:
        raise _bad("ambiguous_answer", "the row has both 'rejected' and 'rejected_response'; "
                   "keep one")
    conv = _conversation(row, media)
    if conv is not None:
        msgs, key = conv
        if row.get("chosen") is not None:
            if msgs[-1]["role"] == "assistant":
                raise _bad("ambiguous_answer", f"{key} ends with an assistant turn and the row "
                           f"also has 'chosen': {key} must hold only the prompt (or drop "
                           "'chosen' and end it with the chosen answer)")
            prompt, chosen = msgs, _answer(row["chosen"], "chosen")
        else:
            prompt, chosen = _split_last_answer(msgs, key, "chosen")
    elif row.get("prompt") is not None:
        prompt = _prompt(row["prompt"], media, "prompt")
        if row.get("chosen") is None:
            raise _bad("no_chosen_answer", "the row has a 'prompt' but no 'chosen' answer")
        chosen = _answer(row["chosen"], "chosen")
    elif isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list):
        # TRL's implicit prompt: two full conversations; the prompt is their shared beginning
        full_c = _parse_messages(row["chosen"], media, "chosen")
        other: dict[str, list] = {"images": [], "videos": [], "audios": []}
        full_r = _parse_messages(row["rejected"], other, "rejected")
        if other != media:
            raise _bad("media_in_answer", "chosen and rejected carry different inline media; "
                       "a pair shares its prompt's media")
        k = _common_prefix(full_c, full_r)
        if k == 0:
            raise _bad("bad_prompt", "chosen and rejected are full conversations with no common "
                       "leading turns, so there is no prompt: give 'messages' or 'prompt'")
        return full_c[:k], _answer(full_c[k:], "chosen"), _answer(full_r[k:], "rejected")
    else:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise _bad("unknown_format", "a preference row needs 'messages' (the prompt) with "
                   "'chosen' / 'rejected', or 'messages' ending in the chosen answer with "
                   f"'rejected_response', or 'prompt' + 'chosen' + 'rejected'; keys: {keys}")
    if not (has_rej or has_rr):
        raise _bad("no_rejected_response", "the row has no rejected answer: add 'rejected' "
                   "(or 'rejected_response')")
    rejected = _answer(row["rejected"] if has_rej else row["rejected_response"],
                       "rejected" if has_rej else "rejected_response")
    return prompt, chosen, rejected


def _kto_parts(row: dict, media: dict) -> tuple[list[dict], list[dict], bool]:
    if row.get("chosen") is not None or row.get("rejected") is not None or \
            row.get("rejected_response") is not None:
        raise _bad("paired_row_for_kto", "KTO takes one answer per row with 'label'; split the "
                   "pair into two rows (its chosen answer with label true, its rejected answer "
                   "with label false)")
    if "label" not in row or row["label"] is None:
        raise _bad("bad_label", "a KTO row needs 'label': true (a desirable answer) or false "
                   "(an undesirable one)")
    label = row["label"]
    if isinstance(label, bool):
        pass
    elif isinstance(label, int) and label in (0, 1):  # CSV columns come back as integers
        label = bool(label)
    else:
        raise _bad("bad_label", f"'label' must be true or false, got {label!r}")
    if row.get("completion") is not None:
        if row.get("prompt") is not None:
            prompt = _prompt(row["prompt"], media, "prompt")
        else:
            conv = _conversation(row, media)
            if conv is None:
                raise _bad("bad_prompt", "the row has a 'completion' but no 'prompt' / "
                           "'messages'")
            prompt = conv[0]
        return prompt, _answer(row["completion"], "completion"), label
    conv = _conversation(row, media)
    if conv is None:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise _bad("unknown_format", "a KTO row needs 'messages' ending in the assistant's "
                   f"answer (or 'prompt' + 'completion') and 'label'; keys: {keys}")
    prompt, answer = _split_last_answer(conv[0], conv[1], "completion")
    return prompt, _answer(answer, "completion"), label


def parse_preference_row(row: Any, kind: str = PAIR) -> PreferenceRow:
    """Validate one row (``kind``: ``pair`` or ``kto``); raises BadSampleError with a reason."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(row, dict):
        raise _bad("bad_row", f"a row must be a JSON object, got {type(row).__name__}")
    if row.get("rejected_images"):
        raise _bad("unsupported_rejected_images", "'rejected_images' (other images for the "
                   "rejected answer) is not supported: a pair shares its prompt's images, so "
                   "chosen and rejected go through one forward pass; drop the column")
    media: dict[str, list] = {"images": [], "videos": [], "audios": []}
    label = None
    if kind == PAIR:
        prompt, chosen, rejected = _pair_parts(row, media)
    else:
        prompt, chosen, label = _kto_parts(row, media)
        rejected = None
    if not prompt:
        raise _bad("bad_prompt", "the prompt is empty: the answers need a question")
    if prompt[-1]["role"] not in _PROMPT_END_ROLES:
        raise _bad("bad_prompt", f"the prompt must end with a user (or tool) turn, not "
                   f"{prompt[-1]['role']!r}")
    for key in MEDIA_TAGS:
        listed = _as_list(row.get(key), key)
        if media[key] and listed:
            raise _bad("media_count_mismatch", f"{key} given both inline in contents and in the "
                       f"'{key}' column")
        media[key] = media[key] or listed
    tags = _count_tags(prompt)
    for key, tag in MEDIA_TAGS.items():
        if tags[key] != len(media[key]):
            raise _bad("media_count_mismatch", f"{tags[key]} {tag} tag(s) in the prompt but "
                       f"{len(media[key])} {key}")
    if rejected is not None and rejected == chosen:
        raise _bad("identical_answers", "chosen and rejected are the same answer, so the pair "
                   "states no preference")
    return PreferenceRow(prompt, chosen, rejected, label=label,
                         extra={k: v for k, v in row.items() if k not in _SHAPE_KEYS}, **media)


def kto_kl_rows(rows: Sequence[PreferenceRow]) -> list[tuple[PreferenceRow, list[dict]]]:
    """Each KTO row with a mismatched answer for KTO's KL reference point: row i's prompt with
    row i-1's answer (cyclically), the pairing TRL's KTO collator makes within a batch."""
    if not rows:
        return []
    # a lone row (the last encode batch of a dataset, --lazy_tokenize) is matched with its own
    # answer, as TRL's shift of a one-row batch does
    return [(r, rows[i - 1].chosen) for i, r in enumerate(rows)]


# ----------------------------------------------------------------------------- encoding

def _answer_only(labels: Any, n_answer_turns: int, n_prompt_turns: int, strategy: str) -> Any:
    """Keep the labels of the last ``n_answer_turns`` trained runs (the answer's assistant
    turns); the prompt's assistant turns lose theirs. Each assistant turn is one contiguous run
    of labelled tokens (role headers separate them)."""
    import torch

    if n_prompt_turns == 0:
        return labels
    on = labels != -100
    starts = (on & ~torch.cat([on.new_zeros(1), on[:-1]])).nonzero().flatten().tolist()
    if len(starts) < n_answer_turns + n_prompt_turns and strategy == "right":
        raise _bad("too_long", "right truncation (--truncation_strategy right) cut into the "
                   "answer; raise --max_length or use left truncation for preference data")
    if len(starts) <= n_answer_turns:
        return labels
    out = labels.clone()
    out[:starts[len(starts) - n_answer_turns]] = -100
    return out


def _finish_pair(template: Any, pr: PreferenceRow, enc: dict, second: list[dict]) -> dict:
    """Answer-only labels for both sequences; both must keep the same vision blocks."""
    strategy = template.cfg.truncation_strategy
    n_prompt = sum(m["role"] == "assistant" for m in pr.prompt)
    enc["labels"] = _answer_only(enc["labels"], sum(m["role"] == "assistant" for m in pr.chosen),
                                 n_prompt, strategy)
    enc["rejected_labels"] = _answer_only(enc["rejected_labels"],
                                          sum(m["role"] == "assistant" for m in second),
                                          n_prompt, strategy)
    tok = getattr(template, "image_token_id", None), getattr(template, "video_token_id", None)
    for t in tok:
        if t is not None and int((enc["input_ids"] == t).sum()) != \
                int((enc["rejected_input_ids"] == t).sum()):
            raise _bad("too_long", "truncation kept different images in the chosen and the "
                       "rejected conversation; raise --max_length")
    # ``length`` of a pair = the tokens it takes in a packed row (both sequences): what packing
    # plans and the dataset stats count
    enc["length"] = int(enc["length"]) + int(enc["rejected_length"])
    return enc


def encode_preference_rows(template: Any, rows: Sequence[Any], base_dir: str | None = None,
                           *, kind: str = PAIR, with_pixels: bool = True
                           ) -> list[dict | BadSampleError]:
    """Encode rows (dicts or :class:`PreferenceRow`) with the family's template: one entry per
    row, the encoded pair or the BadSampleError it raised (location added by the caller).

    A pair: ``input_ids`` / ``labels`` / ``position_ids`` / ``length`` of prompt+chosen and the
    same under ``rejected_*`` for prompt+rejected (``length`` is the pair's: both sequences);
    the vision tensors once. KTO (``kind="kto"``):
    the row's conversation, and its KL conversation (this prompt, the previous good row's
    answer in this encode batch, TRL's mismatched pairs) under the same ``rejected_*`` keys (the
    dataset stores one layout for both kinds); ``extra["label"]`` is the row's label and marks
    the row as KTO. Labels are unshifted (HF style)."""
    if template.cfg.task not in ("sft", "preference"):
        raise ValueError(f"preference rows are chat conversations: the template's task must be "
                         f"sft or preference, not {template.cfg.task!r}")
    parsed: list[PreferenceRow | BadSampleError] = []
    for row in rows:
        if isinstance(row, PreferenceRow):
            parsed.append(row)
            continue
        try:
            parsed.append(parse_preference_row(row, kind))
        except BadSampleError as e:
            parsed.append(e)
    good = [i for i, p in enumerate(parsed) if isinstance(p, PreferenceRow)]
    results: list[Any] = list(parsed)
    if not good:
        return results
    if kind == KTO:
        pairs = kto_kl_rows([parsed[i] for i in good])
        samples = [pr.pair_sample(second) for pr, second in pairs]
        seconds = [second for _, second in pairs]
    else:
        samples = [parsed[i].pair_sample() for i in good]
        seconds = [None] * len(good)
    encoded = template.encode_batch(samples, base_dir, with_pixels)
    for i, enc, second in zip(good, encoded, seconds):
        if isinstance(enc, BaseException):
            results[i] = enc
            continue
        try:
            results[i] = _finish_pair(template, parsed[i], enc, second or parsed[i].rejected)
        except BadSampleError as e:
            results[i] = e
    return results


def encode_rows(template: Any, rows: Sequence[Any], base_dir: str | None = None,
                with_pixels: bool = True) -> list[dict | BadSampleError]:
    """What the dataset layer calls for a batch of rows: preference pairs through
    :func:`encode_preference_rows` when the template's task is ``preference``, every other task
    through ``Template.encode_batch``."""
    if template.cfg.task == "preference":
        return encode_preference_rows(template, rows, base_dir, kind=row_kind(rows),
                                      with_pixels=with_pixels)
    return template.encode_batch(list(rows), base_dir, with_pixels)


def is_kto_row(row: Any) -> bool:
    """A KTO row: a ``label`` and no second answer (``chosen`` / ``rejected`` /
    ``rejected_response``)."""
    return isinstance(row, dict) and "label" in row and not any(
        row.get(k) is not None for k in ("chosen", "rejected", "rejected_response"))


def row_kind(rows: Sequence[Any]) -> str:
    """The kind of an encode batch of preference rows: ``kto`` when any row is a KTO row (the
    batch's other rows are then validated as KTO rows and refused with the reason, e.g. a pair
    row as ``paired_row_for_kto``), else ``pair``. Why from the rows: the dataset layer has one
    preference task for both kinds; which objective reads them is checked per micro-batch
    (``kto_label`` present or not)."""
    return KTO if any(is_kto_row(r) for r in rows) else PAIR


def encode_pair(template: Any, row: Any, base_dir: str | None = None,
                with_pixels: bool = True) -> dict:
    """Encode one pair row; raises its BadSampleError."""
    out = encode_preference_rows(template, [row], base_dir, with_pixels=with_pixels)[0]
    if isinstance(out, BaseException):
        raise out
    return out


def read_preference_file(path: str, template: Any, counter: BadSampleCounter | str = "error",
                         *, kind: str = PAIR, base_dir: str | None = None,
                         batch_size: int = 32) -> list[dict]:
    """Encode a .jsonl / .json / .csv preference file row by row (lines numbered as editors do):
    a bad row stops with ``FILE, line N: reason`` under ``--on_bad_sample error`` or is counted
    and skipped under ``skip``."""
    import json
    import os

    from mvlm.data.textrows import iter_rows

    counter = BadSampleCounter(counter) if isinstance(counter, str) else counter
    base_dir = base_dir if base_dir is not None else os.path.dirname(os.path.abspath(path))
    out: list[dict] = []
    rows = list(enumerate(iter_rows(path)))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        decoded: list[Any] = []
        for _, r in chunk:
            if r.reason:
                decoded.append(BadSampleError(r.reason, r.detail))
                continue
            try:
                decoded.append(json.loads(r.text))
            except json.JSONDecodeError as e:
                decoded.append(BadSampleError("bad_json", f"{e.msg} (column {e.colno})"))
        live = [j for j, d in enumerate(decoded) if not isinstance(d, BadSampleError)]
        enc = encode_preference_rows(template, [decoded[j] for j in live], base_dir, kind=kind)
        for j, e in zip(live, enc):
            decoded[j] = e
        for (idx, r), res in zip(chunk, decoded):
            if isinstance(res, BadSampleError):
                counter.handle(res.with_location(path, idx, r.line))
            else:
                out.append(res)
    return out


# ----------------------------------------------------------------------------- packing

def pair_sequences(enc: dict) -> list[dict]:
    """An encoded pair (or KTO row) -> its two sequences as collator samples: [chosen,
    rejected] (KTO: [answer, kl]). Both list the pair's vision tensors (the same objects)."""
    second = "rejected"
    vision = {k: enc[k] for k in _media_keys() if k in enc}
    keys = ("input_ids", "labels", "position_ids")  # ``length`` is the pair's, not a sequence's
    first = {k: enc[k] for k in keys if enc.get(k) is not None} | vision
    other = {k: enc[f"{second}_{k}"] for k in keys if enc.get(f"{second}_{k}") is not None} \
        | vision
    return [first, other]


def _cp_round(n: int, cp_size: int) -> int:
    m = 2 * cp_size
    return -(-n // m) * m if cp_size > 1 else n


def pair_length(enc: dict, cp_size: int = 1) -> int:
    """Tokens a pair takes in a packed row (each sequence padded to 2*CP under CP): what a
    packing plan (``mvlm.data.packing.pack_lengths``) needs per pair."""
    return sum(_cp_round(len(s["input_ids"]), cp_size) for s in pair_sequences(enc))


def collate_pairs(items: Sequence[Any], pad_token_id: int, pad_to_multiple_of: int = 1,
                  cp_size: int = 1) -> dict[str, Any]:
    """A micro-batch of pairs (each item an encoded pair, or a list of them: a packed row) ->
    ONE padding-free row in ``mvlm.data.collate``'s packed batch contract, plus:

    * ``chosen_index`` / ``rejected_index`` (long [P]): each pair's two segments of
      ``cu_seqlens`` (KTO: the answer's and the KL answer's);
    * ``num_pairs`` = P; ``kto_label`` (bool [P]) when the pairs are KTO rows;
    * ``pair_keys``: each pair's :func:`pair_key` (``--precompute_ref_log_probs``);
    * ``pair_media``: each pair's media rows / items (:func:`pair_media`), when it has media.
    """
    import torch

    from mvlm.data.collate import collate_packed_rows

    rows = [[s for enc in (it if isinstance(it, list) else [it]) for s in pair_sequences(enc)]
            for it in items]
    pairs = [enc for it in items for enc in (it if isinstance(it, list) else [it])]
    batch = collate_packed_rows(rows, pad_token_id, pad_to_multiple_of, cp_size)
    p = len(pairs)
    batch["chosen_index"] = torch.arange(0, 2 * p, 2, dtype=torch.long)
    batch["rejected_index"] = batch["chosen_index"] + 1
    batch["num_pairs"] = p
    batch["pair_keys"] = [pair_key(e) for e in pairs]
    media = pair_media(pairs)
    if media:
        batch["pair_media"] = media
    labels = [(e.get("extra") or {}).get("label") for e in pairs]
    if any(lab is not None for lab in labels):
        if any(lab is None for lab in labels):
            raise ValueError("a micro-batch mixes KTO rows (with 'label') and pair rows: a "
                             "dataset holds one kind (--rlhf_type kto reads KTO rows, the "
                             "pair methods chosen/rejected pairs)")
        batch["kto_label"] = torch.tensor(labels, dtype=torch.bool)
    return batch


# media key -> the key that counts its items (None: each row of the tensor is an item)
_MEDIA_ITEMS = {"pixel_values": "image_grid_thw", "pixel_values_videos": "video_grid_thw"}


def pair_media(pairs: Sequence[dict]) -> dict[str, dict[str, list[int]]]:
    """Per media key, each pair's pixel ``rows`` and ``items`` (images, videos, tiles): what
    :mod:`mvlm.train.objectives.pair_media` needs to run the tower on a pair's media once although
    the batch lists them for both segments."""
    out: dict[str, dict[str, list[int]]] = {}
    for fk, gk in _MEDIA_ITEMS.items():
        if not any(e.get(fk) is not None for e in pairs):
            continue
        rows, items = [], []
        for e in pairs:
            px = e.get(fk)
            rows.append(0 if px is None else int(px.shape[0]))
            g = e.get(gk)
            items.append(0 if px is None else int(g.shape[0]) if g is not None
                         else int(px.shape[0]))
        out[fk] = {"rows": rows, "items": items}
    return out


def pair_key(enc: dict) -> str:
    """A digest of everything a pair's log-probs depend on (both sequences' ids, labels and
    positions, the media tensors): ``--precompute_ref_log_probs`` finds a pair's stored
    reference log-probs by it, whatever micro-batch, row or epoch the pair lands in."""
    import hashlib

    import torch

    h = hashlib.blake2b(digest_size=16)
    for k in sorted(enc):
        v = enc[k]
        if torch.is_tensor(v):
            h.update(k.encode())
            h.update(str(tuple(v.shape)).encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        elif k == "image_refs" and v:  # pixels still to load: the files / bytes name them
            h.update(repr([r if isinstance(r, str) else hashlib.sha1(r).hexdigest()
                           for r in v]).encode())
    return h.hexdigest()


def sequence_sums(per_token: Any, cu_seqlens: Any) -> Any:
    """Per-segment sums of a per-token tensor [S] (or [1, S]) over ``cu_seqlens`` segments: the
    summed log-probs / token counts a preference loss takes, from the model's per-token
    output."""
    import torch

    x = per_token.reshape(-1)
    cu = torch.as_tensor(cu_seqlens, dtype=torch.long, device=x.device)
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1, device=x.device), cu[1:] - cu[:-1])
    out = x.new_zeros(len(cu) - 1)
    n = int(cu[-1])
    return out.index_add(0, seg, x[:n])


__all__ = ["PreferenceRow", "parse_preference_row", "kto_kl_rows", "encode_preference_rows",
           "encode_rows", "encode_pair", "is_kto_row", "row_kind", "read_preference_file",
           "pair_sequences", "pair_length",
           "collate_pairs", "pair_key", "pair_media", "sequence_sums", "PAIR", "KTO"]
