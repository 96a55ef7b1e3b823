"""Qwen2.5-Omni thinker: a Qwen2 language model with 3-D mRoPE, a Qwen2.5-VL-style vision
encoder and a Whisper-style audio encoder (``Qwen2_5OmniThinkerForConditionalGeneration``; the
talker and token2wav of the full Omni model generate speech and are not trained here).

Media enter as ``<|vision_bos|><|IMAGE|>*N<|vision_eos|>`` (videos with ``<|VIDEO|>``) and
``<|audio_bos|><|AUDIO|>*M<|audio_eos|>``; ``template.py`` expands each single pad to the count
the processor gives (``t*h*w/merge^2`` for pixels, the two stride-2 reductions of the mel length
for audio). Both encoders run on the first pipeline stage (``tower.py``) and their features
replace the pads (``merge``). Positions: the thinker's own mRoPE (``positions.py``: videos
spaced by ``position_id_per_seconds`` per second, the token after a block at the block's largest
position on any axis + 1, audio tokens advancing like text), as transformers' ``get_rope_index``
computes them, also for ``USE_AUDIO_IN_VIDEO`` rows (one video's audio track time-interleaved
with its frames, recognised from the tokens; see ``template.py`` for the row format).
Files: ``weights.py`` (decoder table + both encoders kept whole), ``template.py``, ``tiny.py``,
``tower.py``, ``positions.py``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mvlm.models.qwen2_vl import vl_text_arch
from mvlm.models.registry import (
    FamilySpec,
    MediaKind,
    UnsupportedModelError,
    VisionSpec,
    register,
)

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PretrainedConfig

    from mvlm.models.gpt import TextArch

# The batch keys are HF's processor output names, so processor outputs pass through unchanged.
IMAGE = MediaKind("image", token_attr="image_token_id", features_key="pixel_values",
                  grid_key="image_grid_thw", dtypes={"image_grid_thw": "long"})
VIDEO = MediaKind("video", token_attr="video_token_id", features_key="pixel_values_videos",
                  grid_key="video_grid_thw", extra_keys=("second_per_grid_ts",),
                  dtypes={"video_grid_thw": "long"})
AUDIO = MediaKind("audio", token_attr="audio_token_id", features_key="input_features",
                  extra_keys=("feature_attention_mask",),
                  dtypes={"feature_attention_mask": "long"})
MEDIA = (IMAGE, VIDEO, AUDIO)
# ms-swift's aligner of qwen2_5_omni: the ViT's patch merger and the audio encoder's projection.
ALIGNER_PREFIXES = ("vision_model.visual.merger.", "vision_model.audio_tower.proj.")
# transformers 5's module tree nests the decoder and both encoders under ``model.``.
MODULE_TREE_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."),
                        ("model.audio_tower.", "audio_tower."))
PEFT_TOWER_PREFIXES = ("model.visual.", "model.audio_tower.")


def text_arch(cfg: PretrainedConfig) -> TextArch:
    """The thinker's decoder (Qwen2 with mRoPE). The full Qwen2.5-Omni checkpoint (model_type
    ``qwen2_5_omni``: thinker + talker + token2wav, weights under ``thinker.``) is refused here
    with the one-line extraction of its thinker."""
    if getattr(cfg, "thinker_config", None) is not None:
        raise UnsupportedModelError(
            "this is a full Qwen2.5-Omni checkpoint (thinker + talker + token2wav); mvlm trains "
            "the thinker: save it alone first, e.g. Qwen2_5OmniForConditionalGeneration."
            "from_pretrained(src).thinker.save_pretrained(dst) and copy the processor files "
            "(Qwen2_5OmniProcessor.from_pretrained(src).save_pretrained(dst)), then pass dst")
    return vl_text_arch(cfg)


def position_ids(hf_config: PretrainedConfig, input_ids: torch.Tensor,
                 media: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[3, B, S] Omni mRoPE (``positions.py``) for unpadded rows; each row consumes the next
    images/videos of the batch in order."""
    import torch

    from mvlm.models.qwen2_5_omni.positions import omni_rope_index

    rows, img, vid = [], 0, 0
    image, video = media.get("image_grid_thw"), media.get("video_grid_thw")
    seconds = media.get("second_per_grid_ts")
    for row in input_ids:
        pos, n_img, n_vid = omni_rope_index(
            row, image_token_id=hf_config.image_token_id, video_token_id=hf_config.video_token_id,
            spatial_merge_size=hf_config.vision_config.spatial_merge_size,
            position_id_per_seconds=hf_config.position_id_per_seconds,
            image_grid_thw=None if image is None else image[img:],
            video_grid_thw=None if video is None else video[vid:],
            second_per_grid_ts=None if seconds is None else seconds[vid:],
            audio_token_id=hf_config.audio_token_id,
            audio_start_token_id=hf_config.audio_start_token_id,
            seconds_per_chunk=getattr(hf_config, "seconds_per_chunk", 2))
        rows.append(pos)
        img, vid = img + n_img, vid + n_vid
    return torch.stack(rows, dim=1)


def hf_forward_inputs(hf_config: PretrainedConfig, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The thinker's forward inputs. No position ids: with an attention mask transformers
    computes its own mRoPE (``get_rope_index``), so a check against it tests ours too."""
    import torch

    ids = batch["input_ids"]
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                "input_features", "feature_attention_mask"):
        if key in batch:
            kwargs[key] = batch[key]
    if "second_per_grid_ts" in batch:
        kwargs["video_second_per_grid"] = batch["second_per_grid_ts"]
    # USE_AUDIO_IN_VIDEO rows (a video opened by <|vision_bos|><|audio_bos|>): transformers
    # needs to be told, its mRoPE reads the block differently
    if bool(((ids[:, :-1] == hf_config.audio_start_token_id)
             & (ids[:, 1:] == hf_config.video_token_id)).any()):
        kwargs["use_audio_in_video"] = True
    return kwargs


def merge(tower: nn.Module, emb: torch.Tensor, input_ids: torch.Tensor,
          media: Mapping[str, torch.Tensor], hf_config: PretrainedConfig) -> torch.Tensor:
    """Each kind's encoder features scattered into its placeholder tokens; audio goes to the
    tower packed with its mask (``tower.pack_audio``: one row per audio item, so the TP x CP
    split divides audios like images)."""
    from mvlm.models.qwen2_5_omni.tower import pack_audio
    from mvlm.models.vision import scatter_features

    feats = {}
    for kind in (IMAGE, VIDEO):
        if media.get(kind.features_key) is not None:
            feats[kind.name] = tower(media[kind.features_key], media[kind.grid_key])
    if media.get("input_features") is not None:
        mask = media.get("feature_attention_mask")
        if mask is None:
            raise ValueError("input_features without feature_attention_mask: encode the audio "
                             "with the model's processor (it returns both)")
        feats["audio"] = tower(pack_audio(media["input_features"], mask), None)
    return scatter_features(emb, input_ids, feats, MEDIA, QWEN2_5_OMNI.token_ids(hf_config))


def _tower(cfg: PretrainedConfig, dtype: torch.dtype, device: str) -> nn.Module:
    from mvlm.models.qwen2_5_omni.tower import OmniTower

    return OmniTower.build(cfg, dtype, device)


QWEN2_5_OMNI = register(FamilySpec(
    name="qwen2_5_omni",
    model_types=("qwen2_5_omni_thinker", "qwen2_5_omni"),
    hf_model_class="Qwen2_5OmniThinkerForConditionalGeneration",
    text_arch=text_arch,
    weights="mvlm.models.qwen2_5_omni.weights:mappings",
    template="mvlm.models.qwen2_5_omni.template:Qwen2_5OmniTemplate",
    tiny="mvlm.models.qwen2_5_omni.tiny:TINY",
    vision=VisionSpec(build=_tower, media=MEDIA, aligner_prefixes=ALIGNER_PREFIXES,
                      merge=merge, peft_tower_prefixes=PEFT_TOWER_PREFIXES),
    position_ids=position_ids,
    hf_forward_inputs=hf_forward_inputs,
    module_tree_prefixes=MODULE_TREE_PREFIXES,
))
