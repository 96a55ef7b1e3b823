"""LLaVA-NeXT and LLaVA-OneVision (any-resolution LLaVA, ``mvlm/models/llava/anyres*.py``).

* The template equals the HF processor (apply_chat_template + processor call) on the rows of
  test_data_hf_equality (one image, two images of different sizes, system prompt, multi-turn,
  text-only) and, for OneVision, a video row: input ids exactly, pixel values exactly (HF's padded
  ``[images, max_tiles, ...]`` without its padding), image sizes, tile counts, labels exactly the
  assistant turns. Token counts predicted from image headers (lazy pixels) equal the eager ones.
* Logits and loss of the Megatron model equal transformers' (fp32, one rank, in a subprocess for
  Megatron's global state) on a OneVision video row and a video + image row; text / image /
  two-image rows of both families are checked by ``--verify`` in
  tests/dist/test_convert_roundtrip.py.
* A OneVision truncation that would keep part of a multi-image row is refused with a reason.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_hf_equality import _hf_messages, _rows
from transformers import AutoProcessor

from mvlm.data.errors import BadSampleError
from mvlm.data.template import TemplateConfig, get_template

FAMILIES = ("llava_next", "llava_onevision")


def _frames(n: int, h: int, w: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for _ in range(n)]


def _video_row() -> dict:
    return {"messages": [
        {"role": "user", "content": "<video>What happens? And here <image>"},
        {"role": "assistant", "content": "A ball rolls."}],
        "videos": [_frames(3, 40, 52, 5)], "images": [_frames(1, 70, 30, 6)[0]]}


def _hf_video_messages(messages):
    out = []
    for m in _hf_messages(messages):
        parts = []
        for p in m["content"]:
            if p["type"] == "text" and "<video>" in p["text"]:
                a, b = p["text"].split("<video>")
                parts += [{"type": "text", "text": a}] if a else []
                parts.append({"type": "video"})
                parts += [{"type": "text", "text": b}] if b else []
            else:
                parts.append(p)
        out.append({"role": m["role"], "content": parts})
    return out


def _unpadded(pv: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return torch.cat([pv[i, : int(t)] for i, t in enumerate(grid[:, 0])])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(_rows()))
def test_encode_equals_hf_processor(tiny_ckpt, family, name):
    ckpt = tiny_ckpt(family)
    row = _rows()[name]
    proc = AutoProcessor.from_pretrained(ckpt)
    text = proc.apply_chat_template(_hf_messages(row["messages"]), tokenize=False)
    # one list of images per prompt (HF's batching format): OneVision then knows a row's images
    # belong together and does not tile a multi-image row's images, as the template does
    images = [row["images"]] if row.get("images") else None
    ref = proc(text=[text], images=images, return_tensors="pt")
    tpl = get_template(ckpt)
    assert tpl.backend == "native" and tpl.family == family
    got = tpl.encode(row)
    assert torch.equal(got["input_ids"], ref["input_ids"][0])
    if "images" in row:
        n = len(row["images"])
        grid = got["image_grid_thw"]
        assert torch.equal(got["image_sizes"], ref["image_sizes"])
        assert torch.equal(got["pixel_values"], _unpadded(ref["pixel_values"], grid))
        if family == "llava_onevision" and n > 1:  # a multi-image row is not tiled
            assert grid[:, 0].tolist() == [1] * n
        else:  # every test image is non-square or large: base + 2 or 4 tiles
            assert all(t in (3, 5) for t in grid[:, 0].tolist()), grid
        assert int(ref["pixel_values"][:, grid[:, 0].max():].abs().sum()) == 0 or n == 1
        # tokens from image headers alone (how datasets are encoded) equal the eager count
        lazy = tpl.encode(row, with_pixels=False)
        assert torch.equal(lazy["input_ids"], got["input_ids"])
        assert "pixel_values" not in lazy and len(lazy["image_refs"]) == n
        back = tpl.load_pixels(lazy)
        for k in ("pixel_values", "image_sizes", "image_grid_thw"):
            assert torch.equal(back[k], got[k]), k
    else:
        assert "pixel_values" not in got
    lab = got["labels"]
    expect = proc.tokenizer("".join(m["content"] + "<|im_end|>" for m in row["messages"]
                                    if m["role"] == "assistant"),
                            add_special_tokens=False)["input_ids"]
    assert lab[lab != -100].tolist() == expect
    assert torch.equal(got["position_ids"], torch.arange(len(lab)).expand(3, -1))


def test_onevision_video_equals_hf_processor(tiny_ckpt):
    ckpt = tiny_ckpt("llava_onevision")
    row = _video_row()
    proc = AutoProcessor.from_pretrained(ckpt)
    text = proc.apply_chat_template(_hf_video_messages(row["messages"]), tokenize=False)
    video = torch.from_numpy(np.stack([np.asarray(f) for f in row["videos"][0]])
                             .transpose(0, 3, 1, 2).copy())
    ref = proc(text=[text], images=[row["images"]], videos=[video], return_tensors="pt",
               do_sample_frames=False)
    got = get_template(ckpt).encode(row)
    assert torch.equal(got["input_ids"], ref["input_ids"][0])
    n_vid = int((got["input_ids"] == proc.video_token_id).sum())
    assert n_vid == 3 * 4 + 1  # 3 frames x pooled 2 x 2, one newline
    assert torch.equal(got["pixel_values_videos"], ref["pixel_values_videos"][0])
    assert got["video_grid_thw"].tolist() == [[3, 1, 1]]
    grid = got["image_grid_thw"]
    assert torch.equal(got["pixel_values"], _unpadded(ref["pixel_values"], grid))


def test_onevision_partial_multi_image_truncation_refused(tiny_ckpt):
    ckpt = tiny_ckpt("llava_onevision")
    row = _rows()["multi_turn"]
    full = get_template(ckpt).encode(row)
    ids = full["input_ids"].tolist()
    tok = get_template(ckpt).image_token_id
    first_end = ids.index(tok) + 17  # the first image (16 base tokens + newline) fits
    tpl = get_template(ckpt, cfg=TemplateConfig(max_length=first_end + 3,
                                                truncation_strategy="right"))
    with pytest.raises(BadSampleError, match="multi-image"):
        tpl.encode(row)


_MODEL_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from mvlm.convert.bridge import load_hf_weights
    from mvlm.convert.verify import _hf_forward, mcore_forward
    from mvlm.data.template import get_template
    from mvlm.models.vlm import build_model
    from mvlm.runtime.parallel import ParallelLayout
    from mvlm.runtime.startup import startup
    import transformers
    sys.path.insert(0, sys.argv[3])
    from test_llava_anyres import _video_row

    ckpt = sys.argv[1]
    startup(ParallelLayout(), seed=0, device="cpu")
    hf = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(ckpt).eval()
    bundle = build_model(hf.config, ParallelLayout(), dtype=torch.float32, device="cpu")
    load_hf_weights(bundle, ckpt)
    tpl = get_template(ckpt)
    res = {}
    for name, row in (("video+image", _video_row()),
                      ("video", dict(_video_row(), images=[], messages=[
                          {"role": "user", "content": "<video>What happens?"},
                          {"role": "assistant", "content": "A ball rolls."}]))):
        enc = tpl.encode(row)
        b = {k: (v[None] if k in ("input_ids", "labels") else v) for k, v in enc.items()
             if isinstance(v, torch.Tensor)}
        b["position_ids"] = enc["position_ids"][:, None]
        lab = torch.full_like(b["input_ids"], -100)
        lab[:, :-1] = b["labels"][:, 1:]
        b["labels"] = lab
        with torch.no_grad():
            logits = mcore_forward(bundle, b)
            tok = mcore_forward(bundle, b, with_loss=True)
            ref, ref_loss = _hf_forward(hf, b)
        loss = float(tok.sum() / (lab >= 0).sum())
        res[name] = [float((logits.float() - ref).abs().max()), abs(loss - ref_loss), ref_loss]
    print("RESULT " + json.dumps(res))
""")


def test_onevision_video_logits_equal_transformers(tiny_ckpt, tmp_path):
    ckpt = tiny_ckpt("llava_onevision")
    script = tmp_path / "ov_video.py"
    script.write_text(_MODEL_SCRIPT)
    here = str(__import__("pathlib").Path(__file__).parent)
    p = subprocess.run([sys.executable, str(script), str(ckpt), str(tmp_path), here],
                       capture_output=True, text=True, timeout=600)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-3000:]
    res = json.loads(line[0][7:])
    for name, (dlogits, dloss, loss) in res.items():
        print(f"{name}: max|dlogits| {dlogits:.2e} |dloss| {dloss:.2e} (loss {loss:.4f})")
        assert dlogits <= 1e-5 and dloss <= 1e-6 * max(1.0, loss), (name, dlogits, dloss)


@pytest.mark.parametrize("family,case", [("llava_next", "llava_weights"),
                                         ("llava_onevision", "no_vision_tower")])
def test_wrong_weights_are_refused_by_name(tiny_ckpt, tmp_path, family, case):
    """A NeXT config over LLaVA-1.5 weights (no ``image_newline``), or a OneVision config over
    weights without the SigLIP tower: refused before any output, naming a tensor it lacks."""
    import re
    import shutil

    from helpers import run_mvlm
    from safetensors.torch import load_file, save_file

    src = tiny_ckpt(family)
    bad = tmp_path / case
    shutil.copytree(src, bad)
    if case == "llava_weights":
        sd = load_file(tiny_ckpt("llava") / "model.safetensors")
        want = r"image_newline"
    else:
        sd = {k: v for k, v in load_file(bad / "model.safetensors").items()
              if not k.startswith("vision_tower.")}
        want = r"vision_tower\.embeddings\.patch_embedding\.weight"
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "mc"
    p = run_mvlm(["convert", "--to", "mcore", "--model", str(bad), "--output", str(out)],
                 check=False)
    log = p.stderr + p.stdout
    assert p.returncode != 0
    assert "missing" in log and re.search(want, log), log[-3000:]
    assert f"is this a {family} checkpoint" in log and not out.exists()


def test_onevision_storage_round_trip_keeps_video_and_tiles(tiny_ckpt):
    """What the trainer reads: encoded without pixels, stored as an Arrow row, read back and the
    image pixels loaded in the loader -- equals the eager encoding (videos are stored as frame
    rows with their (frames, 1, 1) grid, as Qwen-VL's; images come back from their references)."""
    from mvlm.data.dataset import from_storage, to_storage

    tpl = get_template(tiny_ckpt("llava_onevision"))
    row = _video_row()
    eager = tpl.encode(row)
    back = tpl.load_pixels(from_storage(to_storage(tpl.encode(row, with_pixels=False), tpl)))
    assert torch.equal(back["input_ids"], eager["input_ids"])
    for k in ("pixel_values", "image_sizes", "image_grid_thw", "video_grid_thw"):
        assert torch.equal(back[k], eager[k]), k
    assert torch.equal(back["pixel_values_videos"].reshape(eager["pixel_values_videos"].shape),
                       eager["pixel_values_videos"])
