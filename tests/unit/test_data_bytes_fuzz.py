"""Byte-level fuzz of the text dataset readers, through `mvlm encode` and the training datasets.

Rows that are not text (random bytes, a lone UTF-8 surrogate, overlong encodings, a stray
continuation byte, a JSON escape of half a surrogate pair), truncated lines and NUL bytes are
inserted as extra lines (seeded) into files that otherwise hold the same good rows as a clean
file; blank lines, a UTF-8 BOM, CRLF endings and a last line without a newline are mixed in (all
valid). What must hold:

* skip: exit 0, no traceback, skipped rows == corrupted lines (per reason: bad_encoding when
  the line is not text, else bad_json), and every file's good rows encode to exactly the
  token ids and labels of the clean file;
* error: exit 2, no traceback, the message names the file and ``line N`` of its first bad line;
* the same counts in lazy mode (loader workers), streaming mode and ``--dataset_num_proc 2``.
"""
import argparse
import json
import random
import subprocess
import sys

import datasets
import pytest

from mvlm.config import EncodeConfig, ScheduleConfig
from mvlm.data.encode import add_encode_args, build_dataloader, build_train_dataset, run_encode
from mvlm.data.errors import BadSampleError
from mvlm.data.textrows import iter_rows
from mvlm.testing.tiny_models import build_tiny_checkpoint

SEED = 20261202
TEXTS = [("Hello there", "General Kenobi"), ("Un café, s'il vous plaît ☕", "Voilà, monsieur"),
         ("日本語で答えて", "はい、わかりました"), ("emoji? 🙂", "🙃 sure, \"quoted\" too"),
         ("a, b and c", "three letters\nover two lines"), ("What is 2+2?", "four"),
         ("tab\there", "back\\slash"), ("Ünïcödé", "ÄÖÜ ß"), ("last one", "done")]
KINDS = ("random", "truncated", "nul", "surrogate", "overlong", "continuation", "escaped")


def _row(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


GOOD = [json.dumps(_row(q, a), ensure_ascii=False).encode() for q, a in TEXTS]


def _corrupt(kind, good, rng):
    """One corrupted line (no newline in it) derived from a good row or from nothing."""
    pos = rng.randrange(1, len(good) - 1)
    if kind == "random":
        junk = bytearray(rng.randbytes(rng.randint(1, 40)).replace(b"\n", b"\xfe"))
        junk.insert(rng.randrange(len(junk) + 1), 0xFF)  # 0xff is never UTF-8
        return bytes(junk)
    if kind == "truncated":
        return good[:pos]
    if kind == "nul":
        return good[:pos] + b"\x00" + good[pos:]
    if kind == "surrogate":  # U+D800 encoded as if it were a scalar value
        return good[:pos] + b"\xed\xa0\x80" + good[pos:]
    if kind == "escaped":  # valid JSON whose string holds half a surrogate pair: not text
        at = good.index(b'"content": "') + len(b'"content": "')
        return good[:at] + rng.choice([b"\\ud800", b"\\uDFFF", b"\\udbff!"]) + good[at:]
    if kind == "overlong":  # '/' as 2, 3 and 4 bytes
        return good[:pos] + rng.choice([b"\xc0\xaf", b"\xe0\x80\xaf", b"\xf0\x80\x80\xaf"]) + \
            good[pos:]
    ascii_at = [i for i, b in enumerate(good) if b < 0x80]
    i = rng.choice(ascii_at)
    return good[:i] + bytes([rng.randint(0x80, 0xBF)]) + good[i + 1:]  # lone continuation


def _reason(line):
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return "bad_encoding"
    try:
        row = json.loads(text)
    except json.JSONDecodeError:
        return "bad_json"
    with pytest.raises(UnicodeEncodeError):  # a corruption that is a good row is no corruption
        json.dumps(row, ensure_ascii=False).encode()
    return "bad_encoding"


def _is_utf8(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _assemble(lines, *, bom=False, crlf=False, final_newline=True):
    nl = b"\r\n" if crlf else b"\n"
    data = nl.join(lines) + (nl if final_newline else b"")
    return (b"\xef\xbb\xbf" if bom else b"") + data


def _fuzz_file(rng, kinds):
    """(bytes, [(line, reason)] of the corrupted lines) of one fuzzed JSONL file."""
    items = [("good", g) for g in GOOD]
    for kind in kinds:
        items.insert(rng.randrange(len(items) + 1), ("bad", _corrupt(kind, rng.choice(GOOD), rng)))
    for blank in (b"", b"  \t", b""):
        items.insert(rng.randrange(1, len(items)), ("blank", blank))
    bad = [(n, _reason(b)) for n, (what, b) in enumerate(items, start=1) if what == "bad"]
    data = _assemble([b for _, b in items], bom=rng.random() < 0.5, crlf=rng.random() < 0.5,
                     final_newline=rng.random() < 0.5)
    return data, bad


def _json_array(bad_at):
    """Pretty-printed array with BOM + CRLF; element ``bad_at`` has a non-UTF-8 byte."""
    lines = [b"["]
    rows = list(GOOD)
    rows.insert(bad_at, GOOD[0].replace(b"Hello", b"He\xffllo"))
    for i, r in enumerate(rows):
        lines.append(b"  " + r + (b"," if i < len(rows) - 1 else b""))
    lines.append(b"]")
    return _assemble(lines, bom=True, crlf=True), [(bad_at + 2, "bad_encoding")]


def _csv():
    """query,response CSV with BOM + CRLF, a blank line and a record that is not UTF-8."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(["query", "response"])
    for q, a in TEXTS[:4]:
        w.writerow([q, a])
    head = buf.getvalue().encode()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    for q, a in TEXTS[4:]:
        w.writerow([q, a])
    tail = buf.getvalue().encode()
    line = head.count(b"\n") + 1
    data = b"\xef\xbb\xbf" + head + b"caf\xe9 au lait,latin-1 row\r\n\r\n" + tail
    return data, [(line, "bad_encoding")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("bytes")
    ckpt = build_tiny_checkpoint("qwen2", d / "ckpt")
    rng = random.Random(SEED)
    files = {"clean.jsonl": (_assemble(GOOD), []),
             "bom.jsonl": (_assemble(GOOD, bom=True), []),
             "crlf.jsonl": (_assemble(GOOD, crlf=True), []),
             "bom_crlf_nofinal.jsonl": (_assemble(GOOD, bom=True, crlf=True,
                                                  final_newline=False), []),
             "array.json": _json_array(3), "rows.csv": _csv()}
    kinds = list(KINDS) * 3
    rng.shuffle(kinds)
    for k in range(4):
        files[f"fuzz{k}.jsonl"] = _fuzz_file(rng, kinds[k * 4:(k + 1) * 4] + [KINDS[k]])
    for name, (data, _) in files.items():
        (d / name).write_bytes(data)
    return d, ckpt, files


@pytest.fixture(scope="module")
def clean(corpus):
    """Token ids and labels of the clean file (in-process encode)."""
    d, ckpt, _ = corpus
    assert run_encode(_parse(_args(d, ckpt, ["clean.jsonl"], "error", "out_clean"))) == 0
    enc = _load(d / "out_clean")
    assert len(enc["input_ids"]) == len(GOOD) and all(n > 10 for n in enc["length"])
    return enc["input_ids"], enc["labels"]


def _load(out):
    """The saved train split as plain Python lists (datasets 5 returns lazy Column objects)."""
    return datasets.load_from_disk(str(out / "train")).to_dict()


def _args(d, ckpt, names, policy, out, *extra):
    return ["--model", str(ckpt), "--dataset", *[str(d / n) for n in names],
            "--output_dir", str(d / out), "--max_length", "512", "--dataset_shuffle", "false",
            "--on_bad_sample", policy, *extra]


def _parse(argv):
    p = argparse.ArgumentParser()
    add_encode_args(p)
    return EncodeConfig.from_flags(vars(p.parse_args(argv)))


def _cli(argv):
    return subprocess.run([sys.executable, "-m", "mvlm", "encode", *argv], capture_output=True,
                          text=True, timeout=600)


def _expected_counts(files, names):
    counts = {}
    for n in names:
        for _, reason in files[n][1]:
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def test_fuzz_corpus_is_what_it_claims(corpus):
    """The generator covers every corruption kind and every valid variant; lines as editors."""
    d, _, files = corpus
    bad = [b for _, (_, bs) in files.items() for b in bs]
    assert {r for _, r in bad} == {"bad_encoding", "bad_json"} and len(bad) >= 20
    for name, (data, bs) in files.items():
        rows = list(iter_rows(str(d / name)))
        lines = data.split(b"\n")
        not_utf8 = [(n, r) for n, r in bs if not _is_utf8(lines[n - 1])]
        assert all(r == "bad_encoding" for _, r in not_utf8)
        assert [(r.line, r.reason) for r in rows if r.reason] == not_utf8, name
        for r in rows:  # the line number points at the row's bytes, as `sed -n Np` shows it
            if name.endswith(".jsonl") and not r.reason:
                assert r.text.encode() in lines[r.line - 1], (name, r.line)


def test_encode_cli_skip_and_error(corpus, clean):
    d, ckpt, files = corpus
    names = list(files)
    r = _cli(_args(d, ckpt, names, "skip", "out_skip"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    expected = _expected_counts(files, names)
    total = sum(expected.values())
    parts = ", ".join(f"{k}={v}" for k, v in sorted(expected.items()))
    assert f"skipped samples: {total} ({parts})" in r.stdout, r.stdout
    stats = json.loads((d / "out_skip" / "stats.json").read_text())
    assert stats["skipped"] == expected and stats["samples"] == len(GOOD) * len(names)
    enc = _load(d / "out_skip")
    ids, labels = enc["input_ids"], enc["labels"]
    k = len(GOOD)
    for f in range(len(names)):  # every file's good rows == the clean file's, token for token
        assert ids[f * k:(f + 1) * k] == clean[0], names[f]
        assert labels[f * k:(f + 1) * k] == clean[1], names[f]

    # error: valid variants pass, the first bad line of the first broken file is named
    first = files["fuzz0.jsonl"][1][0]
    r = _cli(_args(d, ckpt, ["bom_crlf_nofinal.jsonl", "crlf.jsonl", "fuzz0.jsonl"], "error",
                   "out_err"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"fuzz0.jsonl, line {first[0]}): {first[1]}" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("name", ["fuzz1.jsonl", "fuzz2.jsonl", "fuzz3.jsonl", "array.json",
                                  "rows.csv"])
def test_encode_error_names_first_bad_line(corpus, name, capsys):
    d, ckpt, files = corpus
    line, reason = files[name][1][0]
    assert run_encode(_parse(_args(d, ckpt, [name], "error", f"err_{name}"))) == 2
    err = capsys.readouterr().err
    assert f"{name}, line {line}): {reason}" in err and "--on_bad_sample skip" in err


def test_num_proc_2_counts(corpus, clean, capsys):
    """Eager encoding with 2 processes: skip counts reach the report, good rows in order."""
    d, ckpt, files = corpus
    big = [b for _ in range(8) for b in GOOD]
    rng = random.Random(SEED + 1)
    bad = []
    for kind in KINDS * 2:
        at = rng.randrange(len(big) + 1)
        big.insert(at, _corrupt(kind, rng.choice(GOOD), rng))
        bad = [(n + (n >= at + 1), r) for n, r in bad] + [(at + 1, _reason(big[at]))]
    (d / "big.jsonl").write_bytes(_assemble(big, crlf=True))
    assert len(big) >= 64  # encode_raw uses at most len // 32 processes
    assert run_encode(_parse(_args(d, ckpt, ["big.jsonl"], "skip", "out_np2",
                                   "--dataset_num_proc", "2"))) == 0
    stats = json.loads((d / "out_np2" / "stats.json").read_text())
    assert stats["skipped"] == _expected_counts({"big": (None, bad)}, ["big"])
    assert _load(d / "out_np2")["input_ids"] == clean[0] * 8
    assert run_encode(_parse(_args(d, ckpt, ["big.jsonl"], "error", "err_np2",
                                   "--dataset_num_proc", "2"))) == 2
    err = capsys.readouterr().err
    shown = int(err.split("big.jsonl, line ")[1].split(")")[0])
    assert shown in {n for n, _ in bad}  # the first bad line of one worker's shard


def _good_flags(d, files, name):
    """Per row of the file (as the loader numbers them): is it one of the good rows?"""
    bad_lines = {n for n, _ in files[name][1]}
    return [r.line not in bad_lines for r in iter_rows(str(d / name))]


@pytest.mark.parametrize("mode", ["lazy_tokenize", "streaming"])
def test_lazy_and_streaming_with_workers(corpus, clean, mode):
    """Bad rows skipped in loader workers are counted in the training process, once per row."""
    d, ckpt, files = corpus
    names = ["fuzz0.jsonl", "rows.csv", "fuzz3.jsonl"]
    args = _parse(_args(d, ckpt, names, "skip", "unused", f"--{mode}", "true"))
    data = build_train_dataset(args, str(ckpt))
    loader = build_dataloader(data, micro_batch_size=1, shuffle=False, num_workers=2,
                              num_epochs=1)
    got = [b["input_ids"][0].tolist() for b in loader]
    if mode == "streaming":
        assert got == clean[0] * len(names)
    else:  # a bad row is replaced by the next good one
        good = [g for n in names for g in _good_flags(d, files, n)]
        order = []
        for i in range(len(good)):
            j = i
            while not good[j % len(good)]:
                j += 1
            order.append(sum(good[:j % len(good)]))  # ordinal of the good row served
        assert got == [(clean[0] * len(names))[k] for k in order]
    assert dict(data.bad_samples.counts) == _expected_counts(files, names)
    assert data.bad_samples.summary().startswith(
        f"skipped samples: {sum(_expected_counts(files, names).values())} (")


def test_lazy_error_names_line(corpus):
    d, ckpt, files = corpus
    args = _parse(_args(d, ckpt, ["fuzz2.jsonl"], "error", "unused", "--lazy_tokenize", "true"))
    data = build_train_dataset(args, str(ckpt))
    first = files["fuzz2.jsonl"][1][0]
    idx = [r.line for r in iter_rows(str(d / "fuzz2.jsonl"))].index(first[0])
    with pytest.raises(BadSampleError, match=rf"fuzz2\.jsonl, line {first[0]}\): {first[1]}"):
        data.train[idx]


def test_streaming_epochs_cycle_and_count_rows(corpus, clean, tmp_path):
    """--streaming with --num_train_epochs: len() is the files' row count (bad rows included),
    the stream goes on into the next epoch in the same order (bad rows skipped again, counted
    once), each DP rank cycles its own share, and a pass without a sample raises, not hangs."""
    d, ckpt, files = corpus
    name = "fuzz0.jsonl"
    args = _parse(_args(d, ckpt, [name], "skip", "unused", "--streaming", "true"))
    epochs = ScheduleConfig(num_train_epochs=2.0)  # what `mvlm sft` passes (a step budget)
    n_rows = len(GOOD) + len(files[name][1])
    for dp_rank, dp_size in ((0, 1), (0, 2), (1, 2)):
        data = build_train_dataset(args, str(ckpt), dp_rank=dp_rank, dp_size=dp_size,
                                   schedule=epochs)
        assert len(data.train) == n_rows  # rows, not encodable samples
        it = iter(build_dataloader(data, micro_batch_size=1, dp_rank=dp_rank, dp_size=dp_size))
        mine = clean[0][dp_rank::dp_size]
        got = [next(it)["input_ids"][0].tolist() for _ in range(3 * len(mine) + 1)]
        assert got == mine * 3 + mine[:1]  # three passes and into the fourth, same order
        assert dict(data.bad_samples.counts) == _expected_counts(files, [name])
    # one pass only when a loader asks for it (num_epochs), as evaluation does
    data = build_train_dataset(args, str(ckpt), schedule=epochs)
    one = list(build_dataloader(data, micro_batch_size=1, num_epochs=1))
    assert len(one) == len(GOOD)
    (tmp_path / "allbad.jsonl").write_bytes(b"{bad\n\xff\xfe\n")
    args = _parse(_args(tmp_path, ckpt, ["allbad.jsonl"], "skip", "unused", "--streaming",
                        "true"))
    data = build_train_dataset(args, str(ckpt), schedule=ScheduleConfig(num_train_epochs=1.0))
    assert len(data.train) == 2
    with pytest.raises(BadSampleError, match="one pass over the streamed dataset yielded 0"):
        next(iter(build_dataloader(data, micro_batch_size=1)))


def test_lazy_tokenize_with_packing_encodes_up_front(corpus, clean):
    """--lazy_tokenize true --packing true builds the same packed rows as the eager encode."""
    d, ckpt, _ = corpus
    base = _args(d, ckpt, ["clean.jsonl", "crlf.jsonl"], "error", "unused", "--packing",
                 "true")
    eager = build_train_dataset(_parse(base), str(ckpt))
    lazy = build_train_dataset(_parse(base + ["--lazy_tokenize", "true"]), str(ckpt))
    assert lazy.packing and len(lazy.train) == len(eager.train) >= 2
    assert lazy.train.packs == eager.train.packs
    for i in range(len(eager.train)):
        a, b = eager.train[i], lazy.train[i]
        assert [x["input_ids"].tolist() for x in a] == [x["input_ids"].tolist() for x in b]
    flat = [x["input_ids"].tolist() for i in range(len(lazy.train)) for x in lazy.train[i]]
    assert sorted(flat) == sorted(clean[0] * 2)


@pytest.mark.parametrize("kind", ["directory", "hub_subset"])
def test_directory_and_hub_rows_read_line_by_line(corpus, clean, tmp_path, monkeypatch,
                                                  capsys, kind):
    """A dataset directory, and a hub dataset ID with :SUBSET (offline HF cache), whose second
    file holds a line that is not UTF-8 and a line that is not JSON: skip counts both and keeps
    every good row (the clean file's tokens, in file order); error mode names the file and
    line; lazy mode names them too."""
    d, ckpt, _ = corpus
    rev = "0123456789abcdef0123456789abcdef01234567"
    if kind == "directory":
        root = tmp_path / "dirset"
        spec = str(root)
    else:
        repo = tmp_path / "hub" / "datasets--org--data"
        root = repo / "snapshots" / rev / "sub"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(rev)
        (repo / "snapshots" / rev / "other").mkdir(parents=True)
        (repo / "snapshots" / rev / "other" / "x.jsonl").write_bytes(GOOD[0] + b"\n")
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        spec = "org/data:sub"
    (root / "part").mkdir(parents=True)
    (root / "a.jsonl").write_bytes(b"\n".join(GOOD[:3]) + b"\n")
    second = root / "part" / "b.jsonl"
    second.write_bytes(b"\n".join(GOOD[3:5] + [b'{"messages": "\xff\xfe"}', GOOD[5],
                                               b"{broken", GOOD[6]]) + b"\n")

    def args(policy, *extra):
        a = _parse(_args(d, ckpt, ["clean.jsonl"], policy, "dirset_out", *extra))
        a.dataset = [spec]
        return a

    data = build_train_dataset(args("skip"), str(ckpt))
    got = [data.train[i]["input_ids"].tolist() for i in range(len(data.train))]
    assert got == clean[0][:7]
    assert dict(data.bad_samples.counts) == {"bad_encoding": 1, "bad_json": 1}
    assert run_encode(args("error")) == 2
    err = capsys.readouterr().err
    assert f"{second}, line 3): bad_encoding" in err, err
    lazy = build_train_dataset(args("error", "--lazy_tokenize", "true"), str(ckpt))
    with pytest.raises(BadSampleError, match=rf"{second}, line 5\): bad_json"):
        lazy.train[7]  # rows 0-2 in a.jsonl, 3-8 in part/b.jsonl
    stream = build_train_dataset(args("skip", "--streaming", "true"), str(ckpt))
    loader = build_dataloader(stream, micro_batch_size=1, shuffle=False, num_epochs=1)
    assert [b["input_ids"][0].tolist() for b in loader] == clean[0][:7]
    assert dict(stream.bad_samples.counts) == {"bad_encoding": 1, "bad_json": 1}
