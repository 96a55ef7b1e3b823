"""The registry entry shared by the any-resolution LLaVA families (NeXT and OneVision).

Why one builder: the two families differ only in their names, the HF projector class, which
of :mod:`mvlm.models.llava.anyres`'s merge/input functions they use (``next_*`` or
``onevision_*``) and their media kinds; the rest of their ``FamilySpec`` (LLaVA's text
architecture, the tower/projector prefixes, the module tree plus ``image_newline``) is the
same. The heavy modules (transformers' modeling files, the tower) are imported on first use,
so registering a family stays cheap.
"""
from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

from mvlm.models.llava import MODULE_TREE_PREFIXES, PEFT_TOWER_PREFIXES, llava_text_arch
from mvlm.models.registry import FamilySpec, MediaKind, VisionSpec, register

_ANYRES = "mvlm.models.llava.anyres"


def _attr(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _call(path: str, *args: Any) -> Any:
    return _attr(path)(*args)


def _build_tower(projector: str, cfg: Any, dtype: Any, device: str) -> Any:
    from mvlm.models.llava.anyres import AnyresTower

    return AnyresTower.build_with(_attr(projector), cfg, dtype, device)


def _lazy(path: str) -> Callable[..., Any]:
    # a partial of a module-level function: picklable, resolved when called
    return functools.partial(_call, path)


def register_anyres_family(*, name: str, hf_model_class: str, projector: str, flavour: str,
                           media: tuple[MediaKind, ...], template: str) -> FamilySpec:
    """Register ``mvlm.models.<name>`` as an any-resolution LLaVA family.

    ``projector`` is ``"module:Class"`` of transformers' projector; ``flavour`` picks
    ``anyres.<flavour>_merge`` / ``_hf_inputs`` / ``_from_processor``; ``template`` is the
    class name in the family's ``template.py``.
    """
    package = f"mvlm.models.{name}"
    return register(FamilySpec(
        name=name,
        model_types=(name,),
        hf_model_class=hf_model_class,
        text_arch=llava_text_arch,
        weights=f"{package}.weights:mappings",
        template=f"{package}.template:{template}",
        tiny=f"{package}.tiny:TINY",
        vision=VisionSpec(build=functools.partial(_build_tower, projector), media=media,
                          aligner_prefixes=("vision_model.multi_modal_projector.",
                                            "vision_model.image_newline"),
                          merge=_lazy(f"{_ANYRES}:{flavour}_merge"),
                          from_processor=_lazy(f"{_ANYRES}:{flavour}_from_processor"),
                          peft_tower_prefixes=PEFT_TOWER_PREFIXES),
        hf_forward_inputs=_lazy(f"{_ANYRES}:{flavour}_hf_inputs"),
        module_tree_prefixes=MODULE_TREE_PREFIXES + (("model.image_newline", "image_newline"),),
    ))
