"""The Qwen2.5-Omni thinker's two encoders as one first-stage module: HF's
``Qwen2_5OmniVisionEncoder`` (a Qwen2.5-VL ViT with its patch merger) and
``Qwen2_5OmniAudioEncoder`` (Whisper-style convolutions + transformer over 2 * n_window-frame
chunks, average pooling, projection to the text width), both kept whole so the weights map 1:1 and
the numerics are transformers'.

One calling convention serves both, ``tower(x, grid)``, because the split over TP x CP ranks
(:mod:`mvlm.models.vision_parallel`) hands items to the tower that way: images and videos are
``(pixel_values [patches, D], grid_thw)``; audios are ``(packed [n_audio, mel + 1, frames],
None)``, the mel features with the feature attention mask as one extra channel
(:func:`pack_audio`), so that each row is one audio item and the mask travels with its features.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from mvlm.models.vision import vision_attn_impl


def pack_audio(input_features: torch.Tensor, feature_attention_mask: torch.Tensor
               ) -> torch.Tensor:
    """[n, mel, frames] features + [n, frames] mask -> [n, mel + 1, frames] (mask last)."""
    if input_features.dim() != 3 or feature_attention_mask.shape != (
            input_features.shape[0], input_features.shape[2]):
        raise ValueError(f"input_features {tuple(input_features.shape)} and feature_attention_mask"
                         f" {tuple(feature_attention_mask.shape)} do not belong together: expected"
                         " [n_audio, mel, frames] and [n_audio, frames] from the model's processor")
    mask = feature_attention_mask.to(input_features.dtype)[:, None, :]
    return torch.cat([input_features, mask], dim=1)


def audio_output_lengths(feature_lengths: torch.Tensor) -> torch.Tensor:
    """Audio tokens per item from its mel-frame count (the two stride-2 reductions of HF's
    ``_get_feat_extract_output_lengths``)."""
    after_conv = (feature_lengths - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


class OmniTower(nn.Module):
    """forward(x, grid) -> features [n_tokens, text_hidden]: the vision encoder when ``grid`` is
    given (pixels), the audio encoder for a packed audio batch (``grid`` None)."""

    def __init__(self, visual: nn.Module, audio_tower: nn.Module) -> None:
        super().__init__()
        self.visual = visual
        self.audio_tower = audio_tower

    @classmethod
    def build(cls, cfg: PretrainedConfig, dtype: torch.dtype, device: str) -> OmniTower:
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
            Qwen2_5OmniAudioEncoder,
            Qwen2_5OmniVisionEncoder,
        )

        impl = vision_attn_impl(device)
        cfg.vision_config._attn_implementation = impl
        cfg.audio_config._attn_implementation = impl
        with torch.device("cpu" if device == "cpu" else device):
            visual = Qwen2_5OmniVisionEncoder._from_config(cfg.vision_config, dtype=dtype)
            audio = Qwen2_5OmniAudioEncoder._from_config(cfg.audio_config, dtype=dtype)
        return cls(visual, audio)

    def forward(self, x: torch.Tensor, grid: torch.Tensor | None = None) -> torch.Tensor:
        if grid is not None:
            dtype = next(self.visual.parameters()).dtype
            return self.visual(x.to(dtype), grid_thw=grid).pooler_output
        if x.dim() != 3:
            raise ValueError(f"Qwen2.5-Omni pixels need their grid_thw; got a {x.dim()}-D tensor "
                             "without one (the batch was encoded for another model)")
        return self.audio(x[:, :-1], x[:, -1].round().long())

    def audio(self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor
              ) -> torch.Tensor:
        """HF's ``get_audio_features``: the masked frames of every item, concatenated, through
        the audio encoder; one row per audio token, items in order."""
        lengths = feature_attention_mask.sum(dim=1)
        flat = input_features.permute(0, 2, 1)[feature_attention_mask.bool()].permute(1, 0)
        dtype = next(self.audio_tower.parameters()).dtype
        out = self.audio_tower(flat.to(dtype), feature_lens=lengths,
                               aftercnn_lens=(lengths - 1) // 2 + 1).last_hidden_state
        expect = int(audio_output_lengths(lengths).sum())
        if out.shape[0] != expect:
            raise ValueError(f"the audio encoder gave {out.shape[0]} rows for {expect} audio "
                             "tokens: feature_attention_mask does not match input_features")
        return out
