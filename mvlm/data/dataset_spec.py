"""Dataset specs (``--dataset a.jsonl 'b.jsonl#2000' dir``) and loading them with `datasets`.

Each spec is loaded separately and kept separate (a list of :class:`RawDataset`) until encoding:
files of different formats have different column types (a parquet with binary images, a JSONL
whose ``content`` is sometimes a string and sometimes a list), which Arrow cannot concatenate
before rows are normalised; after encoding every part has the same columns and is concatenated.

JSON/JSONL rows are stored as their raw JSON text (one string column) and parsed at encode time.
That way one malformed line becomes one BadSampleError with its line number instead of making
Arrow's schema inference fail for the whole file. Every row carries ``_mvlm_row`` (its row index
in the source file) so errors can name the file and row after sampling and shuffling.

``#N`` samples N rows (seeded); if N exceeds the dataset size, the dataset is repeated and the
remainder sampled -- ms-swift's behaviour, which users rely on for up-weighting small sets.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np

ROW_COL = "_mvlm_row"
JSON_COL = "_mvlm_json"
_DATA_EXTS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow",
              ".csv": "csv"}


@dataclass
class DatasetSpec:
    path: str
    num_samples: int | None = None

    @classmethod
    def parse(cls, spec: str) -> DatasetSpec:
        m = re.fullmatch(r"(.+?)(?:#(\d+))?", spec.strip())
        if not m or not m.group(1):
            raise ValueError(f"bad --dataset entry {spec!r}; expected PATH or 'PATH#N'")
        return cls(m.group(1), int(m.group(2)) if m.group(2) else None)


@dataclass
class RawDataset:
    """One loaded spec: a `datasets` (Iterable)Dataset plus where it came from."""

    source: str
    data: Any  # datasets.Dataset | datasets.IterableDataset
    base_dir: str | None

    @property
    def streaming(self) -> bool:
        return isinstance(self.data, datasets.IterableDataset)


def _json_lines(path: str) -> Iterator[str]:
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield line
        return
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:  # a .json that is really JSON lines
        yield from (ln for ln in text.splitlines() if ln.strip())
        return
    if isinstance(rows, dict):
        rows = [rows]
    for r in rows:
        yield json.dumps(r, ensure_ascii=False)


def _json_gen(path: str) -> Iterator[dict]:
    for i, line in enumerate(_json_lines(path)):
        yield {JSON_COL: line, ROW_COL: i}


def load_one(spec: DatasetSpec | str, *, streaming: bool = False, seed: int = 42) -> RawDataset:
    """Load one spec (file or directory) without decoding rows."""
    spec = DatasetSpec.parse(spec) if isinstance(spec, str) else spec
    path = spec.path
    if not os.path.exists(path):
        raise FileNotFoundError(f"--dataset {path!r} does not exist (mvlm reads local files and "
                                "dataset directories; download hub datasets first)")
    base_dir = os.path.dirname(os.path.abspath(path)) if os.path.isfile(path) \
        else os.path.abspath(path)
    ext = os.path.splitext(path)[1].lower()
    if os.path.isfile(path) and _DATA_EXTS.get(ext) == "json":
        if streaming:
            ds = datasets.IterableDataset.from_generator(_json_gen, gen_kwargs={"path": path})
        else:
            lines = list(_json_lines(path))
            ds = datasets.Dataset.from_dict({JSON_COL: lines, ROW_COL: list(range(len(lines)))})
    elif os.path.isfile(path):
        if ext not in _DATA_EXTS:
            raise ValueError(f"unsupported dataset file {path!r}; use one of "
                             f"{sorted(_DATA_EXTS)} or a directory saved by datasets")
        ds = datasets.load_dataset(_DATA_EXTS[ext], data_files=path, split="train",
                                   streaming=streaming)
        ds = _add_row_index(ds)
    elif os.path.exists(os.path.join(path, "dataset_info.json")) or \
            os.path.exists(os.path.join(path, "state.json")):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"]
        ds = _add_row_index(ds)
        if streaming:
            ds = ds.to_iterable_dataset()
    else:
        ds = datasets.load_dataset(path, split="train", streaming=streaming)
        ds = _add_row_index(ds)
    raw = RawDataset(path, ds, base_dir)
    if spec.num_samples is not None:
        raw.data = sample_rows(raw.data, spec.num_samples, seed)
    return raw


def _add_row_index(ds: Any) -> Any:
    if ROW_COL in (ds.column_names or []):
        return ds
    if isinstance(ds, datasets.IterableDataset):
        return ds.map(lambda _, i: {ROW_COL: i}, with_indices=True)
    return ds.add_column(ROW_COL, np.arange(len(ds)))


def sample_rows(ds: Any, n: int, seed: int) -> Any:
    """``#N``: N rows, repeating whole copies when N > len (ms-swift semantics)."""
    if isinstance(ds, datasets.IterableDataset):
        return ds.take(n)
    size = len(ds)
    if size == 0:
        return ds
    rng = np.random.default_rng(seed)
    reps, rem = divmod(n, size)
    idx = np.concatenate([np.tile(np.arange(size), reps),
                          rng.permutation(size)[:rem]]).astype(np.int64)
    return ds.select(idx)


def split_train_val(raw: RawDataset, ratio: float, seed: int) -> tuple[RawDataset, RawDataset]:
    """Deterministic split of one dataset; the val part is ``ratio`` of the rows (at least 1)."""
    if raw.streaming:
        raise ValueError("--split_dataset_ratio does not work with --streaming; pass "
                         "--val_dataset instead")
    n = len(raw.data)
    n_val = max(1, round(n * ratio)) if n > 1 else 0
    perm = np.random.default_rng(seed).permutation(n)
    val = RawDataset(raw.source, raw.data.select(np.sort(perm[:n_val])), raw.base_dir)
    train = RawDataset(raw.source, raw.data.select(np.sort(perm[n_val:])), raw.base_dir)
    return train, val


def load_datasets(specs: Sequence[str], *, val_specs: Sequence[str] = (),
                  split_dataset_ratio: float = 0.0, streaming: bool = False,
                  seed: int = 42) -> tuple[list[RawDataset], list[RawDataset]]:
    """All ``--dataset`` / ``--val_dataset`` specs, with the optional val split applied."""
    if not specs:
        raise ValueError("no --dataset given")
    train = [load_one(s, streaming=streaming, seed=seed) for s in specs]
    val = [load_one(s, streaming=streaming, seed=seed) for s in val_specs]
    if split_dataset_ratio and not val_specs:
        if not 0 < split_dataset_ratio < 1:
            raise ValueError(f"--split_dataset_ratio must be in (0, 1), got {split_dataset_ratio}")
        pairs = [split_train_val(r, split_dataset_ratio, seed) for r in train]
        train, val = [p[0] for p in pairs], [p[1] for p in pairs]
    return train, val


def decode_row(example: dict) -> dict:
    """A stored row back to a dict (JSON text is parsed here; errors become BadSampleError)."""
    from mvlm.data.errors import BadSampleError

    if JSON_COL in example:
        try:
            row = json.loads(example[JSON_COL])
        except json.JSONDecodeError as e:
            raise BadSampleError("bad_json", str(e)) from e
        if not isinstance(row, dict):
            raise BadSampleError("bad_row", f"a row must be a JSON object, got "
                                 f"{type(row).__name__}")
        return row
    return {k: v for k, v in example.items() if k != ROW_COL}
