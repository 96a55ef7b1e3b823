"""``mvlm encode`` and the data entry points the trainer calls.

Public API (what ``mvlm/cli.py`` and the trainer use)::

    add_data_args(parser: argparse.ArgumentParser) -> None
        Flags shared by pt/sft/rlhf/encode (ms-swift names): --dataset --val_dataset
        --split_dataset_ratio --max_length --truncation_strategy --packing --streaming
        --lazy_tokenize --dataset_num_proc --dataset_shuffle --seed --max_pixels --min_pixels
        --image_max_token_num --video_max_pixels --video_max_token_num --fps --fps_max_frames
        --image_backend --on_bad_sample --system --template_backend --cached_dataset --task.
        Flags that the parser already has (e.g. --seed, --model from config.py) are skipped.
    add_encode_args(parser) -> None          # add_data_args + --model --output_dir --dump
    run_encode(cfg: mvlm.config.EncodeConfig) -> int

    build_train_dataset(data: mvlm.config.DataConfig, processor_dir, *, dp_rank=0, dp_size=1,
                        schedule: mvlm.config.ScheduleConfig | None = None) -> TrainData
        Loads (or reads --cached_dataset), encodes, optionally packs; ``schedule`` (a training
        run's step budget) makes a streamed dataset endless. TrainData has .train,
        .val (map-style or iterable torch datasets), .template, .bad_samples (counter),
        .pad_token_id, .packing, .stats.
    build_dataloader(data: TrainData, *, split="train", micro_batch_size=1, dp_rank=0,
                     dp_size=1, consumed_samples=0, seed=42, shuffle=True, num_workers=0,
                     pad_to_multiple_of=1, cp_size=1, num_epochs=None)
                     -> torch.utils.data.DataLoader
        Yields micro-batches in the batch contract of ``mvlm.data.collate``. With packing a
        micro-batch holds micro_batch_size packed rows, concatenated padding-free into one
        row (per-sample cu_seqlens); pass pad_to_multiple_of=2*CP*TP
        when CP/SP are on, and cp_size=CP with packing so every sample is padded to a multiple
        of 2*CP (``mvlm.runtime.cp.cp_packed_indices`` then gives each CP rank its token indices).
        ``consumed_samples`` (items, i.e. packed rows when packing) resumes
        the exact order.

Cache layout written by ``mvlm encode --output_dir D`` and read by ``--cached_dataset D``:
``D/train`` and ``D/val`` (datasets.save_to_disk), ``D/packs.json`` (packing plan, if
``--packing``), ``D/stats.json``, ``D/meta.json`` (family, max_length, template settings: a
mismatch with the training flags is reported), and ``D/dump.jsonl`` for ``--dump N``.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mvlm.data.errors import BadSampleCounter, BadSampleError, DatasetFileError

# The flag builders live in the light mvlm.data.flags and are re-exported here, where the trainer
# and the tests look for them. This module keeps torch, datasets and the pipeline modules inside
# the functions that use them: mvlm/train/args.py imports add_data_args from here while building
# the `mvlm sft --help` parser, which must not import torch (tests/unit/test_cli_help.py).
from mvlm.data.flags import (  # noqa: F401 - re-exported
    _DATA_FLAGS,
    TRUNCATION_STRATEGIES,
    add_data_args,
    add_encode_args,
    str2bool,
)

if TYPE_CHECKING:
    import datasets
    import torch.utils.data

    from mvlm.config import DataConfig, EncodeConfig, ScheduleConfig
    from mvlm.data.media import MediaConfig
    from mvlm.data.template import Template, TemplateConfig

logger = logging.getLogger(__name__)


def media_config(data: DataConfig) -> MediaConfig:
    from mvlm.data.media import MediaConfig

    return MediaConfig.from_env(
        max_pixels=data.max_pixels, min_pixels=data.min_pixels,
        image_max_token_num=data.image_max_token_num, video_max_pixels=data.video_max_pixels,
        video_max_token_num=data.video_max_token_num, fps=data.fps,
        fps_max_frames=data.fps_max_frames, image_backend=data.image_backend)


def template_config(data: DataConfig) -> TemplateConfig:
    from mvlm.data.template import TemplateConfig

    return TemplateConfig(max_length=data.max_length,
                          truncation_strategy=data.truncation_strategy,
                          task=data.task, system=data.system,
                          template_backend=data.template_backend,
                          add_non_thinking_prefix=bool(data.add_non_thinking_prefix),
                          ignore_empty_think=bool(data.ignore_empty_think))


def build_template(data: DataConfig, model_dir: str) -> Template:
    from mvlm.data.template import get_template

    return get_template(model_dir, cfg=template_config(data), media=media_config(data))


@dataclass
class TrainData:
    """What the trainer gets back from :func:`build_train_dataset`."""

    train: Any
    val: Any
    template: Template
    bad_samples: BadSampleCounter
    pad_token_id: int
    packing: bool
    stats: dict[str, Any] = field(default_factory=dict)


def _stats(ds: datasets.Dataset, max_length: int | None, packs: list | None) -> dict[str, Any]:
    from mvlm.data.packing import packing_efficiency

    lengths = ds["length"]
    out: dict[str, Any] = {"samples": len(ds), "tokens": int(sum(lengths)),
                           "max_len": int(max(lengths)) if len(lengths) else 0}
    if "image_grid_thw" in ds.column_names:
        out["images"] = int(sum(len(g) for g in ds["image_grid_thw"]))
        out["videos"] = int(sum(len(g) for g in ds["video_grid_thw"]))
    if packs is not None and max_length:
        out["packed_rows"] = len(packs)
        out["packing_efficiency"] = round(packing_efficiency(lengths, packs, max_length), 4)
    return out


def _encode_eager(data: DataConfig, template: Template, counter: BadSampleCounter):
    from mvlm.data.dataset import encode_all
    from mvlm.data.dataset_spec import load_options
    from mvlm.data.textrows import load_datasets  # text files read line by line

    opts = load_options(data)
    train_raw, val_raw = load_datasets(
        data.dataset or [], val_specs=data.val_dataset or [],
        split_dataset_ratio=data.split_dataset_ratio or 0.0, seed=opts.seed, options=opts)
    num_proc = data.dataset_num_proc or 1
    train = encode_all(train_raw, template, counter, num_proc=num_proc,
                       shuffle=data.dataset_shuffle, seed=opts.seed)
    val = encode_all(val_raw, template, counter, num_proc=num_proc) if val_raw else None
    return train, val


def _pack(data: DataConfig, ds: datasets.Dataset) -> list[list[int]]:
    from mvlm.data.packing import pack_lengths

    if not data.max_length:
        raise ValueError("--packing needs --max_length (the packed row length)")
    return pack_lengths(ds["length"], packing_length(data))


def packing_length(data: DataConfig) -> int:
    """Packed row length: --packing_length (ms-swift), else --max_length."""
    if data.row_length is None:
        raise ValueError("--packing needs --max_length (the packed row length)")
    return int(data.row_length)


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _stream_rows(data: DataConfig, schedule: ScheduleConfig | None,
                 packing: bool) -> int | None:
    """The streamed files' row count when the steps come from --num_train_epochs (None with
    --max_steps, with packing, or when a spec's rows cannot be counted cheaply)."""
    from mvlm.data.textrows import count_rows

    if schedule is None or schedule.train_iters is not None \
            or schedule.num_train_epochs is None or packing:
        return None
    counts = [count_rows(s) for s in data.dataset or []]
    return None if not counts or None in counts else sum(counts)


def build_train_dataset(data: DataConfig, processor_dir: str, *, dp_rank: int = 0,
                        dp_size: int = 1, schedule: ScheduleConfig | None = None) -> TrainData:
    """Datasets for training from the data flags (see the module docstring). ``schedule``:
    the training run's step budget (None: one pass, as ``mvlm encode`` and the tests read)."""
    import datasets

    from mvlm.data.dataset import EncodedDataset, LazyDataset, StreamingDataset
    from mvlm.data.dataset_spec import load_options
    from mvlm.data.packing import PackedDataset, pack_lengths
    from mvlm.data.textrows import load_datasets  # text files read line by line

    template = build_template(data, processor_dir)
    # one counter for encoding and the torch datasets (their loader workers' skips included):
    # TrainData.bad_samples is the whole report
    counter = BadSampleCounter(data.on_bad_sample, share_with_workers=True)
    packing = bool(data.packing)
    pad_id = template.pad_token_id
    cached = data.cached_dataset
    if cached:
        meta = _read_json(os.path.join(cached, "meta.json"))
        if meta.get("family") != template.family:
            raise ValueError(f"--cached_dataset {cached} was encoded for {meta.get('family')}, "
                             f"but the model is {template.family}; re-run mvlm encode")
        if data.max_length and meta.get("max_length") != data.max_length:
            raise ValueError(f"--cached_dataset {cached} was encoded with max_length "
                             f"{meta.get('max_length')} but --max_length is {data.max_length}")
        train = datasets.load_from_disk(os.path.join(cached, "train"))
        val_dir = os.path.join(cached, "val")
        val = datasets.load_from_disk(val_dir) if os.path.isdir(val_dir) else None
        packs_file = os.path.join(cached, "packs.json")
        packs = _read_json(packs_file) if packing and os.path.exists(packs_file) else None
        if packing and packs is None:
            packs = _pack(data, train)
        stats = _read_json(os.path.join(cached, "stats.json"))
    elif data.streaming:
        opts = load_options(data)
        train_raw, val_raw = load_datasets(data.dataset, val_specs=data.val_dataset or [],
                                           streaming=True, seed=opts.seed, options=opts)
        plen = packing_length(data) if packing else None
        # a training run (a step budget) streams endlessly: the step count decides the end
        budget = schedule is not None and (schedule.train_iters is not None
                                           or schedule.num_train_epochs is not None)
        tr = StreamingDataset(train_raw, template, counter, plen, dp_rank, dp_size,
                              num_rows=_stream_rows(data, schedule, packing),
                              epochs=None if budget else 1)
        va = StreamingDataset(val_raw, template, counter, plen) if val_raw else None
        return TrainData(tr, va, template, tr.counter, pad_id, packing)
    elif data.lazy_tokenize and not packing:
        # with --packing, lazy falls through to the eager encode below: packing needs every
        # sample's length up front (the parser says so in one info line)
        opts = load_options(data)
        train_raw, val_raw = load_datasets(
            data.dataset, val_specs=data.val_dataset or [],
            split_dataset_ratio=data.split_dataset_ratio or 0.0, seed=opts.seed, options=opts)
        tr = LazyDataset(train_raw, template, counter)
        va = LazyDataset(val_raw, template, counter) if val_raw else None
        return TrainData(tr, va, template, tr.counter, pad_id, False)
    else:
        train, val = _encode_eager(data, template, counter)
        packs = _pack(data, train) if packing else None
        plen = packing_length(data) if packs is not None else data.max_length
        stats = _stats(train, plen, packs)
    tr_ds: Any = EncodedDataset(train, template, counter)
    va_ds: Any = EncodedDataset(val, template, counter) if val is not None else None
    if packing:
        tr_ds = PackedDataset(tr_ds, packs)
        if va_ds is not None:
            va_ds = PackedDataset(va_ds, pack_lengths(val["length"], packing_length(data)))
    return TrainData(tr_ds, va_ds, template, counter, pad_id, packing, stats)


def build_dataloader(data: TrainData, *, split: str = "train", micro_batch_size: int = 1,
                     dp_rank: int = 0, dp_size: int = 1, consumed_samples: int = 0,
                     seed: int = 42, shuffle: bool = True, num_workers: int = 0,
                     pad_to_multiple_of: int = 1, cp_size: int = 1,
                     num_epochs: int | None = None) -> torch.utils.data.DataLoader:
    """Micro-batch DataLoader (see the module docstring)."""
    import torch.utils.data

    from mvlm.data.collate import Collator
    from mvlm.data.loader import build_dataloader as _build_loader

    ds = data.train if split == "train" else data.val
    if ds is None:
        raise ValueError(f"no {split} dataset (pass --val_dataset or --split_dataset_ratio)")
    collator = Collator(data.pad_token_id, packing=data.packing,
                        pad_to_multiple_of=pad_to_multiple_of, cp_size=cp_size)
    if isinstance(ds, torch.utils.data.IterableDataset):
        if num_epochs is not None and hasattr(ds, "epochs"):
            ds = copy.copy(ds)  # the caller's dataset keeps its own number of passes
            ds.epochs = num_epochs
        if consumed_samples:
            logger.warning("streaming datasets resume by skipping %d items", consumed_samples)
        return _SkipLoader(torch.utils.data.DataLoader(
            ds, batch_size=micro_batch_size, collate_fn=collator, num_workers=num_workers),
            consumed_samples // max(1, micro_batch_size * dp_size))
    return _build_loader(ds, collator, micro_batch_size=micro_batch_size, dp_rank=dp_rank,
                         dp_size=dp_size, consumed_samples=consumed_samples, shuffle=shuffle,
                         seed=seed, num_workers=num_workers, num_epochs=num_epochs)


class _SkipLoader:
    """Iterable that drops the first ``skip`` batches (resuming a streaming run)."""

    def __init__(self, loader: Any, skip: int):
        self.loader, self.skip = loader, skip

    def __iter__(self):
        it = iter(self.loader)
        for _ in range(self.skip):
            next(it)
        yield from it


# ----------------------------------------------------------------------------- mvlm encode

def _dump_row(ds: datasets.Dataset, i: int, template: Template) -> dict[str, Any]:
    r = ds[i]
    tok = template.tokenizer
    out = {"input_ids": r["input_ids"], "labels": r["labels"], "length": r["length"],
           "text": tok.decode(r["input_ids"]),
           "trained_text": tok.decode([t for t in r["labels"] if t != -100])}
    for k in ("image_grid_thw", "video_grid_thw"):
        if r.get(k):
            out[k] = r[k]
    return out


def run_encode(cfg: EncodeConfig) -> int:
    """Pre-encode (and optionally pack) datasets into ``--output_dir``; print stats."""
    t0 = time.time()
    template = build_template(cfg, cfg.model)
    counter = BadSampleCounter(cfg.on_bad_sample)
    try:
        train, val = _encode_eager(cfg, template, counter)
    except (BadSampleError, DatasetFileError) as e:  # a row, or a file unreadable as a whole
        print(f"mvlm encode: {e}", file=sys.stderr)
        return 2
    packs = _pack(cfg, train) if cfg.packing else None
    out = cfg.output_dir
    os.makedirs(out, exist_ok=True)
    train.save_to_disk(os.path.join(out, "train"))
    if val is not None:
        val.save_to_disk(os.path.join(out, "val"))
    if packs is not None:
        with open(os.path.join(out, "packs.json"), "w") as f:
            json.dump(packs, f)
    plen = packing_length(cfg) if packs is not None else cfg.max_length
    stats = _stats(train, plen, packs)
    stats["val_samples"] = len(val) if val is not None else 0
    stats["skipped"] = dict(counter.counts)
    stats["seconds"] = round(time.time() - t0, 2)
    stats["samples_per_s"] = round((stats["samples"] + counter.total) / max(stats["seconds"],
                                                                           1e-9), 1)
    meta = {"family": template.family, "max_length": cfg.max_length,
            "truncation_strategy": cfg.truncation_strategy,
            "task": cfg.task, "template_backend": template.backend,
            "packing": bool(packs is not None), "datasets": list(cfg.dataset or [])}
    with open(os.path.join(out, "stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    n_dump = min(cfg.dump or 0, len(train))
    if n_dump:
        with open(os.path.join(out, "dump.jsonl"), "w") as f:
            f.writelines(json.dumps(_dump_row(train, i, template)) + "\n" for i in range(n_dump))
    lines = [f"samples: {stats['samples']} (val {stats['val_samples']})",
             f"tokens: {stats['tokens']}"]
    if "images" in stats:
        lines.append(f"images: {stats['images']}  videos: {stats['videos']}")
    lines.append(counter.summary())
    if packs is not None:
        lines.append(f"packed rows: {stats['packed_rows']}  packing efficiency: "
                     f"{stats['packing_efficiency']:.2%}")
    lines.append(f"encode: {stats['samples_per_s']} samples/s; cache: {out}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":  # the same as `mvlm encode ...` (flags are parsed by mvlm.cli)
    from mvlm.cli import main

    sys.exit(main(["encode", *sys.argv[1:]]))
