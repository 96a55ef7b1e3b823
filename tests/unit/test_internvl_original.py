"""InternVL in OpenGVLab's original layout (``model_type`` ``internvl_chat``): a tiny ``-hf``
checkpoint is rewritten into the original layout by the inverse mapping written here (config with
``llm_config`` / ``vision_config``, tensors renamed, q/k/v fused), then: the translated config
equals the ``-hf`` one; every tensor the adapter serves is ``torch.equal`` to the ``-hf`` tensor;
a Megatron model loaded from the original directory equals one loaded from the ``-hf`` directory
parameter by parameter; its logits match transformers on the ``-hf`` directory within the bound
of the InternVL dist test; ``convert --to mcore`` then ``--to hf`` gives the ``-hf`` tensors back
bit-exactly. Bad input (no ``vision_model.*``, an InternLM2 ``llm_config``) is refused before
any output, by name.
"""
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import run_mvlm
from safetensors.torch import load_file, save_file

from mvlm.convert.hf_io import CheckpointError, open_hf_reader
from mvlm.models.internvl.original import OriginalInternVLReader
from mvlm.models.registry import load_hf_config
from mvlm.testing.tiny_models import build_tiny_checkpoint

# -hf name -> original name (the inverse of the adapter, written independently of it)
_TOP = {
    "vision_tower.embeddings.cls_token": "vision_model.embeddings.class_embedding",
    "vision_tower.embeddings.patch_embeddings.projection.weight":
        "vision_model.embeddings.patch_embedding.weight",
    "vision_tower.embeddings.patch_embeddings.projection.bias":
        "vision_model.embeddings.patch_embedding.bias",
    "vision_tower.embeddings.position_embeddings": "vision_model.embeddings.position_embedding",
    "multi_modal_projector.layer_norm.weight": "mlp1.0.weight",
    "multi_modal_projector.layer_norm.bias": "mlp1.0.bias",
    "multi_modal_projector.linear_1.weight": "mlp1.1.weight",
    "multi_modal_projector.linear_1.bias": "mlp1.1.bias",
    "multi_modal_projector.linear_2.weight": "mlp1.3.weight",
    "multi_modal_projector.linear_2.bias": "mlp1.3.bias",
}
_LAYER = {"attention.projection_layer": "attn.proj", "attention.q_norm": "attn.q_norm",
          "attention.k_norm": "attn.k_norm", "layernorm_before": "norm1",
          "layernorm_after": "norm2", "lambda_1": "ls1", "lambda_2": "ls2",
          "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
CASES = {
    "qwen2": {},
    # InternVL 3.5's Qwen3 LLM, tied; q/k norm and RMSNorm in the ViT (InternViT-6B's options)
    "qwen3_tied_qknorm_rms": {"text_model_type": "qwen3", "tie_word_embeddings": True,
                              "vision_config": {"use_qk_norm": True, "norm_type": "rms_norm"}},
}


def _to_original_name(name: str) -> str:
    if name in _TOP:
        return _TOP[name]
    m = re.match(r"vision_tower\.encoder\.layer\.(\d+)\.(.+?)(\.weight|\.bias)?$", name)
    assert m, name
    return f"vision_model.encoder.layers.{m.group(1)}.{_LAYER[m.group(2)]}{m.group(3) or ''}"


def _to_original_weights(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k.startswith("language_model."):
            out[k] = v
        elif ".attention.q_proj." in k:
            pre, suf = k.split(".attention.q_proj.")
            fused = torch.cat([sd[f"{pre}.attention.{p}_proj.{suf}"] for p in "qkv"])
            out[_to_original_name(pre + ".attention.projection_layer." + suf)
                .replace("attn.proj", "attn.qkv")] = fused
        elif ".attention.k_proj." in k or ".attention.v_proj." in k:
            continue
        else:
            out[_to_original_name(k)] = v
    return out


def _to_original_config(hf: dict) -> dict:
    tc, vc = dict(hf["text_config"]), hf["vision_config"]
    tc["architectures"] = ["Qwen3ForCausalLM" if tc["model_type"] == "qwen3"
                           else "Qwen2ForCausalLM"]
    tc["tie_word_embeddings"] = hf["tie_word_embeddings"]
    size, patch = vc["image_size"][0], vc["patch_size"][0]
    return {
        "model_type": "internvl_chat", "architectures": ["InternVLChatModel"],
        "llm_config": tc,
        "vision_config": {
            "model_type": "intern_vit_6b", "architectures": ["InternVisionModel"],
            "hidden_size": vc["hidden_size"], "num_attention_heads": vc["num_attention_heads"],
            "intermediate_size": vc["intermediate_size"],
            "num_hidden_layers": vc["num_hidden_layers"], "image_size": size,
            "patch_size": patch, "num_channels": 3, "qkv_bias": vc["attention_bias"],
            "qk_normalization": vc["use_qk_norm"], "layer_norm_eps": vc["layer_norm_eps"],
            "norm_type": vc["norm_type"], "hidden_act": vc["hidden_act"],
            "initializer_factor": vc["layer_scale_init_value"],
            "initializer_range": vc["initializer_range"], "drop_path_rate": 0.0,
            "dropout": 0.0, "attention_dropout": 0.0, "use_flash_attn": False},
        "downsample_ratio": hf["downsample_ratio"], "select_layer": hf["vision_feature_layer"],
        "ps_version": "v2", "template": "internvl2_5", "force_image_size": size,
        "dynamic_image_size": True, "use_thumbnail": True, "max_dynamic_patch": 6,
        "min_dynamic_patch": 1, "torch_dtype": "float32",
    }


def _write_original(hf_dir: Path, out: Path, weights=None, config=None) -> Path:
    """The -hf checkpoint in OpenGVLab's layout; ``weights`` / ``config`` edit it (bad cases)."""
    out.mkdir(parents=True)
    for f in hf_dir.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, out / f.name)
    sd = _to_original_weights(load_file(hf_dir / "model.safetensors"))
    cfg = _to_original_config(json.loads((hf_dir / "config.json").read_text()))
    save_file(weights(sd) if weights else sd, out / "model.safetensors",
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config(cfg) if config else cfg, indent=1))
    return out


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    overrides = json.loads(json.dumps(CASES[request.param]))
    hf = build_tiny_checkpoint("internvl", tmp / "hf", **overrides)
    return hf, _write_original(hf, tmp / "orig")


def test_translated_config_equals_hf(pair):
    from transformers import AutoConfig

    hf_dir, orig = pair
    want, got = AutoConfig.from_pretrained(hf_dir).to_dict(), load_hf_config(orig).to_dict()
    for d in (want, got):
        for k in ("architectures", "transformers_version", "_name_or_path"):
            d.pop(k, None)
        # transformers ties by the top-level flag alone (compared); the text config's own flag
        # is unused by InternVLForConditionalGeneration (tiny -hf writes False under a True)
        for k in ("architectures", "tie_word_embeddings"):
            d["text_config"].pop(k, None)
    assert got == want


def test_every_tensor_equals_hf(pair):
    hf_dir, orig = pair
    ref = load_file(hf_dir / "model.safetensors")
    reader = open_hf_reader(orig)
    assert isinstance(reader, OriginalInternVLReader)
    assert {n for n in ref if n in reader} == set(ref)
    for name, t in ref.items():
        assert reader.shape(name) == list(t.shape), name
        assert torch.equal(reader.read(name), t), name
        view = reader.map_view(name)  # the pass-through path of convert --to mcore
        assert view is not None and torch.equal(view, t), name
    # the q rows of the fused tensor, sliced (what a row-split read would ask for)
    q = "vision_tower.encoder.layer.1.attention.q_proj.weight"
    assert torch.equal(reader.read(q, 0, 8, 24), ref[q][8:24])
    # coverage check names the files' own keys: q/k/v map back to the fused tensor
    assert reader.disk_name(q) == "vision_model.encoder.layers.1.attn.qkv.weight"
    assert {reader.disk_name(n) for n in ref} == set(reader.keys())


_MODEL_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from mvlm.convert.bridge import load_hf_weights
    from mvlm.convert.verify import verify_against_hf
    from mvlm.models.registry import load_hf_config
    from mvlm.models.vlm import build_model
    from mvlm.runtime.parallel import ParallelLayout
    from mvlm.runtime.startup import startup

    hf_dir, orig = sys.argv[1], sys.argv[2]
    startup(ParallelLayout(), seed=0, device="cpu")
    bundles = []
    for d in (hf_dir, orig):
        b = build_model(load_hf_config(d), ParallelLayout(), dtype=torch.float32, device="cpu")
        load_hf_weights(b, d)
        bundles.append(b)
    a = dict(bundles[0].models[0].named_parameters())
    o = dict(bundles[1].models[0].named_parameters())
    unequal = sorted(n for n in a if n not in o or not torch.equal(a[n], o[n]))
    res = verify_against_hf(bundles[1], hf_dir, tol=1e-4)
    print("RESULT " + json.dumps({"n": len(a), "names_equal": sorted(a) == sorted(o),
                                  "unequal": unequal,
                                  "dlogits": {r.name: r.max_abs_logits for r in res}}))
""")


def test_megatron_model_equals_hf_dir_and_logits_match(pair, tmp_path):
    hf_dir, orig = pair
    script = tmp_path / "internvl_orig.py"
    script.write_text(_MODEL_SCRIPT)
    p = subprocess.run([sys.executable, str(script), str(hf_dir), str(orig)],
                       capture_output=True, text=True, timeout=600)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-3000:]
    res = json.loads(line[0][7:])
    print(res)
    assert res["n"] > 0 and res["names_equal"] and res["unequal"] == []
    assert "image+text" in res["dlogits"]
    for name, d in res["dlogits"].items():  # measured 0.0 on every row (both cases)
        assert d <= 1e-6, (name, d)


def test_convert_original_then_export_gives_hf_tensors(pair, tmp_path):
    """``--to mcore`` accepts the original directory; ``--to hf`` writes the -hf layout, whose
    tensors equal the -hf checkpoint's bit for bit and whose config transformers loads."""
    from transformers import AutoConfig

    hf_dir, orig = pair
    mc, back = tmp_path / "mc", tmp_path / "back"
    p = run_mvlm(["convert", "--to", "mcore", "--model", str(orig), "--output", str(mc)])
    assert (p.stderr + p.stdout).count("OpenGVLab's original InternVL layout, read as") == 1
    run_mvlm(["convert", "--to", "hf", "--model", str(mc), "--output", str(back)])
    ref, got = load_file(hf_dir / "model.safetensors"), {}
    for f in sorted(back.glob("*.safetensors")):
        got |= load_file(f)
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert AutoConfig.from_pretrained(back).model_type == "internvl"


def test_verify_flag_is_refused_for_the_original_layout(tiny_ckpt, tmp_path):
    orig = _write_original(tiny_ckpt("internvl"), tmp_path / "orig")
    p = run_mvlm(["convert", "--to", "mcore", "--model", str(orig), "--output",
                  str(tmp_path / "mc"), "--verify"], check=False)
    assert p.returncode != 0 and "--verify compares against transformers" in p.stderr + p.stdout
    assert not (tmp_path / "mc").exists()


@pytest.mark.parametrize("case", ["no_vision_model", "internlm2_llm"])
def test_bad_original_checkpoints_are_refused_by_name(tiny_ckpt, tmp_path, case):
    hf_dir = tiny_ckpt("internvl")
    if case == "no_vision_model":
        bad = _write_original(hf_dir, tmp_path / case, weights=lambda sd: {
            k: v for k, v in sd.items() if not k.startswith("vision_model.")})
        with pytest.raises(CheckpointError, match=r"missing tensors.*vision_model\.embeddings"):
            open_hf_reader(bad)
        expect = r"missing tensors.*vision_model\.embeddings\.class_embedding"
    else:
        def internlm2(cfg):
            cfg["llm_config"] |= {"model_type": "internlm2",
                                  "architectures": ["InternLM2ForCausalLM"]}
            return cfg
        bad = _write_original(hf_dir, tmp_path / case, config=internlm2)
        with pytest.raises(ValueError, match="InternLM2"):
            load_hf_config(bad)
        expect = r"llm_config is InternLM2"
    out = tmp_path / "mc"
    p = run_mvlm(["convert", "--to", "mcore", "--model", str(bad), "--output", str(out)],
                 check=False)
    log = p.stderr + p.stdout
    assert p.returncode != 0 and re.search(expect, log, re.S), log[-3000:]
    assert not out.exists()


def test_training_on_the_original_layout_names_the_conversion(tiny_ckpt, tmp_path):
    """`mvlm sft --model <original dir>` stops before any output and says how to get a
    directory training reads (the two conversions), instead of transformers' remote-code
    error."""
    orig = _write_original(tiny_ckpt("internvl"), tmp_path / "orig")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n")
    out = tmp_path / "out"
    p = run_mvlm(["sft", "--model", str(orig), "--dataset", str(data), "--output_dir", str(out)],
                 check=False)
    log = p.stderr + p.stdout
    assert p.returncode != 0, log[-3000:]
    assert "'internvl_chat'" in log and "mvlm convert --to mcore" in log \
        and "mvlm convert --to hf" in log, log[-3000:]
    assert not out.exists() or not any(out.iterdir())
