"""`mvlm export`: a training checkpoint -> HF safetensors, or a LoRA/DoRA run -> merged HF / PEFT.

    mvlm export --model RUN_OR_CKPT --output DIR                      # full-weight checkpoint
    mvlm export --model RUN_OR_CKPT --merge_lora true --output DIR    # adapters merged into base
    mvlm export --adapters CKPT [--model BASE_HF_DIR] --merge_lora false --output DIR  # PEFT dir

``RUN_OR_CKPT`` may be a ``checkpoint-<step>`` directory, a training ``--output_dir`` (its
``latest`` is used) or any mvlm torch_dist checkpoint; ``--adapters`` is ms-swift's spelling of
the checkpoint to export (``--mcore_adapters``: Megatron-SWIFT's), and then ``--model`` names the
base model (as in ``swift export``); a PEFT adapter dir given as ``--adapters`` is merged into
its base with ``--merge_lora true``.
Under torchrun it runs on every rank at ``--tp/--pp`` (any layout, whatever the checkpoint was
written at); outputs appear atomically and an existing one is replaced only with --overwrite.

Full checkpoints go through :func:`mvlm.convert.command.run_convert`, so export and ``mvlm
convert --to hf`` are one code path. Adapter checkpoints hold adapters (+ modules_to_save and
optimizer) only: the model is rebuilt from the run's base model, which the checkpoint records
with the adapter configuration (:func:`mvlm.tuners.model.read_run_record`), the checkpoint's
adapter tensors are loaded on top, and the trainer's own writers produce the output
(:func:`mvlm.tuners.peft_io.export_merged_hf` / :func:`~mvlm.tuners.peft_io.export_peft_adapter`).

Only the standard library is imported at module level: the CLI builds this parser for
``mvlm --help``, which must not import torch or Megatron-Core.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvlm.convert.flags import ConvertConfig  # light: `mvlm export --help`

log = logging.getLogger("mvlm.train")


@dataclass(kw_only=True)
class ExportConfig(ConvertConfig):
    """`mvlm export`: the conversion flags (``model`` is the checkpoint, or with ``adapters``
    the base model) plus the adapter export's. Built by the CLI from :func:`add_export_args`."""

    adapters: str | None = None  # the LoRA/DoRA checkpoint, or a PEFT dir to merge
    merge_lora: bool | None = None  # None: not given (required for adapter checkpoints)
    to_hf: bool = True

# peft's adapter directory: what `mvlm sft --merge_lora false` (and ms-swift, peft) write
PEFT_CONFIG = "adapter_config.json"


def add_export_args(p: argparse.ArgumentParser) -> None:
    from mvlm.convert.flags import add_layout_args  # light: `mvlm export --help`
    from mvlm.data.flags import str2bool

    p.add_argument("--model", "--load", dest="model", default=None,
                   help="checkpoint-<step> dir, a training output_dir, or an mvlm mcore dir; "
                        "with --adapters: the base HF model dir (default: the run's base)")
    p.add_argument("--adapters", "--mcore_adapters", dest="adapters", default=None,
                   help="ms-swift spelling: the LoRA/DoRA checkpoint (checkpoint-<step> dir or "
                        "the run's output_dir) to export, or a PEFT adapter dir to merge")
    p.add_argument("--merge_lora", type=str2bool, default=None,
                   help="LoRA/DoRA checkpoints: true = adapters merged into full HF weights, "
                        "false = a PEFT adapter dir (peft.PeftModel.from_pretrained)")
    p.add_argument("--to", default="hf", choices=["hf"])
    p.add_argument("--to_hf", type=str2bool, default=True,
                   help="Megatron-SWIFT spelling; export always writes Hugging Face outputs")
    p.add_argument("--output", "--output_dir", "--save", dest="output", required=True)
    add_layout_args(p)
    p.add_argument("--torch_dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--verify", action="store_true")
    p.add_argument("--verify_tol", type=float, default=1e-4)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--max_shard_size", default="5GB")


def resolve_checkpoint(path: str | Path, flag: str = "--model") -> Path:
    from mvlm.convert.mcore_ckpt import is_mcore_checkpoint
    from mvlm.train.checkpoint import read_latest

    p = Path(path)
    if is_mcore_checkpoint(p):
        return p
    latest = read_latest(p)
    if latest is not None:
        return latest
    raise FileNotFoundError(f"{flag} {path}: neither an mvlm checkpoint (no mvlm_meta.json) nor a "
                            "training output_dir with a 'latest' checkpoint")


def _stored_keys(model_dir: Path) -> set[str]:
    """Keys of every tensor/object in a torch_dist directory, from its metadata only."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    return {sh.key for sh in load_sharded_metadata(str(model_dir)).values()}


def _has_adapter_tensors(ckpt: Path) -> bool:
    """Metadata-only look at the checkpoint's keys (for checkpoints without a run record)."""
    from mvlm.tuners.model import ADAPTER_ATTR

    return any(k.startswith(ADAPTER_ATTR + ".") for k in _stored_keys(ckpt / "model"))


def run_export(args: ExportConfig) -> int:
    from mvlm.tuners.model import read_run_record

    if args.adapters is None and args.model is None:
        raise ValueError("mvlm export needs the checkpoint to export: --model RUN_OR_CKPT (or, "
                         "for LoRA/DoRA runs, --adapters CKPT)")
    if not args.to_hf:
        raise ValueError("--to_hf false: mvlm export writes Hugging Face outputs only; for a "
                         "Megatron checkpoint use `mvlm convert --to mcore`")
    flag = "--adapters" if args.adapters else "--model"
    src = Path(args.adapters or args.model)
    if (src / PEFT_CONFIG).exists():
        return export_peft_dir(src, args)
    ckpt = resolve_checkpoint(src, flag)
    record = read_run_record(ckpt / "model")
    if record is None and _has_adapter_tensors(ckpt):
        raise ValueError(f"{flag} {ckpt}: an adapter checkpoint without the run record that "
                         "mvlm writes since adapter export exists (adapter config, base model); "
                         "export it from its run instead (--save_safetensors true writes the "
                         "merged model or PEFT dir at the end)")
    if record is None:
        if args.merge_lora is not None:
            raise ValueError(f"--merge_lora: {ckpt} is a full-weight checkpoint, not a LoRA/DoRA "
                             "one (it holds every weight, no adapters); export it without "
                             "--merge_lora")
        if args.adapters:
            raise ValueError(f"--adapters {ckpt}: not a LoRA/DoRA checkpoint; export a full-"
                             "weight checkpoint with --model CKPT")
        from mvlm.convert.command import run_convert

        return run_convert(dataclasses.replace(args, model=str(ckpt)))
    if args.merge_lora is None:
        raise ValueError(f"{ckpt} is a {record['train_type']} checkpoint (adapters + optimizer "
                         "only): pass --merge_lora true (merged HF weights) or --merge_lora "
                         "false (a PEFT adapter dir)")
    return export_adapter_checkpoint(ckpt, record, _base_model(ckpt, record, args), args)


def _base_model(ckpt: Path, record: dict[str, Any], args: ExportConfig) -> tuple[str, Path]:
    """("hf"|"mcore", path) of the base weights: --model with --adapters, else the run's."""
    from mvlm.convert.mcore_ckpt import is_mcore_checkpoint

    if args.adapters and args.model:
        p = Path(args.model)
        if not p.exists():
            raise FileNotFoundError(f"--model {p} (the base model for --adapters) does not exist")
        return ("mcore", p) if is_mcore_checkpoint(p) else ("hf", p)
    kind, path = (("hf", record.get("base_model")) if record.get("base_model")
                  else ("mcore", record.get("base_mcore_model")))
    if not path or not Path(path).exists():
        raise FileNotFoundError(
            f"{ckpt} holds adapters only; its run's base model {path} (recorded at training) "
            f"is not there: pass the base HF directory, as in `mvlm export --adapters {ckpt} "
            "--model BASE_HF_DIR --merge_lora true|false ...`")
    return kind, Path(path)


def _check_common(args: ExportConfig, model_type: str, base_dir: Path, base_type: str,
                  hf_config) -> Any:
    """Cheap checks before any process group: output, layout, base model type, --verify."""
    from mvlm.convert.publish import prepare_output_dir
    from mvlm.models.gpt import validate_layout
    from mvlm.models.registry import get_family
    from mvlm.runtime.parallel import ParallelLayout

    layout = ParallelLayout(tp=args.tp, pp=args.pp, cp=args.cp, ep=args.ep, etp=args.etp)
    prepare_output_dir(Path(args.output), args.overwrite)
    validate_layout(get_family(model_type).text_arch(hf_config), layout)
    if base_type != model_type:
        raise ValueError(f"--model {base_dir}: a {base_type} model, but the adapters are for a "
                         f"{model_type} model; pass the run's base model")
    if args.verify and not args.merge_lora:
        raise ValueError("--verify checks merged exports against the adapted model: use it with "
                         "--merge_lora true (a PEFT dir is checked by loading it with peft)")
    return layout


def export_adapter_checkpoint(ckpt: Path, record: dict[str, Any], base: tuple[str, Path],
                              args: ExportConfig) -> int:
    """Collective: rebuild the run's model at this layout (base weights + the checkpoint's
    adapters and trained base tensors) and write merged HF weights or a PEFT adapter dir."""
    from transformers import AutoConfig

    from mvlm.convert.mcore_ckpt import read_meta
    from mvlm.tuners.model import AdapterConfig

    meta = read_meta(ckpt)
    hf_config = AutoConfig.from_pretrained(ckpt / "hf")
    kind, base_dir = base
    base_type = (read_meta(base_dir)["model_type"] if kind == "mcore"
                 else AutoConfig.from_pretrained(base_dir).model_type)
    layout = _check_common(args, meta["model_type"], base_dir, base_type, hf_config)
    acfg = AdapterConfig(**record["adapter"])

    def prepare(bundle) -> None:
        from mvlm.tuners.model import apply_adapters

        _load_base(bundle, base)
        apply_adapters(bundle, acfg, freeze_base=True)
        _load_adapter_checkpoint(bundle, ckpt, meta)

    return _export(hf_config, layout, args, meta["vocab_padded"], meta.get("dtype"), prepare,
                   acfg, aux_dir=ckpt / "hf", peft_base=base_dir if kind == "hf" else None,
                   what=f"{ckpt} ({record['train_type']})")


def export_peft_dir(adapter_dir: Path, args: ExportConfig) -> int:
    """`--adapters PEFT_DIR --merge_lora true`: merge a peft adapter directory (mvlm's
    ``<output_dir>/adapter``) into its base model, at any layout."""
    import json

    from transformers import AutoConfig

    from mvlm.tuners.peft_io import adapter_config_from_peft

    if args.merge_lora is not True:
        raise ValueError(f"--adapters {adapter_dir} is a PEFT adapter dir already: pass "
                         "--merge_lora true to merge it into its base model")
    recorded = json.loads((adapter_dir / PEFT_CONFIG).read_text()).get("base_model_name_or_path")
    base = Path(args.model) if args.model else (Path(recorded) if recorded else None)
    if base is None or not base.is_dir():
        raise FileNotFoundError(
            f"--adapters {adapter_dir}: its base model ({base or 'not recorded'}) is not a "
            f"directory here: pass the base HF directory, as in `mvlm export --adapters "
            f"{adapter_dir} --model BASE_HF_DIR --merge_lora true ...`")
    hf_config = AutoConfig.from_pretrained(base)
    layout = _check_common(args, hf_config.model_type, base, hf_config.model_type, hf_config)
    acfg = adapter_config_from_peft(adapter_dir)

    def prepare(bundle) -> None:
        from mvlm.convert.bridge import load_hf_weights
        from mvlm.tuners.model import apply_adapters
        from mvlm.tuners.peft_io import load_peft_adapter

        load_hf_weights(bundle, base)
        apply_adapters(bundle, acfg, freeze_base=True)
        load_peft_adapter(bundle, adapter_dir)

    return _export(hf_config, layout, args, None, None, prepare, acfg, aux_dir=base,
                   peft_base=base, what=f"{adapter_dir} (PEFT)")


def _export(hf_config, layout, args: ExportConfig, vocab_padded: int | None,
            dtype_name: str | None, prepare, acfg, *, aux_dir: Path, peft_base: Path | None,
            what: str) -> int:
    """Collective: build the model at ``layout``, ``prepare`` it (base weights + adapters), then
    write merged HF weights or a PEFT adapter directory, atomically."""
    import torch
    import torch.distributed as dist

    from mvlm.convert.command import _hf_dtype, _verify, parse_size
    from mvlm.convert.mcore_ckpt import dtype_from_name
    from mvlm.models.spec import choose_backend
    from mvlm.models.vlm import build_model
    from mvlm.runtime.parallel import destroy_distributed
    from mvlm.runtime.startup import startup
    from mvlm.tuners.peft_io import export_merged_hf, export_peft_adapter

    own_pg = not dist.is_initialized()  # a caller's process group (tests, scripts) stays up
    device = startup(layout, device=args.device).device
    out = Path(args.output)
    try:
        default = (dtype_from_name(dtype_name) if dtype_name else None) or \
            _hf_dtype(hf_config) or torch.float32
        dtype = dtype_from_name(args.torch_dtype, default)
        bundle = build_model(hf_config, layout, dtype=dtype, device=device,
                             backend=choose_backend(device, args.transformer_impl),
                             perform_initialization=False, vocab_padded=vocab_padded)
        prepare(bundle)
        export_dtype = _hf_dtype(bundle.hf_config) or bundle.config.params_dtype
        if args.merge_lora:
            check = None
            if args.verify:
                def check(staged: Path) -> None:
                    _verify(bundle, staged, args.verify_tol, device)
            export_merged_hf(bundle, aux_dir, out, export_dtype, overwrite=args.overwrite,
                             max_shard_bytes=parse_size(args.max_shard_size),
                             before_publish=check)
        else:
            export_peft_adapter(bundle, acfg, out, base_model_dir=peft_base, dtype=export_dtype,
                                overwrite=args.overwrite)
        if dist.get_rank() == 0:
            kind = "merged HF model" if args.merge_lora else "PEFT adapter"
            log.info("exported %s -> %s (%s)", what, out, kind)
            print(f"mvlm export: wrote {out} ({kind}, {acfg.kind} r={acfg.rank})", flush=True)
    finally:
        if own_pg:
            destroy_distributed()
        else:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
    return 0


def _load_base(bundle, base: tuple[str, Path]) -> None:
    kind, path = base
    if kind == "hf":
        from mvlm.convert.bridge import load_hf_weights

        load_hf_weights(bundle, path)
    else:
        from mvlm.convert.mcore_ckpt import load_model_weights

        load_model_weights(bundle, path)


def _load_adapter_checkpoint(bundle, ckpt: Path, meta: dict) -> None:
    """Load every adapter, and the base tensors the checkpoint holds (modules_to_save, a vision
    tower trained in full under lora_llm), into the adapted model; those base tensors become
    the trainable ones (what the PEFT export writes as modules_to_save), the rest is frozen.
    Entries the checkpoint lacks, or holds but the model does not use, are errors naming them."""
    import torch

    from mvlm.convert.ckpt_format import adapt_model_keys, load_module_state, load_sharded
    from mvlm.convert.mcore_ckpt import model_keys, model_sharded_state_dict
    from mvlm.tuners.model import ADAPTER_ATTR

    model_dir = ckpt / "model"
    sd = model_sharded_state_dict(bundle)
    adapt_model_keys(sd, model_dir, meta)
    stored = _stored_keys(model_dir)
    params = {id(p): p for m in bundle.models for p in m.parameters()}
    request: dict = {}
    for top, chunk in sd.items():
        kept = {}
        for k, v in chunk.items():
            key = getattr(v, "key", None)
            if key is None:
                continue  # common (non-tensor) state: nothing to request
            adapter = k.split(".")[0] == ADAPTER_ATTR
            p = params.get(id(getattr(v, "data", None)))
            if not adapter and isinstance(p, torch.nn.Parameter):
                p.requires_grad_(key in stored)
            if adapter or key in stored:
                kept[k] = v
        request[top] = kept
    loaded = load_sharded(request, model_dir, with_optimizer=False)
    for k, m in zip(model_keys(bundle), bundle.models, strict=True):
        load_module_state(m, loaded[k], strict=False)
