"""InternVL 2.5 / 3 / 3.5 in transformers' native layout (``InternVLForConditionalGeneration``,
the ``OpenGVLab/InternVL*-hf`` checkpoints): InternViT, a pixel-shuffle MLP projector and any LLM
mvlm has a text family for (Qwen2 for InternVL 2.5 / 3, Qwen3 for InternVL 3.5).

Images are cut into tiles by the processor (dynamic tiling: the grid of square tiles whose aspect
ratio best fits the image, between ``min_patches`` and ``max_patches`` tiles, plus a thumbnail of
the whole image when there is more than one tile). Every tile is one ViT input of the same size;
its patch features are pixel-shuffled (``downsample_ratio`` 0.5: 2 x 2 neighbours concatenated)
and projected, so a tile is ``image_seq_length`` ``<IMG_CONTEXT>`` tokens and an image is
``<img>`` + tiles * image_seq_length ``<IMG_CONTEXT>`` + ``</img>``. The tower's input is the
batch of tiles ``pixel_values [n_tiles, 3, H, W]`` with no grid; positions are plain 1-D RoPE.
Files: ``weights.py`` (the LLM's decoder table + tower and projector kept whole),
``template.py``, ``tiny.py``, ``tower.py``.

OpenGVLab's original (remote-code, ``"model_type": "internvl_chat"``) checkpoints, e.g.
``OpenGVLab/InternVL3_5-1B``, name the same tensors differently (``vision_model.*``,
``mlp1.{0,1,3}``; ``language_model.*`` is the same) and fuse the ViT's q/k/v into ``attn.qkv``:
``original.py`` reads them under the ``-hf`` names (renames, q/k/v as row ranges of the fused
tensor, no copy) with the config translated from ``llm_config`` / ``vision_config``, so
``mvlm convert --to mcore`` and ``load_hf_weights`` take either directory; ``--to hf`` writes the
``-hf`` layout. InternLM2 LLMs (some InternVL 2.5 sizes) are refused.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from mvlm.models.llava import MODULE_TREE_PREFIXES, PEFT_TOWER_PREFIXES, hf_forward_inputs
from mvlm.models.registry import FamilySpec, MediaKind, VisionSpec, get_family, register

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PretrainedConfig

    from mvlm.models.gpt import TextArch

# One kind of media: image tiles; the batch key is HF's processor output name.
IMAGE = MediaKind("image", token_attr="image_token_id", features_key="pixel_values")
# The projector (pixel-shuffle MLP) in the tower module; the rest of ``vision_model.`` is the ViT.
ALIGNER_PREFIXES = ("vision_model.multi_modal_projector.",)


def internvl_text_arch(cfg: PretrainedConfig) -> TextArch:
    """The LLM's architecture, from the family registered for ``text_config.model_type``.

    Tying: transformers ties ``lm_head`` to the embeddings exactly when the top-level
    ``tie_word_embeddings`` says so (InternVL's default is True, as in InternVL3-1B); the text
    config's own flag is ignored by ``InternVLForConditionalGeneration``, so it is here too."""
    tc = cfg.text_config
    text_family = get_family(tc.model_type)
    if text_family.is_vlm:
        raise ValueError(f"InternVL text_config.model_type {tc.model_type!r} is a "
                         "vision-language family: the LLM of an InternVL checkpoint must be a "
                         "text model")
    arch = text_family.text_arch(tc)
    arch.tie_word_embeddings = bool(cfg.tie_word_embeddings)
    return arch


def _vision(cfg: PretrainedConfig, dtype: torch.dtype, device: str) -> nn.Module:
    from mvlm.models.internvl.tower import InternVLTower

    return InternVLTower.build(cfg, dtype, device)


INTERNVL = register(FamilySpec(
    name="internvl",
    model_types=("internvl",),
    hf_model_class="InternVLForConditionalGeneration",
    text_arch=internvl_text_arch,
    weights="mvlm.models.internvl.weights:mappings",
    template="mvlm.models.internvl.template:InternVLTemplate",
    tiny="mvlm.models.internvl.tiny:TINY",
    vision=VisionSpec(build=_vision, media=(IMAGE,), aligner_prefixes=ALIGNER_PREFIXES,
                      peft_tower_prefixes=PEFT_TOWER_PREFIXES),
    hf_forward_inputs=hf_forward_inputs,
    # transformers 5 reads and writes InternVL in LLaVA's hub layout (its conversion mapping
    # points ``internvl`` at ``llava``): the module-tree <-> hub prefixes are LLaVA's
    module_tree_prefixes=MODULE_TREE_PREFIXES,
    # OpenGVLab's original remote-code layout, read as the -hf names (original.py)
    foreign_layouts={"internvl_chat": "mvlm.models.internvl.original:ADAPTER"},
))
