"""Pair preference objectives on the Trainer: ``dpo`` (every TRL loss type), ``cpo`` / SimPO,
``orpo``.

Batches are packed pair rows from :func:`mvlm.data.preference.collate_pairs`: each pair is two
``cu_seqlens`` segments (prompt+chosen, prompt+rejected) of one row, so a pair costs one forward
pass, and ``chosen_index`` / ``rejected_index`` say which segment is which. Before the step (and
before the reference pass) :mod:`mvlm.train.objectives.shared_prefix` re-lays each pair out as
``[prompt][chosen][rejected]`` so the prompt and its images run once per pair; the indices then
point at the answer segments, and everything below reads them the same way. From the model's
per-token output (minus the vocab-parallel cross-entropy: the label log-probs, 0 off the answer)
each segment's summed log-prob is taken; the losses themselves are the functions of
:mod:`mvlm.train.objectives.dpo_losses`, which the unit tests hold equal to TRL's.

Reference log-probs (DPO) come before the step (:meth:`PairObjective.prepare_step`): from a
frozen copy of the starting weights on the same layout (full training;
``Trainer.build_frozen_model``), or of ``--ref_model DIR`` (any training; refused at set-up when
its architecture differs from the policy's: :func:`check_reference_arch`), or, under
LoRA/DoRA, from the policy itself with its adapters switched off (no second copy) -- all in
eval mode, without gradients. ``reference_free``, CPO, SimPO and ORPO skip the pass.

Reduction (the Trainer's per-unit contract): the unit is the pair. ``loss_sum`` is the sum of
the micro-batch's per-pair losses and ``count`` its number of pairs; Megatron divides the
gradients by the pairs of the global batch. The NLL term (DPO's ``rpo_alpha`` / ``sft``, CPO's
``cpo_alpha``, ORPO's) is a token mean over the global batch's chosen answers (TRL's
cross-entropy): ``prepare_step`` counts the global chosen tokens and pairs once per step, and
each micro-batch adds its NLL sum scaled by pairs / tokens, so that after Megatron's division it
is exactly that mean.

Context parallelism: each CP rank holds a chunk of every sequence, so it sums its chunk per
segment and the segment sums are all-reduced over the CP group -- with autograd, because the
loss is not linear in them. Every CP rank then computes the same loss and reports the same
pair count; the all-reduce's backward sums the CP copies' gradients (CP x the true one) and
Megatron's division by the count summed over DP x CP (CP x the pairs) cancels that factor.
"""
from __future__ import annotations

import contextlib
from abc import abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from mvlm.train.objectives import dpo_losses as dl
from mvlm.train.objectives.base import LossOutput, Objective, segment_sums, token_logps
from mvlm.train.objectives.pair_media import pair_forward
from mvlm.train.objectives.shared_prefix import PrefixSharer
from mvlm.train.steps import model_forward, unwrap

if TYPE_CHECKING:
    from mvlm.train.trainer import Trainer

PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")


def segment_ids(cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Segment index of every position of a packed row (-1 on the pad tail)."""
    cu = cu_seqlens.to(torch.long)
    seg = torch.full((seq_len,), -1, dtype=torch.long, device=cu.device)
    lens = cu[1:] - cu[:-1]
    seg[:int(cu[-1])] = torch.repeat_interleave(torch.arange(len(lens), device=cu.device), lens)
    return seg


def sequence_logps(batch: dict, output: torch.Tensor) -> torch.Tensor:
    """Summed label log-prob of every segment of the packed row, complete on every CP rank
    (differentiable; see the module docstring for CP)."""
    lp = token_logps(output).float().reshape(-1)
    cu = batch["cu_seqlens"].to(lp.device)
    return segment_sums(lp, segment_ids(cu, batch["input_ids"].shape[-1]), len(cu) - 1)


def sequence_tokens(batch: dict) -> torch.Tensor:
    """Label tokens of every segment, from the full-row labels every CP rank holds."""
    labels = batch["labels"].reshape(-1)
    seg = segment_ids(batch["cu_seqlens"].to(labels.device), labels.numel())
    keep = (seg >= 0) & (labels >= 0)
    n = len(batch["cu_seqlens"]) - 1
    return torch.zeros(n, dtype=torch.float32, device=labels.device).index_add(
        0, seg[keep], torch.ones(int(keep.sum()), device=labels.device))


@contextlib.contextmanager
def adapters_off(bundle: Any):
    """The policy without its LoRA/DoRA adapters (the base model: LoRA's reference)."""
    from mvlm.tuners.model import adapters

    ads = adapters(bundle)
    if any(a._merged_backup is not None for a in ads):
        raise RuntimeError("adapters are merged into the base weights: unmerge them before "
                           "using the adapter-free policy as the reference")
    saved = [a.enabled for a in ads]
    try:
        for a in ads:
            a.enabled = False
        yield
    finally:
        for a, s in zip(ads, saved):
            a.enabled = s


@contextlib.contextmanager
def eval_mode(models: list[Any]):
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, t in zip(models, modes):
            m.train(t)


def check_reference_arch(policy: Any, ref_dir: str) -> None:
    """``--ref_model``'s HF directory must hold the policy's architecture (family, the language
    model's :class:`~mvlm.models.gpt.TextArch` -- vocab included -- and the vision config): the
    reference's log-probs are compared token by token with the policy's, on the same layout.
    ``policy``: the run's :class:`~mvlm.models.vlm.ModelBundle`."""
    import dataclasses

    from transformers import AutoConfig

    from mvlm.models.registry import get_family

    try:
        cfg = AutoConfig.from_pretrained(ref_dir)
    except (OSError, ValueError) as e:
        raise ValueError(f"--ref_model {ref_dir}: not an HF model directory ({e})") from e
    what = f"--ref_model {ref_dir}"
    src = getattr(policy.hf_config, "_name_or_path", "") or "the run's model"
    pol = f"the policy ({policy.hf_config.model_type}, {src})"
    if cfg.model_type != policy.hf_config.model_type:
        raise ValueError(f"{what} is a {cfg.model_type} model but {pol} is not: the DPO "
                         "reference must have the policy's architecture (pass a checkpoint of "
                         "the same model, e.g. the SFT model the policy starts from)")
    family = get_family(cfg.model_type)
    arch = family.text_arch(cfg)
    if arch != policy.arch:
        diff = [f"{f.name} {getattr(arch, f.name)} vs {getattr(policy.arch, f.name)}"
                for f in dataclasses.fields(arch)
                if getattr(arch, f.name) != getattr(policy.arch, f.name)]
        raise ValueError(f"{what}: its language model differs from {pol}: "
                         f"{'; '.join(diff)} (reference vs policy); the DPO reference must "
                         "have the policy's architecture")
    rv, pv = getattr(cfg, "vision_config", None), getattr(policy.hf_config, "vision_config", None)
    if (rv is None) != (pv is None) or (rv is not None and _vision_arch(rv) != _vision_arch(pv)):
        raise ValueError(f"{what}: its vision tower differs from {pol}'s; the DPO reference "
                         "must have the policy's architecture")


def _vision_arch(vc: Any) -> dict:
    """A vision config's shape fields (names and dtypes of a saved config are not shape)."""
    d = vc.to_dict()
    for k in ("torch_dtype", "dtype", "_name_or_path", "transformers_version", "architectures",
              "_attn_implementation_autoset"):
        d.pop(k, None)
    return d


class PairObjective(Objective):
    """What every pair method shares: packed pair rows, per-segment answer log-probs, the
    optional reference pass, the NLL term's global token mean, the per-pair reduction. A method
    says whether it has a reference (``uses_reference``) or an NLL term (``uses_nll``) and
    implements :meth:`pair_loss`."""

    batch_keys: ClassVar[tuple[str, ...]] = ("input_ids", "position_ids", "labels", "cu_seqlens",
                                             "chosen_index", "rejected_index")
    metrics: tuple[str, ...] = ("loss",) + PAIR_METRICS

    def __init__(self, reference: str = "auto", uses_reference: bool = True,
                 uses_nll: bool = False, ref_model: str | None = None,
                 precompute_ref_log_probs: bool = False):
        if precompute_ref_log_probs and not uses_reference:
            raise ValueError("--precompute_ref_log_probs: this run has no reference model "
                             "(--reference_free, or a method without one): drop the flag")
        if reference not in ("auto", "copy", "adapters"):
            raise ValueError(f"reference must be auto, copy or adapters, got {reference!r}")
        if ref_model is not None and not uses_reference:
            raise ValueError(f"--ref_model {ref_model}: this run has no reference model "
                             "(--reference_free, or a method without one): drop --ref_model")
        self.reference = "model" if ref_model is not None else reference
        self.ref_model = ref_model
        self.uses_reference = uses_reference
        self.uses_nll = uses_nll
        self.ref: Any = None
        self.precompute = precompute_ref_log_probs
        self.ref_cache: dict[str, tuple[float, float]] | None = None
        # each pair's prompt once: [prompt][chosen][rejected] rows (shared_prefix.py)
        self.share_prefix = PrefixSharer()

    # True: each pair's prompt and media once (shared-prefix rows, else pair_media's tower once
    # per pair); False: the two-segment rows with the tower on both copies (the tests' baseline)
    share_pair_media = True

    def forward_pair(self, model: Any, batch: dict) -> torch.Tensor:
        """One chunk on a pair micro-batch (per-token label cross-entropy on the last stage),
        the vision tower run once per pair (:mod:`mvlm.train.objectives.pair_media`)."""
        if not self.share_pair_media:
            return model_forward(model, batch)
        return pair_forward(model, batch)

    def model_output(self, model: Any, batch: dict) -> torch.Tensor:
        return self.forward_pair(model, batch)

    def check_batch(self, batch: dict) -> None:
        if batch.get("kto_label") is not None:
            raise ValueError(f"--rlhf_type {self.name} reads chosen/rejected pairs, but the data "
                             "holds KTO rows (one answer with 'label' per row): use --rlhf_type "
                             "kto, or give each row 'chosen' and 'rejected'")
        super().check_batch(batch)

    # ---- set-up --------------------------------------------------------------------------------
    def setup(self, trainer: Trainer) -> None:
        from mvlm.tuners.model import adapters

        if not self.uses_reference:
            return
        if self.ref_model is not None:
            # refused before any weight is read, let alone a step taken
            check_reference_arch(trainer.bundle, self.ref_model)
            self.ref = trainer.build_frozen_model(self.ref_model)
            return
        has_adapters = bool(adapters(trainer.bundle))
        mode = self.reference
        if mode == "auto":
            mode = "adapters" if has_adapters else "copy"
        if mode == "adapters" and not has_adapters:
            raise ValueError("the reference is the adapter-free policy, but the model has no "
                             "adapters: train with --train_type lora, or use a frozen copy")
        self.reference = mode
        if mode == "copy":
            self.ref = trainer.build_frozen_model()

    # ---- before each step ------------------------------------------------------------------------
    def _ref_step(self, store: list):
        def step(data_iterator, model):
            batch = next(data_iterator)
            out = self.forward_pair(model, batch)
            if not unwrap(model).post_process:
                return out, None
            store.append(sequence_logps(batch, out).detach())

            def no_loss(o):
                return o.sum() * 0, torch.tensor(1, dtype=torch.int), {}

            return out, no_loss

        return step

    def reference_logps(self, trainer: Trainer, batches: list[dict]) -> list[torch.Tensor]:
        """Per-segment reference log-probs of each micro-batch (last PP stage; [] elsewhere)."""
        store: list = []
        if self.reference == "adapters":
            models = trainer.ddp_models
            with adapters_off(trainer.bundle), eval_mode(models):
                trainer.forward_only(models, batches, self._ref_step(store))
        else:
            trainer.forward_only(self.ref.models, batches, self._ref_step(store))
        return store

    def precompute_reference(self, trainer: Trainer) -> None:
        """``--precompute_ref_log_probs``: one pass of the reference over the train (and val)
        pairs, before the first step; each pair's two reference log-probs are kept by
        :func:`~mvlm.data.preference.pair_key` (gathered over DP, so a pair is found on
        whichever rank a later epoch sends it) and the frozen reference copy is dropped."""
        import torch.distributed as dist
        from megatron.core import parallel_state

        from mvlm.train.batches import same_length
        from mvlm.train.steps import to_device

        cache: dict[str, tuple[float, float]] = {}
        splits = ["train"] + (["val"] if getattr(trainer.data, "val", None) is not None else [])
        k = max(1, trainer.num_microbatches)
        for split in splits:
            it = iter(trainer._loader(split, shuffle=False, num_epochs=1))
            while True:
                chunk = [b for _, b in zip(range(k), it)]
                if not chunk:
                    break
                chunk = same_length([to_device(b, trainer.device) for b in chunk],
                                    trainer.layout.pp, trainer.layout.ep, trainer.pad_id)
                if self.share_pair_media:
                    chunk = self.share_prefix(trainer, chunk)
                for b, r in zip(chunk, self.reference_logps(trainer, chunk)):
                    r = r.float().cpu().tolist()
                    for key, c, j in zip(b["pair_keys"], b["chosen_index"].tolist(),
                                         b["rejected_index"].tolist()):
                        cache[key] = (r[c], r[j])
        every: list = [None] * parallel_state.get_data_parallel_world_size()
        dist.all_gather_object(every, cache, group=parallel_state.get_data_parallel_group())
        for c in every:
            cache.update(c)
        self.ref_cache = cache
        self.ref = None  # the frozen copy (if any) is no longer read

    def cached_reference(self, batch: dict) -> torch.Tensor | None:
        """The stored reference log-probs of a micro-batch's segments (None off the last PP
        stage, which holds none)."""
        if not self.ref_cache:
            return None
        n = len(batch["cu_seqlens"]) - 1
        ref = torch.zeros(n, dtype=torch.float32, device=batch["input_ids"].device)
        for key, c, j in zip(batch["pair_keys"], batch["chosen_index"].tolist(),
                             batch["rejected_index"].tolist()):
            if key not in self.ref_cache:
                raise RuntimeError("--precompute_ref_log_probs: a pair without stored reference "
                                   "log-probs (the data changed after the first pass?)")
            ref[c], ref[j] = self.ref_cache[key]
        return ref

    def prepare_step(self, trainer: Trainer, batches: list[dict]) -> list[dict]:
        import torch.distributed as dist
        from megatron.core import parallel_state

        if self.share_pair_media:
            batches = self.share_prefix(trainer, batches)
        out = [dict(b) for b in batches]
        if self.uses_reference and self.precompute:
            if self.ref_cache is None:
                self.precompute_reference(trainer)
            for b in out:
                r = self.cached_reference(b)
                if r is not None:
                    b["ref_logps"] = r
        elif self.uses_reference:
            refs = self.reference_logps(trainer, batches)
            if refs:
                for b, r in zip(out, refs, strict=True):
                    b["ref_logps"] = r
        tokens = [sequence_tokens(b) for b in out]
        for b, n in zip(out, tokens):
            b["seq_tokens"] = n
        if self.uses_nll:
            # global chosen tokens and pairs of the step: the NLL term's token mean
            t = torch.zeros(2, dtype=torch.float64, device=tokens[0].device)
            for b, n in zip(out, tokens):
                t[0] += n[b["chosen_index"]].sum().double()
                t[1] += len(b["chosen_index"])
            dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
            for b in out:
                b["nll_scale"] = float(t[1] / t[0].clamp(min=1))
        return out

    # ---- the loss ------------------------------------------------------------------------------
    @abstractmethod
    def pair_loss(self, batch: dict, output: torch.Tensor) -> dl.PreferenceLoss:
        """The method's loss on this micro-batch's pairs (dpo_losses), from the model output."""

    def loss(self, batch: dict, output: torch.Tensor) -> LossOutput:
        res = self.pair_loss(batch, output)
        pairs = res.pair_losses.numel()
        loss_sum = res.pair_losses.sum()
        # the logged loss is summed in fp64: k pairs of loss ln 2 (step 0) give k ln 2 exactly,
        # whereas an fp32 sum of k equal values can round (k = 3)
        logged = res.pair_losses.detach().double().sum()
        if res.nll_weight:
            nll = res.nll_weight * res.nll_sum * batch["nll_scale"]
            loss_sum = loss_sum + nll
            logged = logged + nll.detach().double()
        count = torch.tensor(pairs, dtype=torch.int, device=loss_sum.device)
        reports = {"loss": torch.stack([logged, count.double()])}
        m = res.metrics
        for k in self.metrics[1:]:
            if k == "rewards/margins":
                s, cnt = m["rewards/chosen"][0] - m["rewards/rejected"][0], m["rewards/chosen"][1]
            else:
                s, cnt = m[k]
            reports[k] = torch.stack([s.double(), cnt.double()])
        return loss_sum, count, reports

    def _logps(self, batch: dict, output: torch.Tensor):
        lp = sequence_logps(batch, output)
        n = batch["seq_tokens"]
        c, r = batch["chosen_index"], batch["rejected_index"]
        return lp, n, c, r


class DPOObjective(PairObjective):
    """DPO with every TRL loss type (:func:`~mvlm.train.objectives.dpo_losses.dpo_loss`)."""

    name = "dpo"

    def __init__(self, loss_cfg: dl.DPOLossConfig, reference: str = "auto",
                 ref_model: str | None = None, precompute_ref_log_probs: bool = False):
        super().__init__(reference, uses_reference=not loss_cfg.reference_free,
                         uses_nll=bool(loss_cfg.rpo_alpha) or "sft" in loss_cfg.loss_type,
                         ref_model=ref_model, precompute_ref_log_probs=precompute_ref_log_probs)
        self.loss_cfg = loss_cfg

    def pair_loss(self, batch: dict, output: torch.Tensor) -> dl.PreferenceLoss:
        lp, n, c, r = self._logps(batch, output)
        ref = batch.get("ref_logps")
        return dl.dpo_loss(lp[c], lp[r], None if ref is None else ref[c],
                           None if ref is None else ref[r], self.loss_cfg,
                           chosen_tokens=n[c], rejected_tokens=n[r])


class CPOObjective(PairObjective):
    """CPO and SimPO (``loss_type simpo``): no reference; ``cpo_alpha`` x chosen NLL."""

    name = "cpo"

    def __init__(self, loss_cfg: dl.CPOLossConfig):
        super().__init__(uses_reference=False, uses_nll=bool(loss_cfg.cpo_alpha))
        self.loss_cfg = loss_cfg
        if loss_cfg.cpo_alpha:
            self.metrics = self.metrics + ("nll_loss",)

    def pair_loss(self, batch: dict, output: torch.Tensor) -> dl.PreferenceLoss:
        lp, n, c, r = self._logps(batch, output)
        return dl.cpo_loss(lp[c], lp[r], self.loss_cfg, chosen_tokens=n[c],
                           rejected_tokens=n[r])


class ORPOObjective(PairObjective):
    """ORPO: chosen NLL + lambda (``--beta``) x odds-ratio loss; no reference."""

    name = "orpo"
    metrics = PairObjective.metrics + ("nll_loss", "log_odds_ratio", "log_odds_chosen")

    def __init__(self, beta: float):
        super().__init__(uses_reference=False, uses_nll=True)
        self.beta = beta

    def pair_loss(self, batch: dict, output: torch.Tensor) -> dl.PreferenceLoss:
        lp, n, c, r = self._logps(batch, output)
        return dl.orpo_loss(lp[c], lp[r], self.beta, chosen_tokens=n[c], rejected_tokens=n[r])
