"""The ONE registry: HF ``model_type`` -> :class:`FamilySpec`, everything mvlm knows of a family.

A family is one folder, ``mvlm/models/<name>/``:

* ``__init__.py`` builds a :class:`FamilySpec` and calls :func:`register`: HF config -> text
  architecture, the vision tower and how its features merge into the text embeddings, position
  ids (mRoPE or plain), the batch keys of its media, the HF forward inputs used by verification,
  the PEFT module paths and the HF model class;
* ``weights.py`` the mapping table (HF <-> Megatron-Core names), read top to bottom;
* ``template.py`` the chat template and vision-token expansion (a :class:`~mvlm.data.template.
  Template` subclass);
* ``tiny.py`` the tiny config its tests build (a :class:`~mvlm.testing.tiny_models.TinySpec`).

Models, data, convert, verify, tuners and tests read this registry and nothing else: no module
outside a family's folder names a ``model_type`` (``tests/unit/test_family_registry.py`` greps for
it), so adding a family is one folder plus its tests, and an unsupported checkpoint fails here with
the list of what is supported.

This module and the families' ``__init__.py`` import no torch/transformers/megatron at import
time: the data loader, ``mvlm encode`` and ``--help`` reach the registry too. Heavier parts
(weights table, template class, tiny config) are named by ``"module:attribute"`` references and
imported when first asked for.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PretrainedConfig

    from mvlm.convert.mapping import Mapping as WeightMapping
    from mvlm.data.template import Template
    from mvlm.models.gpt import TextArch
    from mvlm.testing.tiny_models import TinySpec


class UnsupportedModelError(ValueError):
    pass


def resolve(ref: str) -> Any:
    """``"package.module:attr"`` -> the attribute (imports the module on first use)."""
    module, _, attr = ref.partition(":")
    if not attr:
        raise ValueError(f"reference {ref!r} must look like 'package.module:attribute'")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class MediaKind:
    """One kind of media a family takes (image, video, ...) and the batch keys that carry it.

    The keys are the batch contract between template, collator, trainer and model: the template
    writes them per sample, the collator concatenates them across the micro-batch (in sample
    order, with the dtype named here), the model reads them back by the same names.
    """

    name: str
    # HF config attribute holding the placeholder token id the features replace
    token_attr: str
    # the tower's input tensor (e.g. ``pixel_values``); its first dim is concatenated over samples
    features_key: str
    # the per-item geometry the tower also takes (e.g. ``image_grid_thw``), or None
    grid_key: str | None = None
    # other per-item tensors the template emits for positions (e.g. ``second_per_grid_ts``)
    extra_keys: tuple[str, ...] = ()
    # dtype name (torch attribute) of every key above; a key missing here is float32
    dtypes: Mapping[str, str] = field(default_factory=dict)
    # True: an item's placeholder count is proportional to its grid product (Qwen-VL patches);
    # False: it depends on more than the grid (any-resolution tiles: unpadding, newlines), so RL
    # code splitting a batch per prompt reads it from the item's run of placeholder tokens
    tokens_follow_grid: bool = True

    @property
    def batch_keys(self) -> tuple[str, ...]:
        grid = (self.grid_key,) if self.grid_key else ()
        return (self.features_key, *grid, *self.extra_keys)

    def dtype_name(self, key: str) -> str:
        return self.dtypes.get(key, "float32")


@dataclass(frozen=True)
class VisionSpec:
    """The vision (or other media) tower of a family and how its output enters the decoder."""

    # (hf_config, params dtype, device) -> module whose forward(features, grid) returns the
    # aligned embeddings [n_placeholder_tokens, text_hidden]; built on the first PP stage only
    build: Callable[[PretrainedConfig, torch.dtype, str], nn.Module]
    media: tuple[MediaKind, ...]
    # Parameter-name prefixes (of VLMModel) that make up the aligner/projector; the rest of
    # ``vision_model.`` is the ViT. Read by --freeze_aligner/--freeze_vit and --aligner_lr.
    aligner_prefixes: tuple[str, ...] = ()
    # (tower, embeddings [s, b, h], input_ids [b, s], media batch, hf_config) -> embeddings with
    # the features merged in; None = scatter each kind's features into its placeholder tokens
    # (mvlm.models.vision.merge_at_placeholders), what Qwen-VL/LLaVA-style models do.
    merge: Callable[..., torch.Tensor] | None = None
    # HF module paths (prefixes) of the tower in the transformers model, for PEFT target names
    peft_tower_prefixes: tuple[str, ...] = ()
    # (hf_config, HF processor output) -> the same media in this family's batch layout, where
    # the two differ (any-resolution LLaVA: padded tiles -> rows + grid); None = the
    # processor's keys are the batch keys. Used where a batch is built from the processor
    # (verification).
    from_processor: Callable[[PretrainedConfig, Mapping[str, Any]], dict[str, Any]] | None = None
    # hf_config -> K DeepStack levels (Qwen3-VL): the tower returns its features and K levels
    # concatenated on the last dim; level i is added after decoder layer i
    # (:mod:`mvlm.models.deepstack`). None: no DeepStack.
    deepstack_levels: Callable[[PretrainedConfig], int] | None = None

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return tuple(k for kind in self.media for k in kind.batch_keys)


def plain_position_ids(hf_config: PretrainedConfig, input_ids: torch.Tensor,
                       media: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[3, B, S] positions 0..S-1 on all three rows: plain RoPE (text-only families)."""
    from mvlm.models.positions import text_positions

    return text_positions(hf_config, input_ids, media)


def text_hf_inputs(hf_config: PretrainedConfig, batch: Mapping[str, Any]) -> dict[str, Any]:
    """HF forward inputs of a text-only family: the token ids (HF derives positions itself)."""
    return {"input_ids": batch["input_ids"]}


@dataclass(frozen=True)
class FamilySpec:
    """Everything one model family knows. See the module docstring for the folder it lives in."""

    name: str
    model_types: tuple[str, ...]
    # transformers class (attribute of ``transformers``) that loads the HF checkpoint, used by
    # verification, the demo and the tuners' PEFT checks
    hf_model_class: str
    text_arch: Callable[[PretrainedConfig], TextArch]
    # "module:function" of the weight table: function(hf_config, arch) -> list[Mapping]
    weights: str
    # "module:Class" of the family's Template subclass
    template: str
    # "module:TINY" of the family's TinySpec
    tiny: str
    vision: VisionSpec | None = None
    # (hf_config, input_ids [B, S], media batch) -> [3, B, S] position ids for unpadded rows
    position_ids: Callable[[PretrainedConfig, torch.Tensor, Mapping[str, torch.Tensor]],
                           torch.Tensor] = plain_position_ids
    # (HF model config, check batch) -> kwargs of the HF model's forward for verification
    hf_forward_inputs: Callable[[PretrainedConfig, Mapping[str, Any]], dict[str, Any]] = \
        text_hf_inputs
    # (module-tree prefix, hub prefix) pairs where the transformers module tree differs from the
    # hub layout the weight table names (Qwen-VL: ``model.language_model.`` <-> ``model.``).
    # PEFT keys follow the module tree; the checkpoint reader accepts either layout.
    module_tree_prefixes: tuple[tuple[str, str], ...] = ()
    # config.json model_type of another layout of this family's checkpoints, one transformers
    # cannot load without remote code -> ``"module:attribute"`` of an object with
    # ``config(model_dir) -> PretrainedConfig`` (the config in this family's own terms) and
    # ``reader(model_dir) -> SafetensorsReader`` (the tensors under this family's hub names).
    foreign_layouts: Mapping[str, str] = field(default_factory=dict)

    # -- derived views ------------------------------------------------------------------------
    @property
    def is_vlm(self) -> bool:
        return self.vision is not None

    @property
    def aligner_prefixes(self) -> tuple[str, ...]:
        return self.vision.aligner_prefixes if self.vision else ()

    @property
    def media(self) -> tuple[MediaKind, ...]:
        return self.vision.media if self.vision else ()

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """The media keys a batch of this family may carry (besides the text keys)."""
        return self.vision.batch_keys if self.vision else ()

    def token_ids(self, hf_config: PretrainedConfig) -> dict[str, int]:
        """Placeholder token id per media kind, read off the HF config."""
        return {k.name: int(getattr(hf_config, k.token_attr)) for k in self.media}

    def mappings(self, hf_config: PretrainedConfig, arch: TextArch) -> list[WeightMapping]:
        """The weight table (``weights.py``)."""
        return resolve(self.weights)(hf_config, arch)

    def peft_module_path(self, hub_name: str) -> str:
        """HF hub-layout tensor/module name -> its path in the transformers module tree."""
        if any(hub_name.startswith(tree) for tree, _ in self.module_tree_prefixes):
            return hub_name
        for tree, hub in self.module_tree_prefixes:
            if hub_name.startswith(hub):
                return tree + hub_name[len(hub):]
        return hub_name

    def template_class(self) -> type[Template]:
        return resolve(self.template)

    def tiny_spec(self) -> TinySpec:
        return resolve(self.tiny)


_REGISTRY: dict[str, FamilySpec] = {}
_FAMILIES: dict[str, FamilySpec] = {}
_loaded = False


def register(spec: FamilySpec) -> FamilySpec:
    """Called by a family's ``__init__.py``; a model_type claimed twice is a bug, so it raises."""
    for mt in spec.model_types:
        other = _REGISTRY.get(mt)
        if other is not None and other.name != spec.name:
            raise ValueError(f"model_type {mt!r} is claimed by families {other.name!r} and "
                             f"{spec.name!r}: give it to one of them")
        _REGISTRY[mt] = spec
    _FAMILIES[spec.name] = spec
    return spec


def _load_builtin() -> None:
    """Import every family folder under mvlm/models/ (importing one registers it)."""
    global _loaded
    if _loaded:
        return
    import mvlm.models as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.ispkg:
            importlib.import_module(f"mvlm.models.{info.name}")
    _loaded = True


def families() -> list[FamilySpec]:
    """Every registered family, sorted by name."""
    _load_builtin()
    return [_FAMILIES[n] for n in sorted(_FAMILIES)]


def supported_model_types() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_family(model_type: str) -> FamilySpec:
    _load_builtin()
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by mvlm. Supported model types: "
            f"{', '.join(supported_model_types())}. Check config.json's \"model_type\", or add a "
            "family folder under mvlm/models/ (see docs/architecture.md, 'Adding a family')."
        ) from None


def module_tree_prefixes(model_type: str | None) -> tuple[tuple[str, str], ...]:
    """The (module-tree prefix, hub prefix) pairs of ``model_type``'s family; none for an
    unknown or missing model_type (the checkpoint is then read in the layout it is stored in,
    and the family lookup that follows names what is supported)."""
    if model_type is None:
        return ()
    _load_builtin()
    spec = _REGISTRY.get(model_type)
    return spec.module_tree_prefixes if spec is not None else ()


def media_keys() -> dict[str, str]:
    """Every media batch key of every family -> its dtype name (collator, trainer, model)."""
    out: dict[str, str] = {}
    for spec in families():
        for kind in spec.media:
            for key in kind.batch_keys:
                dt = kind.dtype_name(key)
                if out.setdefault(key, dt) != dt:
                    raise ValueError(f"batch key {key!r} has dtype {out[key]} in one family and "
                                     f"{dt} in {spec.name}: families must agree on a key's dtype")
    return out



def _config_model_type(model_dir: str | Path) -> str | None:
    """config.json's model_type, None when there is no readable config."""
    import json

    try:
        return json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def foreign_layout(model_dir: str | Path) -> Any | None:
    """The adapter (see ``FamilySpec.foreign_layouts``) for a checkpoint directory stored in a
    layout transformers cannot load by itself (e.g. OpenGVLab's ``internvl_chat``), else None."""
    mt = _config_model_type(model_dir)
    if mt is None:
        return None
    for spec in families():
        if mt in spec.foreign_layouts:
            return resolve(spec.foreign_layouts[mt])
    return None


def load_hf_config(model_dir: str | Path) -> PretrainedConfig:
    """``AutoConfig.from_pretrained(model_dir)``, except that a foreign layout's config is
    translated by its family (transformers would ask for remote code there)."""
    adapter = foreign_layout(model_dir)
    if adapter is not None:
        return adapter.config(model_dir)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)
