"""OpenGVLab's original InternVL layout (remote-code ``InternVLChatModel``, config.json
``"model_type": "internvl_chat"``), read as the ``-hf`` layout the family's tables name.

Why a translation instead of a second weight table: the tensors are the same numbers under other
names (and the ViT's q/k/v fused into one ``attn.qkv``), so presenting them under the ``-hf``
names keeps one table, one tower and one export path. Nothing is copied: a renamed tensor is the
same byte range of the same file, and q, k and v are three row ranges of ``attn.qkv`` (rows are
contiguous on disk), so reads, memory maps and the coverage check work as for any directory.

Config: ``llm_config`` becomes ``text_config``; ``vision_config`` (``intern_vit_6b``) becomes an
``InternVLVisionConfig``; ``select_layer`` -> ``vision_feature_layer``; the ``<IMG_CONTEXT>``
id comes from the tokenizer files (the original config has none). Export (``--to hf``) writes
the ``-hf`` layout and config.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import transformers

from mvlm.convert.hf_io import CheckpointError, SafetensorsReader, TensorLoc

log = logging.getLogger(__name__)

MODEL_TYPE = "internvl_chat"
IMAGE_TOKEN = "<IMG_CONTEXT>"
# Original tensor name -> -hf name, outside the ViT's layers.
_TOP_RENAMES = {
    "vision_model.embeddings.class_embedding": "vision_tower.embeddings.cls_token",
    "vision_model.embeddings.patch_embedding.weight":
        "vision_tower.embeddings.patch_embeddings.projection.weight",
    "vision_model.embeddings.patch_embedding.bias":
        "vision_tower.embeddings.patch_embeddings.projection.bias",
    "vision_model.embeddings.position_embedding": "vision_tower.embeddings.position_embeddings",
    "mlp1.0.weight": "multi_modal_projector.layer_norm.weight",
    "mlp1.0.bias": "multi_modal_projector.layer_norm.bias",
    "mlp1.1.weight": "multi_modal_projector.linear_1.weight",
    "mlp1.1.bias": "multi_modal_projector.linear_1.bias",
    "mlp1.3.weight": "multi_modal_projector.linear_2.weight",
    "mlp1.3.bias": "multi_modal_projector.linear_2.bias",
}
# Within ``vision_model.encoder.layers.N.`` -> within ``vision_tower.encoder.layer.N.``.
_LAYER_RENAMES = {
    "attn.proj.weight": "attention.projection_layer.weight",
    "attn.proj.bias": "attention.projection_layer.bias",
    "attn.q_norm.weight": "attention.q_norm.weight",
    "attn.k_norm.weight": "attention.k_norm.weight",
    "norm1.weight": "layernorm_before.weight",
    "norm1.bias": "layernorm_before.bias",
    "norm2.weight": "layernorm_after.weight",
    "norm2.bias": "layernorm_after.bias",
    "ls1": "lambda_1",
    "ls2": "lambda_2",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$")
_QKV = re.compile(r"^attn\.qkv\.(weight|bias)$")
_LLM_PREFIX = "language_model."  # the same names in both layouts
_ANNOUNCED: set[Path] = set()


def _raw_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "config.json").read_text())


def _check_llm(llm: dict[str, Any], model_dir: str | os.PathLike) -> None:
    """InternLM2 LLMs (some InternVL 2.5 sizes) have fused ``wqkv`` weights and remote code of
    their own: refused by name rather than failing later on missing tensors."""
    mt = str(llm.get("model_type", ""))
    archs = [str(a) for a in llm.get("architectures") or []]
    if "internlm" in mt.lower() or any("InternLM" in a for a in archs):
        raise ValueError(f"{model_dir}: llm_config is InternLM2 (model_type {mt!r}, "
                         f"architectures {archs}); mvlm reads original-layout InternVL with a "
                         "Qwen2 / Qwen3 LLM only (InternVL 2.5 8B/26B and similar sizes are not "
                         "supported)")
    if mt not in transformers.CONFIG_MAPPING:
        raise ValueError(f"{model_dir}: llm_config model_type {mt!r} is not a transformers "
                         "config; expected qwen2 or qwen3")


def _image_token_id(model_dir: Path) -> int:
    """``<IMG_CONTEXT>``'s id from tokenizer.json or tokenizer_config.json (the original config
    does not store it; the remote code looks it up in the tokenizer too)."""
    tok = model_dir / "tokenizer.json"
    if tok.exists():
        for t in json.loads(tok.read_text()).get("added_tokens", []):
            if t.get("content") == IMAGE_TOKEN:
                return int(t["id"])
    tc = model_dir / "tokenizer_config.json"
    if tc.exists():
        for i, t in (json.loads(tc.read_text()).get("added_tokens_decoder") or {}).items():
            if t.get("content") == IMAGE_TOKEN:
                return int(i)
    raise ValueError(f"{model_dir}: no {IMAGE_TOKEN} token in tokenizer.json or "
                     "tokenizer_config.json; an InternVL tokenizer defines it")


def _vision_config(raw: dict[str, Any], model_dir: str | os.PathLike
                   ) -> transformers.InternVLVisionConfig:
    vc = raw["vision_config"]
    size = int(vc["image_size"])
    forced = raw.get("force_image_size")
    if forced is not None and int(forced) != size:
        raise ValueError(f"{model_dir}: force_image_size {forced} differs from the ViT's "
                         f"image_size {size}; mvlm reads only checkpoints where they agree")
    patch = int(vc["patch_size"])
    dropout = float(vc.get("dropout", 0.0))
    return transformers.InternVLVisionConfig(
        hidden_size=vc["hidden_size"], num_attention_heads=vc["num_attention_heads"],
        intermediate_size=vc["intermediate_size"], num_hidden_layers=vc["num_hidden_layers"],
        image_size=[size, size], patch_size=[patch, patch],
        num_channels=vc.get("num_channels", 3),
        attention_bias=bool(vc.get("qkv_bias", True)),
        use_qk_norm=bool(vc.get("qk_normalization", False)),
        layer_norm_eps=vc.get("layer_norm_eps", 1e-6), norm_type=vc.get("norm_type", "rms_norm"),
        hidden_act=vc.get("hidden_act", "gelu"),
        # InternViT has no final norm: HF's tower skips it exactly when use_mean_pooling
        use_mean_pooling=True,
        layer_scale_init_value=vc.get("initializer_factor", 0.1),
        initializer_range=vc.get("initializer_range", 0.02),
        attention_dropout=vc.get("attention_dropout", 0.0), hidden_dropout_prob=dropout,
        projection_dropout=dropout)


def original_config(model_dir: str | os.PathLike) -> transformers.InternVLConfig:
    """The ``InternVLConfig`` (-hf terms) of an ``internvl_chat`` directory."""
    raw = _raw_config(model_dir)
    if raw.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{model_dir}: model_type {raw.get('model_type')!r}, not {MODEL_TYPE!r}")
    llm = dict(raw["llm_config"])
    _check_llm(llm, model_dir)
    if raw.get("ps_version", "v1") != "v2":
        raise ValueError(f"{model_dir}: ps_version {raw.get('ps_version')!r}; transformers' "
                         "InternVL (and mvlm) implement the pixel shuffle of ps_version v2 only")
    text = transformers.CONFIG_MAPPING[llm["model_type"]](**llm)
    vision = _vision_config(raw, model_dir)
    ratio = float(raw.get("downsample_ratio", 0.5))
    tokens = int((vision.image_size[0] // vision.patch_size[0]) ** 2 * ratio ** 2)
    cfg = transformers.InternVLConfig(
        text_config=text, vision_config=vision,
        image_token_id=_image_token_id(Path(model_dir)), image_seq_length=tokens,
        downsample_ratio=ratio, vision_feature_layer=int(raw.get("select_layer", -1)),
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
        # the remote code's LLM ties (or not) by its own config; -hf reads the top-level flag
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)))
    dtype = raw.get("torch_dtype") or raw.get("dtype") or llm.get("torch_dtype")
    if dtype is not None:  # what the weights are stored as (convert keeps it by default)
        cfg.dtype = dtype
        cfg.vision_config.dtype = dtype
    return cfg


def _expected(raw: dict[str, Any]) -> set[str]:
    """Every ViT / projector tensor an original checkpoint of this config must have."""
    vc = raw["vision_config"]
    names = set(_TOP_RENAMES)
    layer = ["attn.qkv.weight", "attn.proj.weight", "attn.proj.bias", "ls1", "ls2",
             "norm1.weight", "norm2.weight", "mlp.fc1.weight", "mlp.fc1.bias",
             "mlp.fc2.weight", "mlp.fc2.bias"]
    if vc.get("qkv_bias", True):
        layer.append("attn.qkv.bias")
    if vc.get("qk_normalization", False):
        layer += ["attn.q_norm.weight", "attn.k_norm.weight"]
    if vc.get("norm_type", "rms_norm") == "layer_norm":
        layer += ["norm1.bias", "norm2.bias"]
    for i in range(int(vc["num_hidden_layers"])):
        names.update(f"vision_model.encoder.layers.{i}.{s}" for s in layer)
    return names


class OriginalInternVLReader(SafetensorsReader):
    """A :class:`SafetensorsReader` over an ``internvl_chat`` directory that answers to the
    ``-hf`` names only. :meth:`keys` stays the on-disk names and :meth:`disk_name` maps back
    (q/k/v all to their ``attn.qkv``), so the coverage check names what is in the files."""

    def __init__(self, model_dir: str | os.PathLike) -> None:
        super().__init__(model_dir)
        raw = _raw_config(self.dir)
        _check_llm(dict(raw.get("llm_config") or {}), self.dir)
        missing = _expected(raw) - set(self.weight_map)
        if missing:
            from mvlm.convert.bridge import summarize_names

            raise CheckpointError(
                f"{self.dir}: an original-layout InternVL (model_type {MODEL_TYPE!r}) whose "
                f"weights lack the vision tower / projector: missing tensors "
                f"{summarize_names(missing)}")
        self._hf: dict[str, TensorLoc] = {}
        self._disk: dict[str, str] = {}
        for name in self.weight_map:
            for hf, loc in self._translate(name):
                self._hf[hf] = loc
                self._disk[hf] = name
        if self.dir not in _ANNOUNCED:  # one line per directory, not per open
            _ANNOUNCED.add(self.dir)
            log.info("%s: OpenGVLab's original InternVL layout, read as transformers' -hf "
                     "names (an export writes the -hf layout)", self.dir)

    def _translate(self, name: str) -> list[tuple[str, TensorLoc]]:
        """The -hf name(s) and byte locations of one on-disk tensor; none for a name neither
        layout has (it then shows up as unexpected in the coverage check)."""
        loc = self._locs[name]
        if name.startswith(_LLM_PREFIX):
            return [(name, loc)]
        if name in _TOP_RENAMES:
            return [(_TOP_RENAMES[name], loc)]
        m = _LAYER.match(name)
        if m is None:
            return []
        prefix, rest = f"vision_tower.encoder.layer.{m.group(1)}.", m.group(2)
        if rest in _LAYER_RENAMES:
            return [(prefix + _LAYER_RENAMES[rest], loc)]
        qkv = _QKV.match(rest)
        if qkv is None:
            return []
        return [(f"{prefix}attention.{p}_proj.{qkv.group(1)}", part)
                for p, part in zip("qkv", _split_rows(loc, 3, self.dir))]

    def __contains__(self, name: str) -> bool:
        return name in self._hf

    def disk_name(self, name: str) -> str:
        return self._disk.get(name, name)

    def shape(self, name: str) -> list[int]:
        return list(self._loc(name).shape)

    def _loc(self, name: str) -> TensorLoc:
        try:
            return self._hf[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} not found in {self.dir} (original "
                                  "InternVL layout, read under the -hf names)") from None


def _split_rows(loc: TensorLoc, parts: int, where: Path) -> list[TensorLoc]:
    """``parts`` equal row blocks of a tensor as locations of their own (rows are contiguous
    in a row-major file, so each block is one byte range)."""
    rows = loc.shape[0]
    if rows % parts:
        raise CheckpointError(f"{where}: {loc.name!r} has {rows} rows, not {parts} equal blocks "
                              "(fused q;k;v)")
    n = rows // parts
    row_bytes = loc.dtype.itemsize
    for s in loc.shape[1:]:
        row_bytes *= s
    return [TensorLoc(loc.name, loc.file, loc.offset + i * n * row_bytes, loc.dtype,
                      [n, *loc.shape[1:]]) for i in range(parts)]


class OriginalLayout:
    """The adapter ``FamilySpec.foreign_layouts`` names (see mvlm.models.registry)."""

    @staticmethod
    def config(model_dir: str | os.PathLike) -> transformers.InternVLConfig:
        return original_config(model_dir)

    @staticmethod
    def reader(model_dir: str | os.PathLike) -> OriginalInternVLReader:
        return OriginalInternVLReader(model_dir)


ADAPTER = OriginalLayout()
