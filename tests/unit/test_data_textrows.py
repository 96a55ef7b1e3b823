"""mvlm.data.textrows: rows of JSONL / JSON / CSV files with the line editors show for them."""
import json
from types import SimpleNamespace

import pytest

from mvlm.data.errors import BadSampleError, DatasetFileError
from mvlm.data.textrows import decode_example, iter_rows, load_datasets, location

ROW = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def _rows(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return [(r.line, r.reason, json.loads(r.text) if r.text else None) for r in iter_rows(str(p))]


def test_jsonl_lines_count_blank_lines_and_skip_bom_crlf(tmp_path):
    a, b = json.dumps({"text": "a"}).encode(), json.dumps({"text": "ü"}).encode()
    rows = _rows(tmp_path, "x.jsonl", b"\xef\xbb\xbf" + a + b"\r\n\r\n   \r\n\xc3(\r\n" + b)
    assert rows == [(1, "", {"text": "a"}), (4, "bad_encoding", None), (5, "", {"text": "ü"})]


def test_json_array_elements_carry_their_start_line(tmp_path):
    data = (b'\xef\xbb\xbf[\r\n  {"text": "a"},\r\n\r\n  {"text":\r\n    "b\xff"},\r\n'
            b'  {"text": "c"}]')
    assert _rows(tmp_path, "x.json", data) == [
        (2, "", {"text": "a"}), (4, "bad_encoding", None), (6, "", {"text": "c"})]
    assert _rows(tmp_path, "one.json", b'\n\n{"text":\n "a"}\n') == [(3, "", {"text": "a"})]
    assert _rows(tmp_path, "lines.json", b'{"text": "a"}\n\n{"text": "b"}\n') == [
        (1, "", {"text": "a"}), (3, "", {"text": "b"})]
    assert _rows(tmp_path, "empty.json", b"[ ]") == []


def test_broken_json_array_is_a_file_error_naming_line_and_column(tmp_path):
    p = tmp_path / "x.json"
    p.write_bytes(b'[\n  {"text": "a"},\n  {"text" "b"}\n]\n')
    with pytest.raises(DatasetFileError, match=r"x\.json, line 3 column 11: Expecting ':'"):
        list(iter_rows(str(p)))
    p.write_bytes(b'[{"text": "a"}] trailing')
    with pytest.raises(DatasetFileError, match=r"line 1 column 17: extra data"):
        list(iter_rows(str(p)))


def test_csv_records_multiline_types_and_bad_bytes(tmp_path):
    data = (b"\xef\xbb\xbfquery,response,level\r\nq1,r1,3\r\n\"two\nlines\",r2,4\r\n"
            b"\xff,r3,5\r\nq4,r4,5,extra\r\n\r\nq5,,6\r\n")
    assert _rows(tmp_path, "x.csv", data) == [
        (2, "", {"query": "q1", "response": "r1", "level": 3}),
        (3, "", {"query": "two\nlines", "response": "r2", "level": 4}),
        (5, "bad_encoding", None), (6, "bad_csv", None),
        (8, "", {"query": "q5", "response": None, "level": 6})]


def test_load_datasets_columns_sampling_and_errors(tmp_path):
    lines = [json.dumps({"q": f"q{i}", "a": "x"}) for i in range(4)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines[:2] + ["", "{oops"] + lines[2:]) + "\n")
    opts = SimpleNamespace(seed=42, columns={"q": "query", "a": "response"})
    (train,), _ = load_datasets([str(tmp_path / "d.jsonl")], options=opts)
    got = []
    for ex in train.data:
        try:
            got.append((location(ex), decode_example(ex)))
        except BadSampleError as e:
            got.append((location(ex), e.reason))
    assert got == [((0, 1), {"query": "q0", "response": "x"}),
                   ((1, 2), {"query": "q1", "response": "x"}),
                   ((2, 4), "bad_json"),
                   ((3, 5), {"query": "q2", "response": "x"}),
                   ((4, 6), {"query": "q3", "response": "x"})]
    with pytest.raises(BadSampleError, match=r"bad_json: Expecting property name enclosed in "
                                             r"double quotes \(column 2\)"):
        decode_example(train.data[2])
    (sampled,), _ = load_datasets([str(tmp_path / "d.jsonl") + "#7"])
    assert len(sampled.data) == 7
    (streamed,), _ = load_datasets([str(tmp_path / "d.jsonl")], streaming=True)
    assert [location(ex) for ex in streamed.data] == [(i, n) for i, n in
                                                       enumerate([1, 2, 4, 5, 6])]


def test_fast_path_equals_line_by_line(tmp_path):
    """A clean UTF-8 .jsonl is read in one go; the result equals the line-by-line reader's."""
    rows = [json.dumps({"text": t}, ensure_ascii=False) for t in ("a", "ü 🙂", " b ", "\\r")]
    data = b"\xef\xbb\xbf" + b"\r\n".join(r.encode() for r in rows[:2]) + b"\r\n\r\n \t\n" + \
        b"\n".join(r.encode() for r in rows[2:])
    (tmp_path / "c.jsonl").write_bytes(data)
    (eager,), _ = load_datasets([str(tmp_path / "c.jsonl")])
    (streamed,), _ = load_datasets([str(tmp_path / "c.jsonl")], streaming=True)
    assert eager.data.to_list() == list(streamed.data)
    assert [location(ex) for ex in eager.data] == [(0, 1), (1, 2), (2, 5), (3, 6)]
    assert [decode_example(ex)["text"] for ex in eager.data] == ["a", "ü 🙂", " b ", "\\r"]


def test_error_message_says_line_or_row():
    e = BadSampleError("bad_json", "x").with_location("a.jsonl", 3, 7)
    assert "bad sample (a.jsonl, line 7): bad_json: x." in str(e)
    e = BadSampleError("bad_row", "y").with_location("b.parquet", 3)
    assert "bad sample (b.parquet, row 3 (0-based)): bad_row" in str(e)
    import pickle

    assert str(pickle.loads(pickle.dumps(BadSampleError("r", "d", "f.jsonl", 2, 9)))) == \
        str(BadSampleError("r", "d", "f.jsonl", 2, 9))
