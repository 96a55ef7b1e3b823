"""Dataset specs (``--dataset a.jsonl 'b.jsonl#2000' dir``) and loading them with `datasets`.

Each spec is loaded separately and kept separate (a list of :class:`RawDataset`) until encoding:
files of different formats have different column types (a parquet with binary images, a JSONL
whose ``content`` is sometimes a string and sometimes a list), which Arrow cannot concatenate
before rows are normalised; after encoding every part has the same columns and is concatenated.

JSON/JSONL/CSV rows (of local files, hub datasets, ``:SUBSET`` specs and dataset directories
alike) are read by :mod:`mvlm.data.textrows` line by line and stored as their raw JSON text (one
string column), parsed at encode time. That way one malformed line (bad JSON, or bytes that are
not UTF-8) becomes one BadSampleError naming its file and line instead of making the load fail
for the whole file. Every row carries ``_mvlm_row`` (its row index
in the source file) so errors can name the file and row after sampling and shuffling.

``#N`` samples N rows (seeded); if N exceeds the dataset size, the dataset is repeated and the
remainder sampled -- ms-swift's behaviour, which users rely on for up-weighting small sets.

A spec is ``PATH_OR_ID[:SUBSET][#N]`` (ms-swift's syntax). A path that exists is local; otherwise
``org/name`` is a hub dataset resolved by :mod:`mvlm.hub` (HF cache, then ModelScope/HF per
``--use_hf``) and SUBSET picks its files (a directory or file-name part, e.g. ``validation``).
``--columns '{"src": "dst"}'`` renames top-level columns before rows are interpreted (ms-swift's
``columns``); for JSON rows the rename is applied to each parsed line at load time.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np

from mvlm.data.flags import parse_columns  # noqa: F401 - re-exported (its home before)
from mvlm.hub import _REPO_ID

if TYPE_CHECKING:
    from mvlm.config import DataConfig

ROW_COL = "_mvlm_row"
JSON_COL = "_mvlm_json"
FILE_COL = "_mvlm_file"  # the file a row of a multi-file spec came from (errors name it)
_DATA_EXTS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow",
              ".csv": "csv"}


@dataclass
class DatasetSpec:
    path: str
    num_samples: int | None = None
    subset: str | None = None

    @classmethod
    def parse(cls, spec: str) -> DatasetSpec:
        m = re.fullmatch(r"(.+?)(?:#(\d+))?", spec.strip())
        if not m or not m.group(1):
            raise ValueError(f"bad --dataset entry {spec!r}; expected PATH, 'PATH#N' or "
                             "'ORG/NAME[:SUBSET][#N]'")
        path, subset = m.group(1), None
        if not os.path.exists(path) and ":" in path:
            base, sub = path.rsplit(":", 1)
            if sub and "/" not in sub and _REPO_ID.fullmatch(base):
                path, subset = base, sub
        return cls(path, int(m.group(2)) if m.group(2) else None, subset)


@dataclass
class LoadOptions:
    """How specs are loaded (from the data flags): the data seed (``#N`` sampling, the val
    split, the dataset shuffle), column renames, and the hub settings for IDs."""

    seed: int = 42
    columns: dict[str, str] | None = None
    use_hf: bool | None = None
    hub_token: str | None = None
    # ms-swift's --model_name / --model_author: (zh, en) replacements of {{NAME}} / {{AUTHOR}}
    # in self-cognition rows (a row's "tag" zh picks the first, anything else the last).
    name: tuple[str, ...] | None = None
    author: tuple[str, ...] | None = None

    @property
    def rewrites_rows(self) -> bool:
        return bool(self.columns or self.name or self.author)


def load_options(data: DataConfig) -> LoadOptions:
    """How the data flags load specs (the data seed is ``--data_seed``, else ``--seed``)."""
    return LoadOptions(seed=data.data_seed, columns=data.columns, use_hf=data.use_hf,
                       hub_token=data.hub_token, name=data.model_name, author=data.model_author)


def _fill_placeholders(value: Any, subs: dict[str, str]) -> Any:
    if isinstance(value, str):
        for k, v in subs.items():
            value = value.replace(k, v)
        return value
    if isinstance(value, list):
        return [_fill_placeholders(x, subs) for x in value]
    if isinstance(value, dict):
        return {k: _fill_placeholders(x, subs) for k, x in value.items()}
    return value


def transform_row(row: dict, opts: LoadOptions) -> dict:
    """--columns renames, then the self-cognition {{NAME}}/{{AUTHOR}} fill (text fields only:
    query, response, messages, system)."""
    if opts.columns:
        row = _rename_dict(row, opts.columns)
    subs = {}
    zh = row.get("tag") == "zh"
    for key, val in (("{{NAME}}", opts.name), ("{{AUTHOR}}", opts.author)):
        if val:
            subs[key] = val[0] if zh else val[-1]
    if subs:
        for k in ("query", "response", "messages", "system"):
            if k in row:
                row[k] = _fill_placeholders(row[k], subs)
    return row


def _transform_json_line(line: str, opts: LoadOptions) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return line  # left as is: encoding reports it as bad_json with its row number
    if not isinstance(row, dict):
        return line
    return json.dumps(transform_row(row, opts), ensure_ascii=False)


def _rename_dict(row: dict, columns: dict[str, str]) -> dict:
    out = {}
    for k, v in row.items():
        out[columns.get(k, k)] = v
    return out


@dataclass
class RawDataset:
    """One loaded spec: a `datasets` (Iterable)Dataset plus where it came from."""

    source: str
    data: Any  # datasets.Dataset | datasets.IterableDataset
    base_dir: str | None

    @property
    def streaming(self) -> bool:
        return isinstance(self.data, datasets.IterableDataset)


def _text_gen(paths: list[str], opts: LoadOptions | None = None) -> Iterator[dict]:
    """Rows of the text files of one spec (a hub ID's or a directory's files) in
    :mod:`mvlm.data.textrows`' layout, each with its file (``_mvlm_file``) and ``line N``.

    Read line by line like local files, so one line that is not UTF-8 or not JSON is one bad
    row (counted under --on_bad_sample skip, named by file and line otherwise) instead of an
    exception that aborts the whole load. ``_mvlm_row`` runs over all the spec's files: it
    keys the count of distinct skipped rows."""
    from mvlm.data.textrows import BAD_COL, LINE_COL, iter_rows

    i = 0
    rewrite = opts is not None and opts.rewrites_rows
    for path in paths:
        for r in iter_rows(path):
            text = r.text if not r.reason else ""
            yield {JSON_COL: _transform_json_line(text, opts) if rewrite and text else text,
                   ROW_COL: i, LINE_COL: r.line,
                   BAD_COL: f"{r.reason}\t{r.detail}" if r.reason else "", FILE_COL: path}
            i += 1


def _text_features() -> datasets.Features:
    from mvlm.data.textrows import BAD_COL, LINE_COL

    return datasets.Features({JSON_COL: datasets.Value("string"),
                              ROW_COL: datasets.Value("int64"),
                              LINE_COL: datasets.Value("int64"),
                              BAD_COL: datasets.Value("string"),
                              FILE_COL: datasets.Value("string")})


def _dir_data_files(path: str) -> list[str] | None:
    """The text data files of a local dataset directory, as `datasets` picks its train split
    (``train.jsonl`` next to ``test.jsonl`` keeps the test file out); None when the directory
    holds columnar files (parquet/arrow: read by `datasets`) or no text file."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        found = DataFilesDict.from_patterns(get_data_patterns(path), base_path=path)
    except FileNotFoundError:  # datasets' EmptyDatasetError
        return None
    files = [str(f) for f in found.get("train", [])]
    kinds = {_DATA_EXTS.get(os.path.splitext(f)[1].lower()) for f in files} - {None}
    if not kinds or not kinds <= {"json", "csv"}:
        return None
    return [f for f in files if _DATA_EXTS.get(os.path.splitext(f)[1].lower())]


def _resolve_files(spec: DatasetSpec, opts: LoadOptions) -> tuple[list[str], str]:
    """(local files, or [a directory], and the base dir for relative media paths) of one spec:
    a local path as is; a hub ID's snapshot files (its SUBSET's when one is given)."""
    path = spec.path
    if not os.path.exists(path):
        from mvlm.hub import dataset_files, is_repo_id, resolve

        if not is_repo_id(path):
            raise FileNotFoundError(
                f"--dataset {path!r} does not exist (a local file/directory, or a hub ID "
                "ORG/NAME[:SUBSET][#N])")
        root = resolve(path, repo_type="dataset", use_hf=opts.use_hf, token=opts.hub_token,
                       flag="--dataset").path
        import logging

        logging.getLogger("mvlm.data").info("--dataset %s -> %s", path, root)
        return dataset_files(root, spec.subset, label=path), root
    base_dir = os.path.dirname(os.path.abspath(path)) if os.path.isfile(path) \
        else os.path.abspath(path)
    return [path], base_dir


def load_one(spec: DatasetSpec | str, *, streaming: bool = False, seed: int = 42,
             options: LoadOptions | None = None) -> RawDataset:
    """Load one spec (file, directory or hub ID) without decoding rows."""
    spec = DatasetSpec.parse(spec) if isinstance(spec, str) else spec
    opts = options or LoadOptions(seed=seed)
    files, base_dir = _resolve_files(spec, opts)
    path = files[0]
    if len(files) == 1 and os.path.isdir(path) and not _saved_by_datasets(path):
        files = _dir_data_files(path) or files
    exts = {os.path.splitext(f)[1].lower() for f in files}
    if all(os.path.isfile(f) for f in files) and \
            {_DATA_EXTS.get(e) for e in exts} <= {"json", "csv"}:
        features = _text_features()
        if streaming:
            ds = datasets.IterableDataset.from_generator(
                _text_gen, gen_kwargs={"paths": files, "opts": opts}, features=features)
        else:
            cols: dict[str, list] = {k: [] for k in features}
            for row in _text_gen(files, opts):
                for k, v in row.items():
                    cols[k].append(v)
            ds = datasets.Dataset.from_dict(cols, features=features)
        return _finish(RawDataset(spec.path, ds, base_dir), spec, opts, rename=False)
    if all(os.path.isfile(f) for f in files):
        kinds = {_DATA_EXTS.get(e) for e in exts}
        if None in kinds or len(kinds) != 1:
            raise ValueError(f"unsupported dataset file(s) {files[:4]!r}; use one of "
                             f"{sorted(_DATA_EXTS)} (one format per spec) or a directory saved "
                             "by datasets")
        ds = datasets.load_dataset(kinds.pop(), data_files=files, split="train",
                                   streaming=streaming)
    elif _saved_by_datasets(path):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"]
        if streaming:
            ds = ds.to_iterable_dataset()
    else:
        ds = datasets.load_dataset(path, split="train", streaming=streaming)
    return _finish(RawDataset(spec.path, ds, base_dir), spec, opts, rename=True)


def _saved_by_datasets(path: str) -> bool:
    return os.path.exists(os.path.join(path, "dataset_info.json")) or \
        os.path.exists(os.path.join(path, "state.json"))


def _finish(raw: RawDataset, spec: DatasetSpec, opts: LoadOptions, rename: bool) -> RawDataset:
    if rename and opts.columns:
        have = set(raw.data.column_names or [])
        mapping = {k: v for k, v in opts.columns.items() if k in have and k != v}
        if mapping:
            raw.data = raw.data.rename_columns(mapping)
    if rename and (opts.name or opts.author):
        fill = LoadOptions(name=opts.name, author=opts.author)
        raw.data = raw.data.map(lambda r: transform_row(dict(r), fill))
    raw.data = _add_row_index(raw.data)
    if spec.num_samples is not None:
        raw.data = sample_rows(raw.data, spec.num_samples, opts.seed)
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
                  seed: int = 42, options: LoadOptions | None = None
                  ) -> tuple[list[RawDataset], list[RawDataset]]:
    """All ``--dataset`` / ``--val_dataset`` specs, with the optional val split applied.
    ``options`` (from :func:`load_options`) carries the data seed, which then wins over
    ``seed``."""
    if not specs:
        raise ValueError("no --dataset given")
    opts = options or LoadOptions(seed=seed)
    seed = opts.seed
    train = [load_one(s, streaming=streaming, options=opts) for s in specs]
    val = [load_one(s, streaming=streaming, options=opts) for s in val_specs]
    if split_dataset_ratio and not val_specs:
        if not 0 < split_dataset_ratio < 1:
            raise ValueError(f"--split_dataset_ratio must be in (0, 1), got {split_dataset_ratio}")
        pairs = [split_train_val(r, split_dataset_ratio, seed) for r in train]
        train, val = [p[0] for p in pairs], [p[1] for p in pairs]
    return train, val


def decode_row(example: dict) -> dict:
    """A stored row back to a dict (JSON text is parsed here; errors become BadSampleError)."""
    from mvlm.data.errors import BadSampleError

    bad = example.get("_mvlm_bad")  # textrows.BAD_COL: a row that is not text
    if bad:
        reason, _, detail = bad.partition("\t")
        raise BadSampleError(reason, detail)
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
