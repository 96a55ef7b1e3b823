"""Encoded datasets: eager (``datasets.map`` with ``--dataset_num_proc``), lazy and streaming.

* Eager: each raw dataset is encoded with ``Dataset.map(batched=True, num_proc=N)``; a batch of
  rows goes through ``Template.encode_batch`` (one tokenizer call, one image-processor call).
  Bad rows are kept as empty rows with an ``_mvlm_error`` reason, counted, then dropped with a
  cheap ``select``; under ``--on_bad_sample error`` the first one stops the run with its file and
  line (the first bad line of the file with ``num_proc`` 1; with more processes, the first one of
  the shard that met one first). The result is Arrow on disk: what ``mvlm encode`` saves and
  ``--cached_dataset`` reloads. Skips are counted per distinct file row, in every mode (a row
  repeated by ``path#N`` is one skipped row).
* Lazy (``--lazy_tokenize``): rows are encoded in the DataLoader workers on access; a bad row is
  replaced by the next good one (counted once per row, also when counted in a loader worker)
  so the sampler's order stays deterministic.
* Streaming (``--streaming``): an iterable over encoded samples (optionally packed on the fly).

Storage layout of an encoded row: ``input_ids``, ``labels`` (unshifted), ``length``,
``position_ids`` ([3, L], VL families only), ``pixel_values`` flattened float32 (reshaped with the
grid on load), ``image_grid_thw``, the same for videos, ``extra`` (JSON of carried columns).
"""
from __future__ import annotations

import json
import logging
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import datasets
import numpy as np
import torch
import torch.utils.data

from mvlm.data.dataset_spec import ROW_COL, RawDataset
from mvlm.data.errors import BadSampleCounter, BadSampleError
from mvlm.data.preference import encode_rows  # Template.encode_batch, or pairs (task preference)
from mvlm.data.template import SkipSample, Template
from mvlm.data.textrows import LINE_COL, decode_example, location, row_source

logger = logging.getLogger(__name__)
ERROR_COL = "_mvlm_error"  # "reason\tFILE, line N: reason: detail" of a bad row, "" if good
SRC_COL = "_mvlm_source"  # the dataset file a row came from (error messages name it)
_VISION_FLAT = ("pixel_values", "pixel_values_videos")
_VISION_GRID = ("image_grid_thw", "video_grid_thw")


def _features(template: Template) -> datasets.Features:
    f = {"input_ids": datasets.Sequence(datasets.Value("int32")),
         "labels": datasets.Sequence(datasets.Value("int32")),
         "length": datasets.Value("int32"), "extra": datasets.Value("string"),
         ERROR_COL: datasets.Value("string"), ROW_COL: datasets.Value("int64"),
         LINE_COL: datasets.Value("int64"), SRC_COL: datasets.Value("string")}
    if template.is_multimodal:
        f["position_ids"] = datasets.Sequence(datasets.Sequence(datasets.Value("int32")))
        for k in _VISION_FLAT:
            f[k] = datasets.Sequence(datasets.Value("float32"))
        for k in _VISION_GRID:
            f[k] = datasets.Sequence(datasets.Sequence(datasets.Value("int32")))
        f["second_per_grid_ts"] = datasets.Sequence(datasets.Value("float32"))
        f["image_paths"] = datasets.Sequence(datasets.Value("string"))
        f["image_bytes"] = datasets.Sequence(datasets.Value("binary"))
        # shape of pixel_values when the family has no grid to restore it (LLaVA: [n, 3, H, W])
        f["pixel_shape"] = datasets.Sequence(datasets.Value("int32"))
    if template.cfg.task == "preference":
        f["rejected_input_ids"] = datasets.Sequence(datasets.Value("int32"))
        f["rejected_labels"] = datasets.Sequence(datasets.Value("int32"))
        if template.is_multimodal:
            f["rejected_position_ids"] = datasets.Sequence(
                datasets.Sequence(datasets.Value("int32")))
    return datasets.Features(f)


def to_storage(enc: dict, template: Template) -> dict[str, Any]:
    """An encoded sample -> one Arrow row (numpy, flat pixels)."""
    row = {"input_ids": enc["input_ids"].numpy().astype(np.int32),
           "labels": enc["labels"].numpy().astype(np.int32), "length": enc["length"],
           "extra": json.dumps(enc["extra"], default=str) if enc.get("extra") else "",
           ERROR_COL: ""}
    if template.is_multimodal:
        row["position_ids"] = enc["position_ids"].numpy().astype(np.int32)
        for k in _VISION_FLAT:
            row[k] = enc[k].numpy().reshape(-1) if k in enc else np.zeros(0, np.float32)
        for k in _VISION_GRID:
            row[k] = enc[k].numpy().astype(np.int32) if k in enc else np.zeros((0, 3), np.int32)
        row["second_per_grid_ts"] = enc["second_per_grid_ts"].numpy() \
            if "second_per_grid_ts" in enc else np.zeros(0, np.float32)
        refs = enc.get("image_refs") or []
        row["image_paths"] = [r if isinstance(r, str) else "" for r in refs]
        row["image_bytes"] = [r if isinstance(r, bytes) else b"" for r in refs]
        row["pixel_shape"] = np.asarray(enc["pixel_values"].shape, np.int32) \
            if "pixel_values" in enc and "image_grid_thw" not in enc else np.zeros(0, np.int32)
    if template.cfg.task == "preference":
        row["rejected_input_ids"] = enc["rejected_input_ids"].numpy().astype(np.int32)
        row["rejected_labels"] = enc["rejected_labels"].numpy().astype(np.int32)
        if template.is_multimodal:
            row["rejected_position_ids"] = enc["rejected_position_ids"].numpy().astype(np.int32)
    return row


def _empty_row(template: Template, err: BadSampleError) -> dict[str, Any]:
    # typed empties: Arrow cannot concatenate an int32 list with an untyped (double) one
    i32, f32 = np.zeros(0, np.int32), np.zeros(0, np.float32)
    row = {"input_ids": i32, "labels": i32, "length": 0, "extra": "",
           ERROR_COL: f"{err.reason}\t{err.short()}"}
    if template.is_multimodal:
        row.update(position_ids=np.zeros((3, 0), np.int32), pixel_values=f32,
                   pixel_values_videos=f32, image_grid_thw=np.zeros((0, 3), np.int32),
                   video_grid_thw=np.zeros((0, 3), np.int32), second_per_grid_ts=f32,
                   image_paths=[], image_bytes=[], pixel_shape=i32)
    if template.cfg.task == "preference":
        row.update(rejected_input_ids=i32, rejected_labels=i32)
        if template.is_multimodal:
            row["rejected_position_ids"] = np.zeros((3, 0), np.int32)
    return row


def from_storage(row: dict) -> dict[str, Any]:
    """An Arrow row (numpy format) -> the sample dict the collator takes."""
    out = {"input_ids": torch.as_tensor(np.asarray(row["input_ids"], dtype=np.int64)),
           "labels": torch.as_tensor(np.asarray(row["labels"], dtype=np.int64)),
           "length": int(row["length"])}
    if "position_ids" in row:
        out["position_ids"] = torch.as_tensor(np.stack(list(row["position_ids"])).astype(
            np.int64)) if len(row["position_ids"]) else None
    for flat, grid in zip(_VISION_FLAT, _VISION_GRID):
        g = row.get(grid)
        if g is not None and len(g):
            g = np.stack(list(g)).astype(np.int64)
            pv = np.asarray(row[flat], dtype=np.float32)
            out[flat] = torch.from_numpy(pv.reshape(int(g.prod(-1).sum()), -1))
            out[grid] = torch.from_numpy(g)
    shape = row.get("pixel_shape")
    if shape is not None and len(shape) and "pixel_values" not in out:  # grid-less images
        out["pixel_values"] = torch.from_numpy(
            np.asarray(row["pixel_values"], dtype=np.float32).reshape(*map(int, shape)))
    if row.get("second_per_grid_ts") is not None and len(row["second_per_grid_ts"]):
        out["second_per_grid_ts"] = torch.as_tensor(np.asarray(row["second_per_grid_ts"],
                                                               dtype=np.float32))
    if "rejected_input_ids" in row:
        out["rejected_input_ids"] = torch.as_tensor(np.asarray(row["rejected_input_ids"],
                                                               dtype=np.int64))
        out["rejected_labels"] = torch.as_tensor(np.asarray(row["rejected_labels"],
                                                            dtype=np.int64))
        if row.get("rejected_position_ids") is not None and len(row["rejected_position_ids"]):
            out["rejected_position_ids"] = torch.as_tensor(
                np.stack(list(row["rejected_position_ids"])).astype(np.int64))
    paths = row.get("image_paths")
    if paths is not None and len(paths):
        out["image_refs"] = [p if p else bytes(b) for p, b in zip(paths, row["image_bytes"])]
    if row.get("extra"):
        out["extra"] = json.loads(row["extra"])
    return out


def _encode_map_fn(batch: dict, template: Template, source: str, base_dir: str | None,
                   policy: str) -> dict[str, list]:
    n = len(batch[ROW_COL])
    examples = [{k: batch[k][i] for k in batch} for i in range(n)]
    decoded: list[Any] = []
    for ex in examples:
        try:
            decoded.append(decode_example(ex))
        except BadSampleError as e:
            decoded.append(e)
    good = [i for i, r in enumerate(decoded) if not isinstance(r, BaseException)]
    results: list[Any] = list(decoded)
    encoded = encode_rows(template, [decoded[i] for i in good], base_dir, with_pixels=False)
    for i, r in zip(good, encoded):
        results[i] = r
    out: dict[str, list] = {k: [] for k in _features(template)}
    for ex, r in zip(examples, results):
        row_idx, line = location(ex)
        src = row_source(ex, source)
        if isinstance(r, BadSampleError):
            r.with_location(src, row_idx, line)
            if policy == "error" and not isinstance(r, SkipSample):
                raise r
            row = _empty_row(template, r)
        else:
            row = to_storage(r, template)
        row[ROW_COL] = row_idx
        row[LINE_COL] = line or 0
        row[SRC_COL] = src
        for k, col in out.items():
            col.append(row[k])
    return out


def encode_raw(raw: RawDataset, template: Template, counter: BadSampleCounter, *,
               num_proc: int = 1, batch_size: int = 32) -> datasets.Dataset:
    """Eagerly encode one raw dataset; bad rows are counted in ``counter`` and dropped."""
    ds = raw.data
    if raw.streaming:
        raise ValueError("eager encoding needs a map-style dataset; drop --streaming")
    num_proc = max(1, min(num_proc, len(ds) // batch_size or 1))
    enc = ds.map(_encode_map_fn, batched=True, batch_size=batch_size,
                 num_proc=num_proc if num_proc > 1 else None,
                 remove_columns=ds.column_names, features=_features(template),
                 fn_kwargs={"template": template, "source": raw.source,
                            "base_dir": raw.base_dir, "policy": counter.policy},
                 desc=f"encode {raw.source}", load_from_cache_file=False,
                 # an explicit fingerprint: hashing the template (tokenizer + processor) for
                 # datasets' cache key costs seconds and is useless with the cache off
                 new_fingerprint=uuid.uuid4().hex)
    errors = enc[ERROR_COL]
    rows = enc[ROW_COL]
    bad = Counter(reason for reason, _ in {(e.partition("\t")[0], r)
                                           for e, r in zip(errors, rows) if e})
    if bad:
        first = {}
        for e in errors:
            if e:
                first.setdefault(e.partition("\t")[0], e.partition("\t")[2])
        known = counter.counts
        for reason, cnt in bad.items():
            if reason not in known:
                logger.warning("skipping %d bad sample(s) in %s with reason %r (first: %s)",
                               cnt, raw.source, reason, first[reason])
                counter.examples.setdefault(reason, first[reason])
        counter.merge(bad)
        enc = enc.select([i for i, e in enumerate(errors) if not e])
    return enc


def encode_all(raws: list[RawDataset], template: Template, counter: BadSampleCounter, *,
               num_proc: int = 1, shuffle: bool = False, seed: int = 42) -> datasets.Dataset:
    parts = [encode_raw(r, template, counter, num_proc=num_proc) for r in raws]
    parts = [p for p in parts if len(p)]
    if not parts:
        raise ValueError("no usable samples: every row was skipped (" + counter.summary() + ")")
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if shuffle:
        ds = ds.shuffle(seed=seed).flatten_indices()
    return ds


def _counter(policy: str | BadSampleCounter) -> BadSampleCounter:
    """The dataset's counter: one passed in (shared with the trainer's report) or a new one.
    Either way it must see skips made in DataLoader workers."""
    if isinstance(policy, BadSampleCounter):
        if not policy.shares_with_workers:
            raise ValueError("a counter shared with a torch dataset needs share_with_workers=True")
        return policy
    return BadSampleCounter(policy, share_with_workers=True)


class EncodedDataset(torch.utils.data.Dataset):
    """Torch view of an encoded Arrow dataset (what training iterates).

    Images were stored as references; their pixels are produced here, i.e. in the DataLoader
    workers, by the checkpoint's image processor. An image that fails to decode now is handled
    per ``policy``: raise (with its reason), or skip to the next item (counted).
    """

    def __init__(self, data: datasets.Dataset, template: Template | None = None,
                 policy: str | BadSampleCounter = "error", max_retries: int = 100):
        self.data = data.with_format("numpy")
        self.template = template
        self.counter = _counter(policy)
        self.max_retries = max_retries

    def __len__(self) -> int:
        return len(self.data)

    def _get(self, i: int) -> dict[str, Any]:
        sample = from_storage(self.data[i])
        if "image_refs" in sample:
            if self.template is None:
                raise ValueError("this dataset stores image references; pass the template")
            try:
                sample = self.template.load_pixels(sample)
            except BadSampleError as e:
                row = self.data[i]
                raise e.with_location(str(row.get(SRC_COL, "encoded dataset")),
                                      *location(row)) from None
        return sample

    def __getitem__(self, i: int) -> dict[str, Any]:
        for attempt in range(self.max_retries):
            try:
                return self._get((int(i) + attempt) % len(self))
            except BadSampleError as e:
                self.counter.handle(e)
                last = e
        raise _too_many(self.max_retries, last)

    @property
    def lengths(self) -> list[int]:
        return self.data["length"].tolist()


class LazyDataset(torch.utils.data.Dataset):
    """Encode on access (``--lazy_tokenize``). A bad row is replaced by the next good row."""

    def __init__(self, raws: list[RawDataset], template: Template,
                 policy: str | BadSampleCounter = "error", max_retries: int = 100):
        self.raws = raws
        self.template = template
        self.counter = _counter(policy)
        self.max_retries = max_retries
        self.offsets = np.cumsum([0] + [len(r.data) for r in raws])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _encode(self, i: int) -> dict[str, Any]:
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        raw = self.raws[k]
        ex = raw.data[int(i - self.offsets[k])]
        try:
            out = encode_rows(self.template, [decode_example(ex)], raw.base_dir)[0]
            if isinstance(out, BaseException):
                raise out
            return out
        except BadSampleError as e:
            raise e.with_location(row_source(ex, raw.source), *location(ex)) from None

    def __getitem__(self, i: int) -> dict[str, Any]:
        for attempt in range(self.max_retries):
            j = (int(i) + attempt) % len(self)
            try:
                return self._encode(j)
            except SkipSample as e:  # dropped on purpose (truncation 'delete'): count only
                self.counter.count(e)
                last: BadSampleError = e
            except BadSampleError as e:
                self.counter.handle(e)  # raises under policy "error"
                last = e
        raise _too_many(self.max_retries, last)


def _too_many(n: int, last: BadSampleError) -> BadSampleError:
    return BadSampleError("too_many_bad_samples", f"{n} consecutive bad rows, the last at "
                          f"{last.where()} ({last.reason}); is the dataset mostly broken?")


def iter_encoded(raws: list[RawDataset], template: Template, counter: BadSampleCounter,
                 batch_size: int = 32) -> Iterator[dict[str, Any]]:
    """Streaming: encoded samples in dataset order (bad rows counted / raised per policy)."""
    for raw in raws:
        buf: list[dict] = []

        def flush(buf: list[dict], raw: RawDataset = raw) -> Iterator[dict[str, Any]]:
            decoded: list[Any] = []
            for ex in buf:
                try:
                    decoded.append(decode_example(ex))
                except BadSampleError as e:
                    decoded.append(e)
            good = [d for d in decoded if not isinstance(d, BaseException)]
            res = iter(encode_rows(template, good, raw.base_dir))
            for ex, d in zip(buf, decoded):
                r = d if isinstance(d, BaseException) else next(res)
                if isinstance(r, BadSampleError):
                    r.with_location(row_source(ex, raw.source), *location(ex))
                    if isinstance(r, SkipSample):
                        counter.count(r)
                        continue
                    counter.handle(r)
                    continue
                yield r

        for ex in raw.data:
            buf.append(ex)
            if len(buf) >= batch_size:
                yield from flush(buf)
                buf = []
        if buf:
            yield from flush(buf)


class StreamingDataset(torch.utils.data.IterableDataset):
    """Iterable over encoded samples (or packed rows), sharded over DP ranks round-robin.

    ``epochs`` passes over the files (None: endless, what training uses). Pass e+1 starts
    again from the files' beginning (each raw stream gets ``set_epoch(e)``, which reseeds a
    shuffled `datasets` stream with seed + e; the rows are otherwise read in file order), so a
    run whose step count assumed more samples than a pass yields (bad rows skipped,
    ``--max_steps`` past the end) goes on into the next epoch instead of stopping.

    ``num_rows`` is the files' row count (:func:`textrows.count_rows`), given only for
    ``--num_train_epochs``: ``len()`` returns it so the steps are ceil(epochs x rows / global
    batch); without it ``len()`` raises TypeError (unsized).
    """

    def __init__(self, raws: list[RawDataset], template: Template,
                 policy: str | BadSampleCounter = "error", packing_length: int | None = None,
                 dp_rank: int = 0, dp_size: int = 1, num_rows: int | None = None,
                 epochs: int | None = 1):
        self.raws, self.template = raws, template
        self.counter = _counter(policy)
        self.packing_length = packing_length
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_rows = num_rows
        self.epochs = epochs

    def __len__(self) -> int:
        if self.num_rows is None:
            raise TypeError("a streamed dataset has no length (its rows were not counted)")
        return self.num_rows

    def _epoch(self, epoch: int) -> Iterator[Any]:
        from mvlm.data.packing import pack_stream

        for raw in self.raws:
            if hasattr(raw.data, "set_epoch"):
                raw.data.set_epoch(epoch)
        # Loader workers: `datasets` hands each worker its own file shards when iterated inside
        # a worker (a single-file dataset goes to worker 0), so nothing is duplicated here.
        items: Iterator[Any] = iter_encoded(self.raws, self.template, self.counter)
        if self.packing_length:
            items = pack_stream(items, self.packing_length)
        return items

    def __iter__(self) -> Iterator[Any]:
        in_worker = torch.utils.data.get_worker_info() is not None
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            seen = mine = 0
            for k, item in enumerate(self._epoch(epoch)):
                seen = k + 1
                if k % self.dp_size == self.dp_rank:
                    mine += 1
                    yield item
            if seen == 0 and in_worker:
                return  # a loader worker without file shards: the other workers stream
            if mine == 0:  # cycling would spin forever without yielding
                raise BadSampleError(
                    "too_many_bad_samples",
                    f"one pass over the streamed dataset yielded {seen} samples, none for DP "
                    f"rank {self.dp_rank} of {self.dp_size} (every row bad, or fewer samples "
                    "than data-parallel ranks?)")
            epoch += 1
