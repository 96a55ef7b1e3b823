"""mvlm.rl.media on tile families: a collated micro-batch of LLaVA-NeXT (any-resolution tiles,
whose placeholder count depends on the image's size, not only on its tile count) and InternVL
(a constant number of tokens per tile) split back into rows equals each row encoded alone, and
joining the rows gives the batch back. A NeXT batch whose two images' placeholders touch (one
run for two items) is refused with the reason.

The engine side (rollout log-probs vs the trainer's on NeXT image prompts whose media went
through this split) is in tests/dist/test_rollout_builtin.py.
"""
from __future__ import annotations

import pytest
import torch
from test_data_hf_equality import _img

from mvlm.data.collate import collate_padded
from mvlm.data.template import get_template
from mvlm.models.registry import get_family
from mvlm.rl.media import join_media, split_media_rows


def _chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}, {"role": "assistant", "content": "Yes."}]


def _rows(tag: str) -> list[dict]:
    a, b, c = _img(120, 80, 0), _img(57, 190, 1), _img(300, 300, 2)
    return [
        {"messages": _chat(f"Compare {tag} and {tag}, please."),
         "images": [a, b]},
        {"messages": _chat("What is two plus two?")},
        {"messages": _chat(f"{tag}Colour?"), "images": [c]},
        {"messages": _chat(f"{tag}Shape?"), "images": [b]},
    ]


@pytest.mark.parametrize("family", ["llava_next", "internvl"])
def test_split_tile_batch_equals_rows(tiny_ckpt, family):
    from transformers import AutoConfig

    hf = tiny_ckpt(family)
    tpl, fam, cfg = get_template(hf), get_family(family), AutoConfig.from_pretrained(hf)
    encs = [tpl.encode(r) for r in _rows("<image>")]
    batch = collate_padded(encs, pad_token_id=0)
    keys = [k for k in fam.batch_keys if k in batch]
    if family == "llava_next":
        # the point of the test: counts not proportional to the tiles (grid (tiles, 1, 1))
        tok = (batch["input_ids"] == cfg.image_token_id).sum(-1)
        tiles = [int(g[0]) for g in batch["image_grid_thw"]]
        assert len(set(tiles)) > 1 or tok[2] != tok[3], (tiles, tok)
        assert {"pixel_values", "image_grid_thw", "image_sizes"} <= set(keys)
    rows = split_media_rows(batch, fam, cfg)
    assert rows[1] == {}
    for enc, got in zip(encs, rows):
        want = {k: torch.as_tensor(enc[k]) for k in keys
                if enc.get(k) is not None and len(enc[k]) > 0}
        assert set(got) == set(want), (set(got), set(want))
        for k in want:
            assert torch.equal(got[k], want[k].to(got[k].dtype)), k
    joined = join_media(rows)
    for k in keys:
        assert torch.equal(joined[k], batch[k]), k


def test_touching_tiles_refused(tiny_ckpt):
    from transformers import AutoConfig

    hf = tiny_ckpt("llava_next")
    cfg = AutoConfig.from_pretrained(hf)
    enc = get_template(hf).encode({"messages": _chat("<image><image>Compare."),
        "images": [_img(120, 80, 0), _img(57, 190, 1)]})
    batch = collate_padded([enc], pad_token_id=0)
    with pytest.raises(ValueError, match="2 image items but 1 runs"):
        split_media_rows(batch, get_family("llava_next"), cfg)
