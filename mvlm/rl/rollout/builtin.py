"""The built-in rollout engine: generation on the training model itself, with a KV cache.

Works wherever training works (CPU/gloo included) at any TP and PP (VPP too), for text and
vision-language families, because it runs the very modules the trainer updates: no second copy of
the weights, no weight sync (``load_weights`` exists for an engine built on a separate model).

How one ``generate`` call runs, and why:

* **Prefill once per prompt.** The prompts (not the ``num_generations`` copies) are left-padded
  into one batch and run through the model with Megatron-Core's ``StaticInferenceContext``, which
  allocates a K/V buffer per attention layer. A VLM prompt's ``pixel_values`` go through the
  vision tower here, once. The K/V buffers and the last-position logits are then repeated
  ``num_generations`` times along the batch: the copies share the prompt's computation exactly.
* **Decode one token per step** for all rows: only the new token's embedding enters the model;
  attention reads the cached K/V (mvlm's SDPA core attention aligns a 1-token query to the end of
  the cached keys). The position ids passed cover the whole sequence so far (Megatron-Core
  slices the new tokens' rotary embedding out of them); the local spec's attention
  (:mod:`mvlm.models.kv_cache`) caches keys with RoPE applied, so no cached key is touched again
  (Megatron-Core's own SelfAttention, used by the TE spec, re-rotates the cached prefix each
  step: same numbers, more work).
* **Left padding** with a key-padding mask: every row's newest token sits in the last column, so
  the last-position logits are every row's next-token logits. Positions are per row and ignore
  the padding (text: 0..P-1; VLM: the family's mRoPE positions of the prompt), and a generated
  token continues at ``max(prompt positions) + 1 + t``, as transformers does.
* **Pipeline parallel**: each step's hidden states go stage to stage with point-to-point
  send/recv (and through the virtual chunks in schedule order with VPP); the last stage samples.
* **Sampling** on the last stage from the TP-gathered fp32 logits, with a ``torch.Generator``
  seeded identically on every rank; the tokens are then broadcast from TP rank 0 and every TP rank
  checks that it drew the same ones (a mismatch raises), and broadcast to the other stages.
  Processors in transformers' / vLLM's order: repetition penalty (prompt and completion tokens),
  suppressed tokens, temperature, top-k, top-p. Log-probabilities: see
  :mod:`mvlm.rl.rollout.base`.
* Sequence parallelism is switched off for the duration of a call (a 1-token step cannot be split
  over TP ranks) and restored after; dropout is off (eval mode), train mode is restored after.
* **Context parallel**: completions are short next to the sequences CP is for, and a 1-token
  decode step cannot be split over CP ranks, so for the call every CP rank runs the whole
  sequence itself -- the CP group (in ``parallel_state``, and wherever a module or config holds
  it: attention, rotary embeddings, ``pg_collection.cp``, ``context_parallel_size``) is swapped
  for a one-rank group and restored afterwards (:func:`cp_switched_off`). The CP ranks of a DP
  rank hold the same weights, prompts and seeds, so they draw the same tokens; they check it
  (the tokens are broadcast from CP rank 0 and compared, as over TP).
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from mvlm.models.vlm import ModelBundle
from mvlm.rl.rollout.base import (
    Completion,
    RolloutEngine,
    RolloutGroup,
    RolloutPrompt,
    SamplingParams,
)
from mvlm.rl.rollout.sampling import sample_next

__all__ = ["BuiltinRolloutEngine", "TPSamplingMismatch", "cp_switched_off",
           "eos_token_ids_from_hf_dir",
           "media_placeholder_token_ids", "sequence_positions"]


class TPSamplingMismatch(RuntimeError):
    """Tensor-parallel ranks drew different tokens from what must be identical logits."""


def eos_token_ids_from_hf_dir(hf_dir: str | Path) -> list[int]:
    """The stop tokens transformers' ``generate`` would use for this checkpoint: the generation
    config's ``eos_token_id`` (an int or a list), else the model config's."""
    d = Path(hf_dir)
    for name in ("generation_config.json", "config.json"):
        f = d / name
        if not f.exists():
            continue
        cfg = json.loads(f.read_text())
        eos = cfg.get("eos_token_id", (cfg.get("text_config") or {}).get("eos_token_id"))
        if eos is not None:
            return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    raise ValueError(f"{d}: no eos_token_id in generation_config.json or config.json; pass "
                     "eos_token_ids to the rollout engine")


def sequence_positions(hf_config, input_ids: Sequence[int] | torch.Tensor,
                       media: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """[3, L] position ids of one unpadded sequence (the family's mRoPE rule for VLMs, equal rows
    for text): what the engine uses for a prompt, and what a full-sequence forward of prompt +
    completion must use to see the same positions."""
    from mvlm.models.positions import batch_position_ids

    ids = torch.as_tensor(list(input_ids), dtype=torch.long)[None]
    media = {k: v for k, v in (media or {}).items() if v is not None}
    return batch_position_ids(hf_config, ids, media)[:, 0]


def media_placeholder_token_ids(bundle: ModelBundle) -> list[int]:
    """A VLM's image/video placeholder tokens (empty for a text model): pass them as
    ``SamplingParams.suppress_token_ids`` so that no completion contains one (a placeholder
    without pixels would break the next forward of that sequence)."""
    return sorted(set(bundle.family.token_ids(bundle.hf_config).values()))


class _DictReader:
    """The ``TensorReader`` protocol of :mod:`mvlm.convert.mapping` over in-memory HF tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> list[int]:
        return list(self.tensors[name].shape)

    def read(self, name: str, dim: int | None = None, start: int | None = None,
             stop: int | None = None) -> torch.Tensor:
        t = self.tensors[name]
        return t if dim is None else t.narrow(dim, start, stop - start)


_SINGLETONS: dict[int, object] = {}
_REAL_CP: dict[str, object] = {}  # while a call runs with CP switched off: the real CP group


def _singleton_group() -> object:
    """A process group of this rank alone (created once, collectively: every rank creates
    every rank's, as ``new_group`` requires)."""
    if not _SINGLETONS:
        for r in range(dist.get_world_size()):
            g = dist.new_group([r])
            if r == dist.get_rank():
                _SINGLETONS[r] = g
    return _SINGLETONS[dist.get_rank()]


@contextlib.contextmanager
def cp_switched_off(models: Sequence[torch.nn.Module], config: object) -> Iterator[None]:
    """Run ``models`` without context parallelism: the CP group is replaced by this rank's
    one-rank group in ``parallel_state`` (and the TP x CP group by the TP group), in every
    module attribute ``cp_group`` / ``pg_collection.cp``, ``cp_size`` of mvlm's attention and
    ``context_parallel_size`` of every config; all restored on exit. A no-op without CP."""
    ps = parallel_state
    if ps.get_context_parallel_world_size() <= 1:
        yield
        return
    real = ps.get_context_parallel_group()
    one = _singleton_group()
    saved: list[tuple[object, str, object]] = []

    def swap(obj: object, name: str, value: object) -> None:
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    _REAL_CP.update(group=real, rank=ps.get_context_parallel_rank(),
                    src=ps.get_context_parallel_global_ranks()[0])
    try:
        swap(ps, "_CONTEXT_PARALLEL_GROUP", one)
        swap(ps, "_CONTEXT_PARALLEL_GLOBAL_RANKS", [dist.get_rank()])
        swap(ps, "_TENSOR_AND_CONTEXT_PARALLEL_GROUP", ps.get_tensor_model_parallel_group())
        seen: set[int] = set()
        for m in models:
            for mod in m.modules():
                for obj in (mod, getattr(mod, "pg_collection", None), getattr(mod, "config", None)):
                    if obj is None or id(obj) in seen:
                        continue
                    seen.add(id(obj))
                    if getattr(obj, "cp_group", None) is real:
                        swap(obj, "cp_group", one)
                    if getattr(obj, "cp", None) is real:
                        swap(obj, "cp", one)
                    if isinstance(getattr(obj, "cp_size", None), int) and obj.cp_size > 1:
                        swap(obj, "cp_size", 1)
                    if getattr(obj, "context_parallel_size", 1) > 1:
                        swap(obj, "context_parallel_size", 1)
        if id(config) not in seen and getattr(config, "context_parallel_size", 1) > 1:
            swap(config, "context_parallel_size", 1)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
        _REAL_CP.clear()


class BuiltinRolloutEngine(RolloutEngine):
    """Sample completions on ``bundle``'s model chunks (the training model, or any built model).

    ``eos_token_ids``: tokens that end a completion (see :func:`eos_token_ids_from_hf_dir`).
    ``pad_token_id``: what fills left padding and finished rows (never attended to).
    ``max_batch_size``: at most this many sequences decode together (prompts are grouped so that
    prompts x num_generations fits; a prompt's group is never split). None: all at once.
    ``seed``: base of the per-call seeds when ``SamplingParams.seed`` is None.
    """

    def __init__(self, bundle: ModelBundle, eos_token_ids: Sequence[int],
                 pad_token_id: int | None = None, max_batch_size: int | None = None,
                 seed: int = 0) -> None:
        if not eos_token_ids:
            raise ValueError("eos_token_ids is empty: the engine needs at least one stop token")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.bundle = bundle
        self.eos_token_ids = [int(e) for e in eos_token_ids]
        self.pad_token_id = int(self.eos_token_ids[0] if pad_token_id is None else pad_token_id)
        self.max_batch_size = max_batch_size
        self.seed = int(seed)
        self._calls = 0
        if parallel_state.model_parallel_is_initialized() and \
                parallel_state.get_context_parallel_world_size() > 1:
            _singleton_group()  # collective: now, while every rank builds its engine
        self._version = 0

    # ---- interface -----------------------------------------------------------------------
    @property
    def weight_version(self) -> int:
        return self._version

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy (HF name, full tensor) pairs into this rank's shards through the family's weight
        table. Every parameter of this rank must be covered (a partial update is refused, naming
        what is missing). An engine on the training model shares its weights and needs no
        call; this is for an engine built on a separate model."""
        from mvlm.convert.bridge import param_entries, shard_ctx

        reader = _DictReader({name: t for name, t in weights})
        missing: list[str] = []
        entries = param_entries(self.bundle)
        for e in entries:
            missing += [n for n in e.mapping.hf_names(e.idx) if n not in reader]
        if missing:
            raise KeyError(f"load_weights: {len(missing)} HF tensors this rank needs are not in "
                           f"the update (e.g. {missing[:3]}); send the full state")
        for e in entries:
            t = e.mapping.load(reader, e.idx, shard_ctx(self.bundle, e.mapping))
            if tuple(t.shape) != tuple(e.param.shape):
                raise ValueError(f"load_weights: {e.global_name} gets shape {tuple(t.shape)} "
                                 f"but the shard is {tuple(e.param.shape)}")
            e.param.data.copy_(t.to(device=e.param.device, dtype=e.param.dtype))
        self._version += 1
        return self._version

    @torch.no_grad()
    def generate(self, prompts: Sequence[RolloutPrompt], params: SamplingParams
                 ) -> list[RolloutGroup]:
        prompts = list(prompts)
        if not prompts:
            return []
        if not self.bundle.family.is_vlm:
            bad = [i for i, p in enumerate(prompts) if any(v is not None for v in p.media.values())]
            if bad:
                raise ValueError(f"prompts {bad[:5]} carry media but {self.bundle.family.name} is "
                                 "a text-only model: drop the images or use a VLM checkpoint")
        seed = params.seed if params.seed is not None else self.seed * 1_000_003 + self._calls
        self._calls += 1
        device = self._device()
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed))
        n = params.num_generations
        per_chunk = len(prompts) if self.max_batch_size is None else max(
            1, self.max_batch_size // n)
        groups: list[RolloutGroup] = []
        with self._inference_mode():
            for start in range(0, len(prompts), per_chunk):
                chunk = prompts[start:start + per_chunk]
                comps = self._generate_chunk(chunk, params, gen, device)
                for j in range(len(chunk)):
                    rows = comps[j * n:(j + 1) * n]
                    for c in rows:
                        c.prompt_index = start + j
                    groups.append(RolloutGroup(start + j, rows))
        return groups

    # ---- internals -----------------------------------------------------------------------
    def _device(self) -> torch.device:
        return next(self.bundle.models[0].parameters()).device

    @contextlib.contextmanager
    def _inference_mode(self) -> Iterator[None]:
        """eval() and sequence parallelism off for the call; both restored afterwards."""
        models = self.bundle.models
        was_training = [m.training for m in models]
        # Modules keep their own switch, and some hold a copy of the config: flip them all.
        sp_modules = [mod for m in models for mod in m.modules()
                      if getattr(mod, "sequence_parallel", False) is True]
        configs = {id(c): c for c in [self.bundle.config] + [
            getattr(mod, "config", None) for m in models for mod in m.modules()]
            if getattr(c, "sequence_parallel", False) is True}
        try:
            for m in models:
                m.eval()
            for obj in sp_modules + list(configs.values()):
                obj.sequence_parallel = False
            with cp_switched_off(models, self.bundle.config):
                yield
        finally:
            for obj in sp_modules + list(configs.values()):
                obj.sequence_parallel = True
            for m, t in zip(models, was_training):
                m.train(t)
            for m in models:
                m.set_input_tensor(None)

    def _model_media_keys(self) -> set[str]:
        return set(self.bundle.family.batch_keys)

    def _positions(self, prompt: RolloutPrompt) -> torch.Tensor:
        return sequence_positions(self.bundle.hf_config, prompt.input_ids, prompt.media)

    def _generate_chunk(self, prompts: list[RolloutPrompt], params: SamplingParams,
                        gen: torch.Generator, device: torch.device) -> list[Completion]:
        n, T = params.num_generations, params.max_completion_length
        U = len(prompts)
        B = U * n
        lens = [len(p.input_ids) for p in prompts]
        P = max(lens)
        L = P + T
        max_pos = self.bundle.arch.max_position_embeddings
        # --- per-row inputs (prompt rows first; repeated after prefill) ---
        ids = torch.full((U, P), self.pad_token_id, dtype=torch.long)
        keep = torch.zeros((U, L), dtype=torch.bool)
        pos = torch.zeros((3, U, L), dtype=torch.long)
        for i, p in enumerate(prompts):
            li = lens[i]
            ids[i, P - li:] = torch.as_tensor(list(p.input_ids), dtype=torch.long)
            keep[i, P - li:] = True
            pp_ = self._positions(p)
            pos[:, i, P - li:P] = pp_
            nxt = int(pp_.max()) + 1
            pos[:, i, P:] = torch.arange(nxt, nxt + T)
            if nxt + T > max_pos:
                raise ValueError(
                    f"prompt {i}: positions up to {nxt + T - 1} exceed the model's "
                    f"max_position_embeddings {max_pos}; shorten the prompt or lower "
                    "--max_completion_length")
        keep[:, P:] = True
        media: dict[str, torch.Tensor] = {}
        # Positions read every media key (e.g. video timing); the model takes the family's
        # batch keys (pixels and grids).
        keys = sorted({k for p in prompts for k, v in p.media.items() if v is not None}
                      & self._model_media_keys())
        for k in keys:
            parts = [p.media[k] for p in prompts if p.media.get(k) is not None]
            media[k] = torch.cat(parts, dim=0).to(device)
        ids, keep, pos = ids.to(device), keep.to(device), pos.to(device)
        # repetition penalty: which tokens each row has seen (prompt + completion)
        vocab = self.bundle.arch.vocab_size
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros((U, vocab), dtype=torch.bool, device=device)
            for i, p in enumerate(prompts):
                prompt_ids = torch.as_tensor(list(p.input_ids), device=device)
                seen[i, prompt_ids.clamp(max=vocab - 1)] = True

        ctxs = [StaticInferenceContext(U, L) for _ in self.bundle.models]
        logits = self._forward(ctxs, ids, pos[:, :, :P], keep[:, :P], media)
        for c in ctxs:
            c.sequence_len_offset += P
            c.enable_decode_mode()
        # One prefill per prompt: repeat the KV cache, logits and inputs num_generations times.
        rep = torch.arange(U, device=device).repeat_interleave(n)
        if n > 1:
            for c in ctxs:
                for layer, (k_mem, v_mem) in list(c.key_value_memory_dict.items()):
                    c.key_value_memory_dict[layer] = (k_mem[:, rep].contiguous(),
                                                      v_mem[:, rep].contiguous())
                c.max_batch_size = B
            keep, pos = keep[rep], pos[:, rep]
            if seen is not None:
                seen = seen[rep]
            if logits is not None:
                logits = logits[rep]

        tokens = torch.full((B, T), self.pad_token_id, dtype=torch.long, device=device)
        lp = torch.zeros((B, T), dtype=torch.float64, device=device)
        slp = torch.zeros((B, T), dtype=torch.float64, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        length = torch.full((B,), T, dtype=torch.long, device=device)
        eos = torch.as_tensor(self.eos_token_ids, device=device)
        for t in range(T):
            tok, tlp, tslp = self._sample_and_share(logits, params, gen, seen, B, device)
            tok = torch.where(done, torch.full_like(tok, self.pad_token_id), tok)
            tokens[:, t], lp[:, t], slp[:, t] = tok, tlp, tslp
            hit = torch.isin(tok, eos) & ~done
            length[hit] = t + 1
            done |= hit
            if seen is not None:
                seen[torch.arange(B, device=device), tok.clamp(max=vocab - 1)] = True
            if bool(done.all()) or t == T - 1:
                break
            cur = P + t + 1
            logits = self._forward(ctxs, tok[:, None], pos[:, :, :cur], keep[:, :cur], {})
            for c in ctxs:
                c.sequence_len_offset += 1
        out = []
        tokens, lp, slp, length = tokens.cpu(), lp.cpu(), slp.cpu(), length.cpu()
        stopped = done.cpu()
        for r in range(B):
            k = int(length[r])
            out.append(Completion(prompt_index=r // n, token_ids=tokens[r, :k].tolist(),
                                  logprobs=lp[r, :k].tolist(),
                                  sampling_logprobs=slp[r, :k].tolist(),
                                  stop_reason="eos" if bool(stopped[r]) else "length"))
        return out

    def _forward(self, ctxs: list[StaticInferenceContext], ids: torch.Tensor, pos: torch.Tensor,
                 keep: torch.Tensor, media: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """One step through every stage (and virtual chunk) in pipeline order; the last stage
        returns fp32 next-token logits [b, vocab], the others None."""
        models = self.bundle.models
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        my = parallel_state.get_pipeline_model_parallel_rank()
        order = [(v, p) for v in range(len(models)) for p in range(pp)]
        s, b = ids.shape[1], ids.shape[0]
        cfg = self.bundle.config
        dtype = cfg.pipeline_dtype or cfg.params_dtype
        out = None
        for k, (v, p) in enumerate(order):
            if p != my:
                continue
            model = models[v]
            if k == 0:
                out = model(ids, pos, attention_mask=keep, inference_context=ctxs[v], **media)
            else:
                h = torch.empty((s, b, cfg.hidden_size), dtype=dtype, device=ids.device)
                dist.recv(h, src=parallel_state.get_pipeline_model_parallel_prev_rank())
                model.set_input_tensor(h)
                out = model(None, pos, attention_mask=keep, inference_context=ctxs[v])
            if k < len(order) - 1:
                dist.send(out.contiguous(),
                          dst=parallel_state.get_pipeline_model_parallel_next_rank())
                out = None
        return None if out is None else out[:, -1].float()

    def _sample_and_share(self, logits: torch.Tensor | None, params: SamplingParams,
                          gen: torch.Generator, seen: torch.Tensor | None, B: int,
                          device: torch.device) -> tuple[torch.Tensor, ...]:
        """Sample on the last stage, check TP agreement, hand the result to every stage."""
        packed = torch.empty((3, B), dtype=torch.float64, device=device)
        if logits is not None:
            tok, lp, slp = sample_next(logits, params, gen, seen)
            packed[0], packed[1], packed[2] = tok.double(), lp, slp
            if parallel_state.get_tensor_model_parallel_world_size() > 1:
                mine = packed.clone()
                dist.broadcast(packed, src=parallel_state.get_tensor_model_parallel_src_rank(),
                               group=parallel_state.get_tensor_model_parallel_group())
                if not torch.equal(mine[0], packed[0]):
                    bad = int((mine[0] != packed[0]).sum())
                    raise TPSamplingMismatch(
                        f"TP rank {parallel_state.get_tensor_model_parallel_rank()} drew {bad} "
                        f"of {B} tokens differently from TP rank 0 (seed {params.seed}): the "
                        "TP-gathered logits or the generator state differ between ranks")
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(packed, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        cp_group = _REAL_CP.get("group")
        if cp_group is not None:  # CP ranks generate the same sequences: check they agree
            mine = packed.clone()
            dist.broadcast(packed, src=_REAL_CP["src"], group=cp_group)
            if not torch.equal(mine[0], packed[0]):
                raise TPSamplingMismatch(
                    f"CP rank {_REAL_CP['rank']} drew {int((mine[0] != packed[0]).sum())} of {B} "
                    "tokens differently from CP rank 0: the CP ranks' weights, prompts or "
                    "generator states differ")
        return packed[0].long(), packed[1], packed[2]
