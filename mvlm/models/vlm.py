"""The multimodal Megatron module: vision tower on the first stage, merged embeddings, GPT decoder.

Order of operations on the first pipeline stage, and why:
1. word embeddings of the FULL sequence (every CP rank sees the whole sample, so image tokens in
   any chunk can be filled);
2. image/video embeddings from the vision tower scattered into the image-pad positions (under
   TP/CP > 1 each rank of the TP x CP group runs the tower on its share of the images and the
   features are all-gathered: :mod:`mvlm.models.vision_parallel`);
3. slice to this CP rank's load-balanced chunks (rank r keeps chunks r and 2CP-1-r);
4. scatter to sequence-parallel ranks when SP is on.
Position ids always have 3 rows (mRoPE; equal rows for text-only models) over the full
sequence; Megatron-Core's rotary module slices them per CP rank itself.

The loss is computed here rather than by GPTModel so that padded vocabulary columns (added so the
vocabulary divides TP) can be masked out of the softmax: HF's loss never sees them, so ours must
not either.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from transformers import PretrainedConfig

from mvlm.models import deepstack
from mvlm.models.gpt import (
    RecomputeConfig,
    TextArch,
    build_gpt,
    padded_vocab_size,
    transformer_config,
)
from mvlm.models.registry import FamilySpec, get_family
from mvlm.models.vision import media_features, scatter_features, tower_init
from mvlm.models.vision_parallel import SplitTower, TrainableParam, VisionSplit, tower_trainable
from mvlm.runtime.compat import mark_tp_weights
from mvlm.runtime.cp import split_for_cp
from mvlm.runtime.parallel import ParallelLayout


class VLMModel(MegatronModule):
    """One pipeline stage (or one virtual chunk) of an mvlm model."""

    def __init__(self, family: FamilySpec, hf_config: PretrainedConfig, arch: TextArch,
                 config: TransformerConfig, backend: str, vocab_padded: int, device: str,
                 pre_process: bool, post_process: bool, vp_stage: int | None = None,
                 vit_parallel: bool = True) -> None:
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder  # read by Megatron-Core's schedules
        self.family = family
        self.arch = arch
        self.pre_process = pre_process
        self.post_process = post_process
        self.vocab_padded = vocab_padded
        self.language_model = build_gpt(arch, config, backend, pre_process=pre_process,
                                        post_process=post_process, vocab_padded=vocab_padded,
                                        vp_stage=vp_stage)
        # GPTModel hands its [s, b, V] logits to this when given labels (see sb_token_loss)
        self.language_model.compute_language_model_loss = self.sb_token_loss
        self.vision_model = None
        self.hf_config = hf_config
        self.token_ids = family.token_ids(hf_config)
        if family.is_vlm and pre_process:
            with tower_init(config.perform_initialization):
                self.vision_model = family.vision.build(hf_config, config.params_dtype, device)
        # The TP x CP group the tower's images are divided over (None: every rank runs all).
        self.vision_split: VisionSplit | None = None
        if self.vision_model is not None and vit_parallel:
            self.vision_split = VisionSplit.from_parallel_state()
        self.share_embeddings_and_output_weights = arch.tie_word_embeddings
        # DeepStack (Qwen3-VL): this micro-batch's per-level addends, this rank's rows
        self.deepstack_levels = family.vision.deepstack_levels(hf_config) \
            if family.is_vlm and family.vision.deepstack_levels else 0
        self._deepstack: list[torch.Tensor] | None = None
        if self.deepstack_levels:
            layers = self.language_model.decoder.layers
            deepstack.check_layout(self.deepstack_levels, layers, pre_process,
                                   config.recompute_granularity)
            deepstack.install_hooks(layers, self.deepstack_levels, lambda: self._deepstack)

    # Pipeline plumbing -------------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    # Forward -----------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor,
              media: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Full-sequence embeddings [s, b, h] with the media features merged in (the family's
        ``VisionSpec.merge``; by default scattered into the placeholder tokens)."""
        emb = self.language_model.embedding(input_ids=input_ids, position_ids=None)
        if self.arch.embedding_multiplier != 1.0:  # TextArch option (Gemma)
            emb = emb * torch.tensor(self.arch.embedding_multiplier).to(emb.dtype)
        if self.vision_model is None or not media:
            return emb
        vision = self.family.vision
        if vision.merge is not None:
            tower = self.vision_model if self.vision_split is None else \
                SplitTower(self.vision_model, self.vision_split, self.vision_trainable())
            return vision.merge(tower, emb, input_ids, media, self.hf_config)
        feats = self.vision_features(media)
        if self.deepstack_levels:
            feats, levels = deepstack.split_levels(feats, emb.shape[-1], self.deepstack_levels)
            self._deepstack = deepstack.level_embeddings(emb, input_ids, levels, vision.media,
                                                         self.token_ids)
        return scatter_features(emb, input_ids, feats, vision.media, self.token_ids)

    def vision_features(self, media: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tower's features per media kind (``{"image": [rows, hidden], ...}``), the same on
        every rank; divided over the TP x CP group when ``vision_split`` is set (then every rank
        of that group must call it with the same media)."""
        if self.vision_split is None:
            return media_features(self.vision_model, media, self.family.vision.media)
        return media_features(self.vision_model, media, self.family.vision.media,
                              self.vision_split, self.vision_trainable())

    def vision_trainable(self) -> list[TrainableParam]:
        """Trainable parameters the tower's forward reads: its own, and those of modules that
        act on it from outside its tree -- LoRA/DoRA adapters (:mod:`mvlm.tuners`) live in the
        model's adapter store and name their target by ``global_name`` (``vision_model.*``).
        Read at every call: adapters and freezing come after the model is built."""
        extra = [m for m in self.modules()
                 if str(getattr(m, "global_name", "")).startswith("vision_model.")]
        return tower_trainable(self.vision_model, extra)

    def media_inputs(self, media: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """The family's media tensors out of ``media`` (None values dropped); a tensor under a
        key this family does not know is an error, not silently ignored."""
        out = {k: v for k, v in media.items() if v is not None}
        unknown = sorted(set(out) - set(self.family.batch_keys))
        if unknown:
            raise ValueError(f"{', '.join(unknown)} given to a {self.family.name} model, whose "
                             f"media keys are {list(self.family.batch_keys) or 'none'}: the "
                             "batch was encoded for another model")
        return out

    def forward(self, input_ids: torch.Tensor | None, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                packed_seq_params: PackedSeqParams | None = None,
                gather_logits: bool = False, inference_context=None,
                **media: torch.Tensor | None) -> torch.Tensor:
        """Returns per-token loss [b, s_local] when ``labels`` is given (last stage), logits
        [b, s_local, vocab(/TP unless gathered)] otherwise, hidden states on inner stages.

        ``labels`` are next-token targets aligned with positions (Megatron style), -100 = none;
        ``input_ids``/``labels``/``position_ids`` cover the full sequence on every CP rank.
        ``media``: the family's media batch keys (``FamilySpec.batch_keys``, e.g.
        ``pixel_values=..., image_grid_thw=...``); None values are ignored.

        ``inference_context`` (a Megatron-Core ``StaticInferenceContext``, used by
        :mod:`mvlm.rl.rollout.builtin`): decode with the KV cache it holds; ``input_ids`` are then
        only the new tokens while ``position_ids`` cover the whole sequence so far, and the last
        stage returns the TP-gathered logits of the last position, [b, 1, vocab].
        """
        cfg = self.config
        cp_size = parallel_state.get_context_parallel_world_size()
        cp_rank = parallel_state.get_context_parallel_rank()
        decoder_input = None
        self._deepstack = None
        if self.pre_process:
            emb = self.embed(input_ids, self.media_inputs(media))

            def local(x: torch.Tensor) -> torch.Tensor:  # this rank's rows of a [s, b, h]
                x = split_for_cp(x, 0, cp_size, cp_rank)
                return tensor_parallel.scatter_to_sequence_parallel_region(x) \
                    if cfg.sequence_parallel else x

            decoder_input = local(emb)
            if self._deepstack is not None:
                self._deepstack = [local(x) for x in self._deepstack]
        padding_mask = router_padding_mask(attention_mask, cfg, cp_size, cp_rank,
                                           packed_seq_params, position_ids) \
            if self.arch.num_experts else None
        if attention_mask is not None and attention_mask.dtype == torch.bool and \
                attention_mask.dim() == 2:
            # [b, s] keep-mask -> Megatron's [b, 1, 1, s] masked-out convention (key padding)
            attention_mask = (~attention_mask)[:, None, None, :]
        try:
            if inference_context is not None:
                out = self.language_model(
                    input_ids=None, position_ids=position_ids, attention_mask=attention_mask,
                    decoder_input=decoder_input, labels=None,
                    inference_context=inference_context, runtime_gather_output=True)
                return out[..., : self.arch.vocab_size] if self.post_process else out
            # With labels the last stage returns the per-token loss [b, s_local] computed on
            # the output layer's [s, b, V] logits (sb_token_loss), never transposed.
            lm_labels = split_for_cp(labels, 1, cp_size, cp_rank) \
                if labels is not None and self.post_process else None
            out = self.language_model(
                input_ids=None, position_ids=position_ids, attention_mask=attention_mask,
                decoder_input=decoder_input, labels=lm_labels,
                packed_seq_params=packed_seq_params, padding_mask=padding_mask,
            )
        finally:
            self._deepstack = None  # the hooks of the next micro-batch must not see these
        if not self.post_process or lm_labels is not None:
            return out
        logits = out  # [b, s_local, V_padded / TP]
        logits = self._mask_padded_vocab(logits)
        if labels is None:
            if gather_logits:
                logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
                logits = logits[..., : self.arch.vocab_size]
            return logits
        return token_loss(logits, split_for_cp(labels, 1, cp_size, cp_rank))

    def sb_token_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Per-token loss [b, s] from the output layer's [s, b, V/TP] logits and [b, s] labels.

        Installed as the language model's ``compute_language_model_loss``: Megatron-Core's
        GPTModel returns ``logits.transpose(0, 1).contiguous()`` when it has no labels, a copy of
        the logits forward, and the output layer then copies their non-contiguous gradient
        backward; with labels it hands the [s, b, V] logits here. The cross entropy works row
        by row, so only the small label and loss tensors are transposed: the same numbers as
        :func:`token_loss` on the [b, s, V] logits (tests/unit/test_token_loss.py)."""
        logits = self._mask_padded_vocab(logits)
        return token_loss(logits, labels.transpose(0, 1).contiguous()).transpose(0, 1) \
            .contiguous()

    def _mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """-inf on this rank's padded-vocabulary columns, in place: the logits are the output
        layer's fresh [..., V/TP] tensor, which nothing else holds, so a masked copy of the
        whole tensor is not needed (:class:`FillPaddedVocab`)."""
        if self.vocab_padded == self.arch.vocab_size:
            return logits
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        per = logits.shape[-1]
        start = tp_rank * per
        n_real = max(0, min(per, self.arch.vocab_size - start))
        if n_real == per:
            return logits
        return FillPaddedVocab.apply(logits, n_real)


class FillPaddedVocab(torch.autograd.Function):
    """``logits[..., n_real:] = -inf`` in place; the gradient is the incoming one with those
    columns zero, as ``masked_fill_``'s.

    Why not ``masked_fill_`` with a column mask: it visits every element of the [s, b, V]
    tensor forward and copies the whole gradient backward (1.3 ms + a 4 MB copy per bench
    step). Here the forward writes only the padded columns, and the backward hands the gradient
    on untouched when those columns are already zero -- what any softmax-based loss gives at a
    -inf logit (Megatron's cross entropy: ``exp(-inf) = 0``) -- checked on CPU by reading them;
    otherwise (and on accelerators, where the check would wait for the device) it zeroes them
    in a copy, as ``masked_fill_``'s backward did."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, n_real: int) -> torch.Tensor:
        logits[..., n_real:] = float("-inf")
        ctx.mark_dirty(logits)
        ctx.n_real = n_real
        return logits

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        pad = grad[..., ctx.n_real:]
        if grad.device.type != "cpu" or bool(pad.any()):
            grad = grad.clone()
            grad[..., ctx.n_real:] = 0.0
        return grad, None


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy [b, s] of [b, s, V/TP] logits; 0 where ``labels`` is -100.

    Megatron-Core's vocab-parallel cross entropy works row by row over any leading dims, so it
    runs on the logits in the [b, s] order the model returns them: transposing to [s, b] and
    back (a copy of the logits forward and of their gradient backward, plus the loss's) gave
    the same numbers. It works in place on fp32 input, which is why the logits are consumed.
    """
    loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.clamp(min=0))
    return loss * (labels >= 0)


def router_padding_mask(attention_mask: torch.Tensor | None, cfg, cp_size: int,
                        cp_rank: int, packed_seq_params: PackedSeqParams | None = None,
                        position_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """This rank's [b, s_local] pad mask (True = pad) for the MoE router, or None.

    Pads appended to even out lengths (PP: one shape per step; EP: one length over the EP ranks;
    a padded micro-batch) must not count in the router's aux loss or tokens-per-expert, else the
    layout changes the gradients (tests/dist/test_train_parity_more.py, padding cases).
    Padded batches say where the pads are with their key-padding ``attention_mask``; packed rows
    carry none, and their pads are the tail at or beyond ``cu_seqlens[-1]`` (the full,
    pre-CP-split row; ``position_ids`` [.., b, S] give its shape). Not covered: under CP with
    packing, the pads each sample gets to a multiple of 2*CP lie inside the (padded)
    ``cu_seqlens`` the model is given, so they still reach the router.
    Megatron-Core takes ``padding_mask`` in the hidden states' local sequence layout: split for
    CP like the sequence, and cut to this TP rank's chunk under sequence parallel."""
    if attention_mask is not None and attention_mask.dtype == torch.bool and \
            attention_mask.dim() == 2:
        pad = ~attention_mask
    elif packed_seq_params is not None and packed_seq_params.cu_seqlens_q is not None and \
            position_ids is not None:
        b, s = position_ids.shape[-2:]
        end = int(packed_seq_params.cu_seqlens_q[-1])
        if end >= s:
            return None
        pad = (torch.arange(s, device=position_ids.device) >= end).expand(b, s)
    else:
        return None
    pad = split_for_cp(pad, 1, cp_size, cp_rank)
    if cfg.sequence_parallel:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        n = pad.shape[1] // tp
        r = parallel_state.get_tensor_model_parallel_rank()
        pad = pad[:, r * n:(r + 1) * n]
    return pad.contiguous()


@dataclass
class ModelBundle:
    """What a caller needs alongside the module list: the family, architecture and configs."""

    family: FamilySpec
    hf_config: PretrainedConfig
    arch: TextArch
    config: TransformerConfig
    backend: str
    vocab_padded: int
    models: list[VLMModel]


def build_model(hf_config: PretrainedConfig, layout: ParallelLayout, *, dtype: torch.dtype,
                device: str, backend: str = "local", sequence_parallel: bool = False,
                recompute_granularity: str | None = None, perform_initialization: bool = True,
                vocab_padded: int | None = None, dropout: float = 0.0,
                recompute: RecomputeConfig | None = None, attn_impl: str = "auto",
                vit_parallel: bool = True) -> ModelBundle:
    """Build this rank's model chunks (one, or VPP of them) for an HF config. ``recompute`` and
    ``attn_impl``: see :func:`mvlm.models.gpt.transformer_config`. ``vit_parallel``: divide the
    vision tower's images over the TP x CP ranks (:mod:`mvlm.models.vision_parallel`; exact, so
    on by default); False runs every image on every rank."""
    family = get_family(hf_config.model_type)
    arch = family.text_arch(hf_config)
    config = transformer_config(arch, layout, dtype=dtype, device=device,
                                sequence_parallel=sequence_parallel,
                                recompute_granularity=recompute_granularity,
                                recompute=recompute, attn_impl=attn_impl,
                                perform_initialization=perform_initialization, dropout=dropout,
                                backend=backend)
    vpad = vocab_padded or padded_vocab_size(arch.vocab_size, layout.tp)
    if vpad % layout.tp:
        raise ValueError(f"padded vocabulary {vpad} is not divisible by TP={layout.tp}")
    chunks = layout.vpp or 1
    models = []
    for vp in range(chunks):
        vp_stage = vp if layout.vpp else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        m = VLMModel(family, hf_config, arch, config, backend, vpad, device, pre, post, vp_stage,
                     vit_parallel=vit_parallel)
        if device == "cuda":
            m.cuda(torch.cuda.current_device())
        models.append(m)
    if not perform_initialization:
        for m in models:
            mark_tp_weights(m)  # megatron-core 0.16.1 workaround, see mvlm.runtime.compat
    return ModelBundle(family, hf_config, arch, config, backend, vpad, models)
