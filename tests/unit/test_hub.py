"""Hub IDs for --model / --dataset (mvlm.hub), offline, from a pre-filled Hugging Face cache.

The cache is built in huggingface_hub's own layout (``models--org--name/refs/main`` holding the
revision, ``snapshots/<rev>/...`` holding the files), exactly what ``huggingface-cli download``
leaves behind; with ``HF_HUB_OFFLINE=1`` nothing may touch the network.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

REV = "0123456789abcdef0123456789abcdef01234567"


def put_in_cache(cache: Path, repo_type: str, repo_id: str, files: dict[str, str]) -> Path:
    """Write ``files`` as the main revision of ``repo_id`` in an HF hub cache; returns the
    snapshot directory."""
    org, name = repo_id.split("/")
    root = cache / f"{repo_type}s--{org}--{name}"
    snap = root / "snapshots" / REV
    for rel, text in files.items():
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).write_text(text)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(REV)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def rows(n: int, tag: str = "t") -> str:
    return "".join(json.dumps({"messages": [{"role": "user", "content": f"{tag} q{i}"},
                                            {"role": "assistant", "content": f"{tag} a{i}"}]})
                   + "\n" for i in range(n))


def test_model_id_resolves_from_offline_cache(offline_cache, tmp_path):
    from mvlm.hub import resolve_model
    from mvlm.train.args import parse_train_args

    snap = put_in_cache(offline_cache, "model", "org/tiny-vl", {"config.json": "{}"})
    assert resolve_model("org/tiny-vl") == str(snap)
    data = tmp_path / "d.jsonl"
    data.write_text(rows(2))
    cfg = parse_train_args(["--model", "org/tiny-vl", "--dataset", str(data),
                            "--output_dir", str(tmp_path / "o")], "sft")
    assert cfg.base.model == str(snap)
    assert any("--model org/tiny-vl -> " + str(snap) in n for n in cfg.notes), cfg.notes


def test_local_directory_wins_over_an_id(offline_cache, tmp_path, monkeypatch):
    from mvlm.hub import is_repo_id, resolve_model

    put_in_cache(offline_cache, "model", "org/tiny-vl", {"config.json": "{}"})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "tiny-vl").mkdir(parents=True)
    assert not is_repo_id("org/tiny-vl")
    assert resolve_model("org/tiny-vl") == "org/tiny-vl"
    assert not is_repo_id("./org/tiny-vl") and not is_repo_id("/abs/x")


def test_missing_id_offline_says_how_to_get_it(offline_cache):
    from mvlm.hub import HubResolutionError, resolve_model

    with pytest.raises(HubResolutionError) as e:
        resolve_model("org/not-there")
    msg = str(e.value)
    assert "--model org/not-there" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "huggingface-cli download org/not-there" in msg and "local path" in msg


def test_modelscope_missing_message(tmp_path, monkeypatch):
    """--use_hf false (ms-swift's default) without the modelscope package and without a
    reachable HF hub: the error names both fixes (no network is used: the download is stubbed)."""
    import mvlm.hub as hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    def fake_hf(repo_id, repo_type, *, local_only, revision, token):
        calls.append(local_only)
        raise OSError("no network in this test")

    def no_modelscope(*a, **k):
        raise ImportError("No module named 'modelscope'")

    monkeypatch.setattr(hub, "_hf", fake_hf)
    monkeypatch.setattr(hub, "_modelscope", no_modelscope)
    with pytest.raises(hub.HubResolutionError) as e:
        hub.resolve_model("AI-ModelScope/some-model", use_hf=False)
    msg = str(e.value)
    assert "pip install modelscope" in msg and "local path" in msg, msg
    assert calls == [True, False]  # cache first, then the HF download of the same ID


def test_dataset_id_with_sampling_and_subset(offline_cache):
    from mvlm.data.dataset_spec import DatasetSpec, decode_row, load_one

    put_in_cache(offline_cache, "dataset", "org/vqa", {
        "train.jsonl": rows(5, "train"), "validation/part.jsonl": rows(3, "val"),
        "README.md": "# not data\n"})
    spec = DatasetSpec.parse("org/vqa:validation#2")
    assert (spec.path, spec.subset, spec.num_samples) == ("org/vqa", "validation", 2)
    val = load_one("org/vqa:validation#2")
    got = [decode_row(val.data[i])["messages"][0]["content"] for i in range(len(val.data))]
    assert len(got) == 2 and all(c.startswith("val q") for c in got), got
    # ms-swift subset names with underscores (LaTeX_OCR:human_handwrite) and split-style files
    put_in_cache(offline_cache, "dataset", "org/ocr", {
        "human_handwrite/train.jsonl": rows(4, "hw"), "full/train.jsonl": rows(2, "full"),
        "data/validation-00000-of-00001.jsonl": rows(1, "v")})
    hw = load_one("org/ocr:human_handwrite")
    assert [decode_row(hw.data[i])["messages"][0]["content"] for i in range(4)] == \
        [f"hw q{i}" for i in range(4)]
    assert len(load_one("org/ocr:validation").data) == 1
    with pytest.raises(FileNotFoundError, match="--dataset org/ocr:nope: no data file"):
        load_one("org/ocr:nope")
    # no subset: every data file of the repo (5 train + 3 validation rows)
    every = load_one("org/vqa")
    texts = sorted(decode_row(every.data[i])["messages"][0]["content"]
                   for i in range(len(every.data)))
    assert texts == sorted([f"train q{i}" for i in range(5)] + [f"val q{i}" for i in range(3)])
    # #N larger than the set repeats it (ms-swift): 8 rows -> 10 = one full copy + 2 sampled
    ten = load_one("org/vqa#10")
    got10 = [decode_row(ten.data[i])["messages"][0]["content"] for i in range(len(ten.data))]
    assert len(got10) == 10 and set(got10) == set(texts)


def test_dataset_id_missing_offline(offline_cache):
    from mvlm.data.dataset_spec import load_one
    from mvlm.hub import HubResolutionError

    with pytest.raises(HubResolutionError, match="--dataset org/none"):
        load_one("org/none#3")


def test_modelscope_is_used_for_use_hf_false(tmp_path, monkeypatch):
    """--use_hf false (ms-swift's default): a cache miss goes to ModelScope's downloaders
    (a stand-in module here: no network); --use_hf true never asks ModelScope."""
    import sys
    import types

    import mvlm.hub as hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    def model_dl(repo_id, **kw):
        calls.append(("model", repo_id, kw))
        return str(tmp_path / "ms_model")

    def data_dl(repo_id, **kw):
        calls.append(("dataset", repo_id, kw))
        return str(tmp_path / "ms_data")

    mod = types.ModuleType("modelscope.hub.snapshot_download")
    mod.snapshot_download, mod.dataset_snapshot_download = model_dl, data_dl
    for name in ("modelscope", "modelscope.hub"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "modelscope.hub.snapshot_download", mod)
    r = hub.resolve("AI-ModelScope/m", use_hf=False, revision="v1", token="tok")
    assert (r.path, r.source) == (str(tmp_path / "ms_model"), "modelscope")
    r = hub.resolve("AI-ModelScope/d", repo_type="dataset")
    assert (r.path, r.source) == (str(tmp_path / "ms_data"), "modelscope")
    assert calls == [("model", "AI-ModelScope/m", {"revision": "v1", "token": "tok"}),
                     ("dataset", "AI-ModelScope/d", {"revision": None})]

    def hf_only(repo_id, repo_type, *, local_only, revision, token):
        if local_only:
            raise OSError("cache miss")
        return str(tmp_path / "hf_model")

    monkeypatch.setattr(hub, "_hf", hf_only)
    assert hub.resolve("Qwen/x", use_hf=True).source == "hf" and len(calls) == 2
