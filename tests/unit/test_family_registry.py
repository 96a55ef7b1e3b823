"""The model registry: every family provides every part, and no one else names a family's type.

Issue 10's property "adding a family = one folder + its tests" holds only if (a) each registered
family really carries all its parts -- checked here on its own tiny checkpoint, so a family whose
weight table misses an HF tensor, whose template renders the wrong family or whose PEFT paths do
not exist in the transformers model fails -- and (b) nothing outside ``mvlm/models/<name>/`` and
the registry dispatches on a model_type string, checked by reading every module of ``mvlm/``.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from mvlm.models.registry import (
    FamilySpec,
    UnsupportedModelError,
    families,
    get_family,
    media_keys,
    supported_model_types,
)

MVLM = Path(__file__).resolve().parents[2] / "mvlm"
MODELS = MVLM / "models"
FAMILY_FILES = ("__init__.py", "weights.py", "template.py", "tiny.py")
# Files outside the family folders allowed to write one model_type literal, and why. The demo
# trains one chosen model, as a user names it on the command line; it dispatches on nothing.
# LLaVA composes an LLM family named by text_config.model_type: its tiny test config picks the HF
# text config class for Qwen2 (LLaVA-Interleave) or Llama (LLaVA-1.5) by that name.
ALLOWED_LITERALS = {("demo.py", "qwen2_5_vl"), ("models/llava/tiny.py", "qwen2"),
                    ("models/llava/tiny.py", "llama")}

NAMES = [f.name for f in families()]


def _disk_names(ckpt: Path) -> list[str]:
    names: list[str] = []
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            names += list(h.keys())
    return names


def _hf_regex(template: str) -> re.Pattern:
    rx = re.escape(template).replace(r"\{L\}", r"\d+").replace(r"\{E\}", r"\d+")
    return re.compile("^" + rx.replace(r"\{\*\}", ".+") + "$")


def test_registry_lists_every_family_folder():
    """Every folder under mvlm/models/ with an __init__.py is a registered family with its four
    files, and every registered family has its folder."""
    folders = sorted(p.parent.name for p in MODELS.glob("*/__init__.py"))
    assert folders == sorted(NAMES), (folders, NAMES)
    for name in NAMES:
        missing = [f for f in FAMILY_FILES if not (MODELS / name / f).is_file()]
        assert not missing, f"mvlm/models/{name}/ lacks {missing}"
    assert set(supported_model_types()) >= set(NAMES)


def test_unknown_model_type_names_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match="Supported model types: .*qwen2"):
        get_family("not_a_model")


def test_media_keys_agree_across_families():
    keys = media_keys()
    for spec in families():
        for kind in spec.media:
            for key in kind.batch_keys:
                assert isinstance(getattr(torch, keys[key]), torch.dtype)


@pytest.mark.parametrize("name", NAMES)
def test_family_provides_every_part(name, tiny_ckpt, tmp_path):
    """On the family's own tiny checkpoint: config -> TextArch, weight table covering every HF
    tensor, template of this family, plain/3-D positions of the right shape, HF forward inputs,
    the HF model class, vision tower build + merge keys, PEFT module paths that exist."""
    from mvlm.convert.mapping import Mapping
    from mvlm.data.template import Template, get_template
    from mvlm.models.gpt import TextArch
    from mvlm.testing.tiny_models import TinySpec, tiny_config

    spec = get_family(name)
    assert isinstance(spec, FamilySpec) and name in spec.model_types
    ckpt = tiny_ckpt(name)
    cfg = transformers.AutoConfig.from_pretrained(ckpt)
    assert cfg.model_type in spec.model_types
    assert isinstance(spec.tiny_spec(), TinySpec)
    assert tiny_config(name).model_type == cfg.model_type

    arch = spec.text_arch(cfg)
    assert isinstance(arch, TextArch) and arch.num_layers >= 1

    table = spec.mappings(cfg, arch)
    assert table and all(isinstance(m, Mapping) for m in table)
    patterns = [_hf_regex(h) for m in table for h in m.hf]
    disk = _disk_names(ckpt)
    uncovered = [n for n in disk if not any(p.match(n) for p in patterns)]
    assert not uncovered, f"{name}: HF tensors without a mapping: {uncovered[:5]}"

    tpl = get_template(ckpt)
    assert isinstance(tpl, spec.template_class()) and issubclass(spec.template_class(), Template)
    assert tpl.family == name and tpl.is_multimodal == spec.is_vlm
    enc = tpl.encode({"messages": [{"role": "user", "content": "Hi"},
                                   {"role": "assistant", "content": "Ok."}]})
    ids = enc["input_ids"][None]
    pos = spec.position_ids(cfg, ids, {})
    assert pos.shape == (3, 1, ids.shape[1]) and pos.dtype == torch.long
    assert torch.equal(pos[:, 0], enc["position_ids"])  # text rows: model side == data side
    assert torch.equal(pos, torch.arange(ids.shape[1]).expand(3, 1, -1))

    hf_cls = getattr(transformers, spec.hf_model_class)
    model = hf_cls.from_pretrained(ckpt)
    inputs = spec.hf_forward_inputs(model.config, {"input_ids": ids, "position_ids": pos})
    assert torch.equal(inputs["input_ids"], ids)
    model(**inputs)

    params = dict(model.named_parameters())
    # transformers 5 holds routed experts fused (mlp.experts.gate_up_proj): per-expert disk
    # names have no module of their own there, for peft neither.
    missing = [n for n in disk if ".experts." not in n and spec.peft_module_path(n) not in params]
    assert not missing, f"{name}: PEFT module paths not in {spec.hf_model_class}: {missing[:5]}"

    if spec.is_vlm:
        _media_positions_agree(spec, cfg, tpl, tmp_path)
        tower = spec.vision.build(cfg, torch.float32, "cpu")
        assert isinstance(tower, torch.nn.Module)
        assert all(isinstance(v, int) for v in spec.token_ids(cfg).values())
        assert spec.vision.peft_tower_prefixes and all(
            any(p.startswith(pre) for p in params) for pre in spec.vision.peft_tower_prefixes)
        tower_params = ["vision_model." + n for n, _ in tower.named_parameters()]
        for a in spec.aligner_prefixes:  # --freeze_aligner / --aligner_lr select something
            assert any(n.startswith(a) for n in tower_params), a


def _media_positions_agree(spec, cfg, tpl, tmp_path) -> None:
    """An image + video sample: the family's model-side positions (what --verify and the tuners'
    checks use) equal the template's, which equal HF's (test_data_hf_equality/test_data_media)."""
    import av
    import numpy as np
    from PIL import Image

    with av.open(str(tmp_path / "v.mp4"), "w") as c:
        st = c.add_stream("mpeg4", rate=8)
        st.width, st.height, st.pix_fmt = 64, 48, "yuv420p"
        for i in range(8):
            frame = np.full((48, 64, 3), i * 30, np.uint8)
            for pkt in st.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 84, 3), np.uint8))
    kinds = {k.name for k in spec.media}  # a family without videos (LLaVA) gets the image only
    video, audio = "video" in kinds, "audio" in kinds
    if audio:  # 0.5 s of noise, 16 kHz mono int16
        import wave

        with wave.open(str(tmp_path / "a.wav"), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
            w.writeframes(np.random.default_rng(0).integers(-3000, 3000, 8000, np.int16).tobytes())
    enc = tpl.encode({"messages": [{"role": "user",
                                    "content": ("<image>and<video>?" if video else "<image>?")
                                    + ("<audio>" if audio else "")},
                                   {"role": "assistant", "content": "Both."}],
                      "images": [img], "videos": ["v.mp4"] if video else [],
                      "audios": ["a.wav"] if audio else []},
                     base_dir=str(tmp_path))
    media = {k: enc[k] for k in spec.batch_keys if k in enc}
    assert kinds == {k.name for k in spec.media if k.features_key in media}
    pos = spec.position_ids(cfg, enc["input_ids"][None], media)
    assert torch.equal(pos[:, 0], enc["position_ids"])


def _mvlm_sources() -> dict[str, str]:
    return {p.relative_to(MVLM).as_posix(): p.read_text() for p in sorted(MVLM.rglob("*.py"))}


def _literals_outside_their_folder(sources: dict[str, str]) -> list[str]:
    """``"model_type"`` / ``'model_type'`` literals of a family anywhere in ``sources`` (paths
    relative to mvlm/) except its own folder and the registry, and imports of a family's modules
    from outside the family folders."""
    hits = []
    for spec in families():
        own = f"models/{spec.name}/"
        words = set(spec.model_types) | {spec.name}
        alternatives = "|".join(map(re.escape, sorted(words)))
        literal = re.compile(r"""["'](""" + alternatives + r""")["']""")
        imports = re.compile(r"\bmvlm\.models\." + re.escape(spec.name) + r"\b")
        for rel, text in sources.items():
            if rel.startswith(own) or rel == "models/registry.py":
                continue
            for m in literal.finditer(text):
                if (rel, m.group(1)) not in ALLOWED_LITERALS:
                    line = text.count("\n", 0, m.start()) + 1
                    hits.append(f"mvlm/{rel}:{line}: {m.group(0)}")
            in_family_folder = rel.startswith("models/") and rel.count("/") == 2
            if not in_family_folder:
                for m in imports.finditer(text):
                    line = text.count("\n", 0, m.start()) + 1
                    hits.append(f"mvlm/{rel}:{line}: {m.group(0)}")
    return hits


def test_nothing_outside_a_family_folder_names_its_model_type():
    hits = _literals_outside_their_folder(_mvlm_sources())
    assert not hits, ("family model types named outside mvlm/models/<name>/ (read the family "
                      "from mvlm.models.registry instead):\n" + "\n".join(hits))


def test_the_scan_catches_a_planted_literal():
    """The scan above can fail: a module that dispatches on a model_type, or imports a family
    module, is reported with its line."""
    name = NAMES[0]
    sources = _mvlm_sources()
    sources["data/planted.py"] = f'import os\nIS_X = model_type in ("{name}",)\n'
    sources["train/planted.py"] = f"from mvlm.models.{name} import weights\n"
    assert _literals_outside_their_folder(sources) == [
        f'mvlm/data/planted.py:2: "{name}"', f"mvlm/train/planted.py:1: mvlm.models.{name}"]
