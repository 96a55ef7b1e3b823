"""End-to-end data path: dataset specs -> encode (eager / lazy / cached) -> packed batches."""
import argparse
import io
import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from mvlm.config import EncodeConfig
from mvlm.data.dataset_spec import DatasetSpec, load_datasets
from mvlm.data.encode import add_encode_args, build_dataloader, build_train_dataset, run_encode
from mvlm.data.media import MediaConfig
from mvlm.testing.tiny_models import build_tiny_checkpoint


def _png(w, h, seed):
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    ckpt = build_tiny_checkpoint("qwen2_5_vl", d / "ckpt")
    (d / "img").mkdir()
    for i in range(4):
        (d / "img" / f"{i}.png").write_bytes(_png(40 + 30 * i, 60 + 10 * i, i))
    rows = []
    for i in range(24):
        if i % 3 == 0:
            rows.append({"messages": [{"role": "user", "content": f"Question {i}?"},
                                      {"role": "assistant", "content": "Answer " * (1 + i % 5)}]})
        else:
            rows.append({"messages": [{"role": "user", "content": f"<image>Describe {i}."},
                                      {"role": "assistant", "content": "A picture."}],
                         "images": [f"img/{i % 4}.png"]})
    with open(d / "a.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    # parquet with raw image bytes, query/response format
    datasets.Dataset.from_dict({
        "query": ["<image>What is it?"] * 6, "response": ["A square."] * 6,
        "images": [[{"bytes": _png(50, 50, 9), "path": None}]] * 6,
    }).to_parquet(str(d / "b.parquet"))
    return d, ckpt


def _args(d, ckpt, *extra):
    p = argparse.ArgumentParser()
    add_encode_args(p)
    return EncodeConfig.from_flags(vars(p.parse_args([
        "--model", str(ckpt), "--output_dir", str(d / "out"), "--dataset", str(d / "a.jsonl"),
        f"{d / 'b.parquet'}#10", "--max_length", "256", "--seed", "1", *extra])))


def test_spec_parsing_and_sampling(env):
    d, _ = env
    assert DatasetSpec.parse("x.jsonl#2000") == DatasetSpec("x.jsonl", 2000)
    train, val = load_datasets([f"{d / 'a.jsonl'}#50", f"{d / 'b.parquet'}#4"],
                               split_dataset_ratio=0.1)
    assert len(train[0].data) + len(val[0].data) == 50  # 24 rows repeated twice + 2 sampled
    assert len(train[1].data) + len(val[1].data) == 4
    rows = train[0].data["_mvlm_row"]
    assert max(rows) < 24
    # a directory written by datasets.save_to_disk, and a JSON array file
    datasets.Dataset.from_dict({"query": ["a", "b"], "response": ["x", "y"]}).save_to_disk(
        str(d / "hfdir"))
    (d / "arr.json").write_text(json.dumps([{"query": "a", "response": "x"}] * 3))
    train, _ = load_datasets([str(d / "hfdir"), str(d / "arr.json")])
    assert [len(r.data) for r in train] == [2, 3]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_datasets([str(d / "nope.jsonl")])


def test_encode_cli_cache_and_training_views(env, capsys):
    d, ckpt = env
    args = _args(d, ckpt, "--packing", "true", "--dump", "3", "--dataset_num_proc", "2",
                 "--split_dataset_ratio", "0.1")
    assert run_encode(args) == 0
    out = capsys.readouterr().out
    assert "packing efficiency" in out and "skipped samples: 0" in out
    stats = json.loads((d / "out" / "stats.json").read_text())
    assert stats["samples"] + stats["val_samples"] == 34
    assert 0 < stats["images"] < stats["samples"]
    dump = [json.loads(x) for x in (d / "out" / "dump.jsonl").read_text().splitlines()]
    assert len(dump) == 3 and "input_ids" in dump[0] and "labels" in dump[0]

    # training from the cache equals training from an eager encode of the same flags
    cached = build_train_dataset(_args(d, ckpt, "--packing", "true", "--cached_dataset",
                                       str(d / "out"), "--split_dataset_ratio", "0.1"), str(ckpt))
    eager = build_train_dataset(_args(d, ckpt, "--packing", "true", "--split_dataset_ratio",
                                      "0.1"), str(ckpt))
    la = build_dataloader(cached, micro_batch_size=1, pad_to_multiple_of=8, num_epochs=1)
    lb = build_dataloader(eager, micro_batch_size=1, pad_to_multiple_of=8, num_epochs=1)
    n = 0
    for a, b in zip(la, lb):
        n += 1
        assert a["input_ids"].shape[0] == 1 and a["input_ids"].shape[1] % 8 == 0
        assert a["position_ids"].shape == (3, 1, a["input_ids"].shape[1])
        for k in a:
            if isinstance(a[k], torch.Tensor):
                assert torch.equal(a[k], b[k]), k
        if "image_grid_thw" in a:
            npatch = int(a["image_grid_thw"].prod(-1).sum())
            assert a["pixel_values"].shape == (npatch, 1176)
            # image tokens in the row == patches / merge^2
            assert int((a["input_ids"] == cached.template.image_token_id).sum()) == npatch // 4
    assert n == len(cached.train)


def test_lazy_equals_eager(env):
    d, ckpt = env
    eager = build_train_dataset(_args(d, ckpt, "--dataset_shuffle", "false"), str(ckpt))
    lazy = build_train_dataset(_args(d, ckpt, "--lazy_tokenize", "true"), str(ckpt))
    assert len(eager.train) == len(lazy.train) == 34
    for i in (0, 1, 5, 30):
        a, b = eager.train[i], lazy.train[i]
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["position_ids"], b["position_ids"])
        if "pixel_values" in a:
            assert torch.equal(a["pixel_values"], b["pixel_values"])


def test_streaming_packed(env):
    d, ckpt = env
    data = build_train_dataset(_args(d, ckpt, "--streaming", "true", "--packing", "true"),
                               str(ckpt))
    batches = list(build_dataloader(data, micro_batch_size=1))
    # streaming '#10' takes at most 10 rows (no repetition): 24 + 6
    assert sum(b["num_samples"] for b in batches) == 30
    # two loader workers split the stream without duplicating it
    two = list(build_dataloader(data, micro_batch_size=1, num_workers=2))
    assert sorted(b["input_ids"].shape[1] for b in two) == \
        sorted(b["input_ids"].shape[1] for b in batches)
    assert all(b["cu_seqlens"][-1] <= 256 for b in batches)


def test_pixel_budget_flags_win_over_env(env, monkeypatch):
    monkeypatch.setenv("MAX_PIXELS", str(28 * 28 * 4))
    assert MediaConfig.from_env().max_pixels == 28 * 28 * 4
    assert MediaConfig.from_env(max_pixels=28 * 28 * 16).max_pixels == 28 * 28 * 16
    monkeypatch.setenv("IMAGE_MAX_TOKEN_NUM", "2")
    assert MediaConfig.from_env().image_pixel_range(28, 784, 10**6) == (784, 28 * 28 * 2)
    d, ckpt = env
    data = build_train_dataset(_args(d, ckpt, "--dataset_shuffle", "false",
                                     "--image_max_token_num", "4", "--min_pixels", "784"),
                               str(ckpt))
    grids = [data.train[i]["image_grid_thw"] for i in range(len(data.train))
             if "image_grid_thw" in data.train[i]]
    assert grids and all(int(g.prod(-1).max()) // 4 <= 4 for g in grids)
