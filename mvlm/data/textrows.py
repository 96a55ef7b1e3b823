"""Text dataset files (JSON Lines, JSON, CSV) read byte by byte, one row per line, lines numbered.

Why not ``open(path, encoding="utf-8")``: one line of invalid UTF-8 anywhere in a file makes the
codec raise for the whole file, with a byte offset and no file name, so ``--on_bad_sample skip``
never gets the chance to skip it. Here each line (each CSV record, each element of a JSON array)
is decoded on its own, and a row that is not text becomes a row marked ``bad_encoding`` that the
encoders count or report like any other bad sample.

Line numbers are 1-based and count ``\\n`` (the JSON Lines separator), as editors, ``grep -n``
and ``sed -n Np`` number lines; blank lines are not rows but still count. A UTF-8 byte order mark
at the start of the file and CRLF line endings are valid and read exactly like the clean file.

Every row is stored the way :mod:`mvlm.data.dataset_spec` stores JSON rows (``_mvlm_json``: the
row's JSON text, ``_mvlm_row``: its 0-based index among the file's rows) plus ``_mvlm_line`` (the
1-based line where it starts) and ``_mvlm_bad`` (``"reason\\tdetail"`` for an unreadable row,
else empty). CSV records are type-inferred by pandas (as the `datasets` CSV loader does) and
stored as JSON too, so one decoder serves all three formats. ``--columns`` renames are applied
to each row's keys at load time. A .json array and a CSV file are read whole (also with
``--streaming``); JSON Lines are read line by line.

Local files are loaded here (:func:`load_datasets` is ``dataset_spec.load_datasets`` with this
reader for them); hub IDs, ``:SUBSET`` specs and directories go to :mod:`mvlm.data.dataset_spec`,
which reads their text files with :func:`iter_rows` too (each row then also carries
``_mvlm_file``, its file: :func:`row_source`); columnar files are read by `datasets`.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import pyarrow as pa
from datasets.table import InMemoryTable

from mvlm.data import dataset_spec
from mvlm.data.dataset_spec import JSON_COL, ROW_COL, DatasetSpec, RawDataset
from mvlm.data.errors import BadSampleError, DatasetFileError

LINE_COL = "_mvlm_line"
BAD_COL = "_mvlm_bad"
TEXT_EXTS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv"}
_BOM = b"\xef\xbb\xbf"
_BLANK = b" \t\r\n"
_ESCAPED = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of non-UTF-8 bytes
# a JSON \u escape of a UTF-16 surrogate (cheap pre-check), and one that is not half of a pair:
# valid JSON, not text
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONE_ESCAPE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
                          r"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")


@dataclass
class TextRow:
    """One row of a text file: its JSON text, or why it has none."""

    line: int  # 1-based line where the row starts
    text: str = ""
    reason: str = ""  # "" for a readable row
    detail: str = ""


def _encoding_detail(raw: bytes, err: UnicodeDecodeError) -> str:
    bad = raw[err.start:err.end].hex(" ")
    return (f"bytes {bad} at column {err.start + 1} are not UTF-8 ({err.reason}); the line is "
            f"not text (a binary file, another encoding, or a truncated write?)")


def _escaped_detail(text: str) -> str:
    m = _ESCAPED.search(text)
    col = m.start() + 1 if m else 0
    byte = ord(m.group()) - 0xDC00 if m else 0
    return (f"byte {byte:02x} at character {col} of the row is not UTF-8; the row is not text "
            f"(another encoding, or a truncated write?)")


def _physical_lines(path: str, keep_ends: bool = False) -> Iterator[tuple[int, bytes]]:
    """(1-based number, bytes without the line ending) for every line; the BOM is dropped."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if n == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if not keep_ends:
                raw = raw[:-1] if raw.endswith(b"\n") else raw
                raw = raw[:-1] if raw.endswith(b"\r") else raw
            yield n, raw


def iter_jsonl(path: str) -> Iterator[TextRow]:
    """JSON Lines: every non-blank line is a row (parsed later, so bad JSON is a bad row)."""
    for n, raw in _physical_lines(path):
        if not raw.strip(_BLANK):
            continue
        try:
            yield TextRow(n, raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield TextRow(n, reason="bad_encoding", detail=_encoding_detail(raw, e))


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    return data.decode("utf-8", errors="surrogateescape")


def _iter_json_array(path: str, text: str, start: int) -> Iterator[TextRow]:
    """Elements of a top-level JSON array, each with the line it starts on."""
    dec = json.JSONDecoder()
    pos, line, counted = start + 1, 1, 0  # just after '['
    ws = re.compile(r"[ \t\r\n]*")

    def line_at(i: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, i)
        counted = i
        return line

    pos = ws.match(text, pos).end()
    if text.startswith("]", pos):
        return
    while True:
        try:
            _, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise _array_error(path, e) from None
        elem = text[pos:end]
        if _ESCAPED.search(elem):
            yield TextRow(line_at(pos), reason="bad_encoding", detail=_escaped_detail(elem))
        else:
            yield TextRow(line_at(pos), elem)
        pos = ws.match(text, end).end()
        if text.startswith(",", pos):
            pos = ws.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            break
        else:
            raise _array_error(path, json.JSONDecodeError("expected ',' or ']'", text, pos))
    rest = ws.match(text, pos + 1).end()
    if rest < len(text):
        raise _array_error(path, json.JSONDecodeError("extra data after the array", text, rest))


def _array_error(path: str, e: json.JSONDecodeError) -> DatasetFileError:
    return DatasetFileError(
        f"--dataset {path}, line {e.lineno} column {e.colno}: {e.msg}. A JSON array file is "
        "parsed as a whole, so a broken element cannot be skipped (--on_bad_sample skip skips "
        "rows, not files): fix the file, or write it as JSON Lines (.jsonl, one row per line), "
        "where a broken line is one bad sample")


def iter_json(path: str) -> Iterator[TextRow]:
    """A .json file: an array of rows, a single object, or (really) JSON Lines."""
    text = _read_text(path)
    start = len(text) - len(text.lstrip(" \t\r\n"))
    if text.startswith("[", start):
        yield from _iter_json_array(path, text, start)
        return
    if text.startswith("{", start):
        try:
            _, end = json.JSONDecoder().raw_decode(text, start)
        except json.JSONDecodeError:
            end = -1
        if end > 0 and not text[end:].strip(" \t\r\n"):
            elem = text[start:end]
            line = text.count("\n", 0, start) + 1
            yield TextRow(line, elem) if not _ESCAPED.search(elem) else \
                TextRow(line, reason="bad_encoding", detail=_escaped_detail(elem))
            return
    yield from iter_jsonl(path)  # a .json that holds JSON lines


def _csv_records(path: str) -> Iterator[tuple[int, list[str]]]:
    """(start line, fields) of every CSV record; non-UTF-8 bytes come back surrogate-escaped."""
    def lines() -> Iterator[str]:
        for _, raw in _physical_lines(path, keep_ends=True):  # quoted fields span lines
            yield raw.decode("utf-8", errors="surrogateescape")

    reader = csv.reader(lines())
    done = 0
    for fields in reader:
        start, done = done + 1, reader.line_num
        if fields:  # an empty line is no record (pandas skips it too)
            yield start, fields


def iter_csv(path: str) -> Iterator[TextRow]:
    """CSV with a header; each record becomes a JSON object with pandas' type inference."""
    import pandas as pd

    records = _csv_records(path)
    try:
        header_line, header = next(records)
    except StopIteration:
        return
    if any(_ESCAPED.search(h) for h in header):
        raise DatasetFileError(f"--dataset {path}, line {header_line}: the CSV header is not "
                               "UTF-8 text; re-save the file as UTF-8")
    rows: list[TextRow] = []
    good_lines: list[int] = []
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for line, fields in records:
        bad = next((f for f in fields if _ESCAPED.search(f)), None)
        if bad is not None:
            rows.append(TextRow(line, reason="bad_encoding", detail=_escaped_detail(bad)))
        elif len(fields) > len(header):
            rows.append(TextRow(line, reason="bad_csv", detail=f"{len(fields)} fields but the "
                                f"header has {len(header)}"))
        else:
            rows.append(TextRow(line))
            good_lines.append(line)
            writer.writerow(fields)
    buf.seek(0)
    df = pd.read_csv(buf, keep_default_na=True)
    if len(df) != len(good_lines):  # pragma: no cover - csv and pandas disagree on records
        raise DatasetFileError(f"--dataset {path}: pandas read {len(df)} CSV records where the "
                               f"csv module found {len(good_lines)}; check the quoting")
    df = df.astype(object).where(df.notna(), None)
    it = iter(df.to_dict("records"))
    for r in rows:
        if not r.reason:
            r.text = json.dumps(next(it), ensure_ascii=False, default=str)
        yield r


def iter_rows(path: str) -> Iterator[TextRow]:
    """Rows of a .jsonl / .json / .csv file (see the module docstring)."""
    kind = TEXT_EXTS[os.path.splitext(path)[1].lower()]
    return {"jsonl": iter_jsonl, "json": iter_json, "csv": iter_csv}[kind](path)


def count_rows(spec: DatasetSpec | str) -> int | None:
    """Rows of a local dataset spec without encoding them (``--streaming`` with epochs), or None
    when that needs more than reading the file: hub IDs, ``:SUBSET`` specs, directories and
    .arrow files. JSON Lines count non-blank lines, a .json its array elements, a CSV its
    records (csv module, no type inference), a parquet file the row count in its footer;
    ``#N`` caps the count at N (a streamed spec takes its first N rows). Unreadable rows are
    counted: they are rows, not samples."""
    spec = DatasetSpec.parse(spec) if isinstance(spec, str) else spec
    path = spec.path
    if getattr(spec, "subset", None) or not os.path.isfile(path):
        return None
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        n = sum(1 for _, raw in _physical_lines(path) if raw.strip(_BLANK))
    elif ext == ".json":
        n = sum(1 for _ in iter_json(path))
    elif ext == ".csv":
        n = max(0, sum(1 for _ in _csv_records(path)) - 1)  # the header is no row
    elif ext == ".parquet":
        import pyarrow.parquet as pq

        n = pq.ParquetFile(path).metadata.num_rows
    else:
        return None
    return n if spec.num_samples is None else min(n, spec.num_samples)


def _rename(text: str, columns: dict[str, str] | None) -> str:
    """``--columns`` renames of a row's top-level keys (rows that are no JSON object stay as
    they are: decoding reports them)."""
    if not columns:
        return text
    try:
        row = json.loads(text)
    except json.JSONDecodeError:
        return text
    if not isinstance(row, dict):
        return text
    return json.dumps({columns.get(k, k): v for k, v in row.items()}, ensure_ascii=False)


def _row_dicts(path: str, columns: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    for i, r in enumerate(iter_rows(path)):
        yield {JSON_COL: _rename(r.text, columns) if not r.reason else "", ROW_COL: i,
               LINE_COL: r.line, BAD_COL: f"{r.reason}\t{r.detail}" if r.reason else ""}


def _clean_jsonl_columns(path: str, columns: dict[str, str] | None) -> dict[str, list] | None:
    """Fast path for a .jsonl that is UTF-8 throughout (the common case): one decode, one split,
    the same rows and lines as :func:`iter_jsonl`. None when the file needs the line-by-line path.
    """
    if TEXT_EXTS[os.path.splitext(path)[1].lower()] != "jsonl":
        return None
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.removeprefix(_BOM).decode("utf-8")
    except UnicodeDecodeError:
        return None
    rows = [(n, ln[:-1] if ln.endswith("\r") else ln)
            for n, ln in enumerate(text.split("\n"), start=1) if ln.strip(" \t\r\n")]
    return {JSON_COL: [_rename(t, columns) for _, t in rows] if columns else [t for _, t in rows],
            ROW_COL: list(range(len(rows))), LINE_COL: [n for n, _ in rows],
            BAD_COL: [""] * len(rows)}


_FEATURES = datasets.Features({JSON_COL: datasets.Value("string"),
                               ROW_COL: datasets.Value("int64"),
                               LINE_COL: datasets.Value("int64"),
                               BAD_COL: datasets.Value("string")})


def is_text_file(path: str) -> bool:
    return os.path.isfile(path) and os.path.splitext(path)[1].lower() in TEXT_EXTS


def load_text_file(spec: DatasetSpec, *, streaming: bool = False, seed: int = 42,
                   columns: dict[str, str] | None = None) -> RawDataset:
    """One local .jsonl/.json/.csv spec as a (streaming) dataset of rows in the layout above."""
    path = spec.path
    kwargs = {"path": path, "columns": columns}
    if streaming:
        ds: Any = datasets.IterableDataset.from_generator(_row_dicts, gen_kwargs=kwargs,
                                                          features=_FEATURES)
    else:
        cols = _clean_jsonl_columns(path, columns)
        if cols is None:
            cols = {k: [] for k in _FEATURES}
            for row in _row_dicts(**kwargs):
                for k, v in row.items():
                    cols[k].append(v)
        # straight to Arrow: from_dict(features=...) encodes every value in Python (3x slower)
        table = pa.Table.from_pydict(cols, schema=_FEATURES.arrow_schema)
        ds = datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=_FEATURES))
    raw = RawDataset(path, ds, os.path.dirname(os.path.abspath(path)))
    if spec.num_samples is not None:
        raw.data = dataset_spec.sample_rows(raw.data, spec.num_samples, seed)
    return raw


def load_one(spec: DatasetSpec | str, *, streaming: bool = False, seed: int = 42,
             options: Any = None) -> RawDataset:
    """:func:`mvlm.data.dataset_spec.load_one`, with local text files read by :func:`iter_rows`.

    Hub IDs, subsets, directories and columnar files go to ``dataset_spec.load_one``.
    ``options`` is its ``LoadOptions`` (the data seed and ``--columns`` are used here too).
    """
    spec = DatasetSpec.parse(spec) if isinstance(spec, str) else spec
    if is_text_file(spec.path) and not getattr(spec, "subset", None):
        return load_text_file(spec, streaming=streaming,
                              seed=options.seed if options is not None else seed,
                              columns=getattr(options, "columns", None))
    if options is not None:
        return dataset_spec.load_one(spec, streaming=streaming, options=options)
    return dataset_spec.load_one(spec, streaming=streaming, seed=seed)


def load_datasets(specs: Sequence[str], *, val_specs: Sequence[str] = (),
                  split_dataset_ratio: float = 0.0, streaming: bool = False,
                  seed: int = 42, options: Any = None
                  ) -> tuple[list[RawDataset], list[RawDataset]]:
    """:func:`mvlm.data.dataset_spec.load_datasets`, with text files read by :func:`iter_rows`
    (``options``, when given, carries the data seed, which then wins over ``seed``)."""
    if not specs:
        raise ValueError("no --dataset given")
    if options is not None:
        seed = options.seed
    train = [load_one(s, streaming=streaming, seed=seed, options=options) for s in specs]
    val = [load_one(s, streaming=streaming, seed=seed, options=options) for s in val_specs]
    if split_dataset_ratio and not val_specs:
        if not 0 < split_dataset_ratio < 1:
            raise ValueError(f"--split_dataset_ratio must be in (0, 1), got {split_dataset_ratio}")
        pairs = [dataset_spec.split_train_val(r, split_dataset_ratio, seed) for r in train]
        train, val = [p[0] for p in pairs], [p[1] for p in pairs]
    return train, val


def decode_example(example: dict) -> dict:
    """A stored row -> the row dict; an unreadable row raises its BadSampleError."""
    if BAD_COL not in example:  # loaded by dataset_spec (columnar files, hub datasets)
        return dataset_spec.decode_row(example)
    if example[BAD_COL]:
        reason, _, detail = example[BAD_COL].partition("\t")
        raise BadSampleError(reason, detail)
    try:
        row = json.loads(example[JSON_COL])
    except json.JSONDecodeError as e:
        raise BadSampleError("bad_json", _json_detail(e)) from None
    if not isinstance(row, dict):
        raise BadSampleError("bad_row", f"a row must be a JSON object, got {type(row).__name__}")
    text = example[JSON_COL]
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):
        _check_text(row, text)
    return row


def _check_text(row: dict, text: str) -> None:
    """Refuse a row whose strings hold a lone surrogate (tokenizers and Arrow reject them)."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        m = _LONE_ESCAPE.search(text)
        where = f"the escape {m.group()} at column {m.start() + 1}" if m else "a \\u escape"
        raise BadSampleError("bad_encoding", f"{where} is half of a UTF-16 surrogate pair: the "
                             "string is not text") from None


def _json_detail(e: json.JSONDecodeError) -> str:
    """The parser's complaint with its column in the line (a row is one line: JSON Lines, and
    array elements / CSV records are only stored here once they parsed)."""
    return f"{e.msg.removesuffix(' at')} (column {e.colno})"  # "Invalid control character at"


def row_source(example: dict, default: str) -> str:
    """The file a stored row came from: its ``_mvlm_file`` (a spec of several files), else the
    spec's ``default``."""
    return example.get(dataset_spec.FILE_COL) or default


def location(example: dict) -> tuple[int | None, int | None]:
    """(0-based row index, 1-based line or None) of a stored row."""
    row = example.get(ROW_COL)
    line = example.get(LINE_COL)
    return (None if row is None else int(row),
            int(line) if line is not None and int(line) > 0 else None)
