#!/usr/bin/env bash
# GPU check for one H100/H200: mvlm (Megatron-Core, local spec + SDPA, bf16) vs transformers +
# torch AdamW on a ~1B-parameter Qwen2.5-VL-shaped random model. Prints tokens/s, MFU and peak
# memory for both as a short table LAST, just below the kernels mvlm ran with (the fused kernels
# mvlm.runtime.fusions turned on and off with the reason, the attention kernel of each layer, the
# packed-row layout); full numbers go to the results JSON.
#
# Usage:  scripts/gpu_check.sh [WHEEL_DIR] [-- options for bench/gpu_check.py]
#   WHEEL_DIR  folder with megatron-core (and any small pure-Python deps, e.g. einops) as .whl
#              files; default: $MVLM_WHEELS, else ./.whl, else next to this script. Not needed
#              when megatron.core already imports.
#   options    e.g. --steps 8 --seq_len 2048 --micro_batch_size 4 --peak_tflops 989
# Env: PYTHON (default python3), GPU_CHECK_OUT (default ./gpu_check_out: work dir + results).
#
# With vLLM importable, a colocate step runs first (bench/colocate_check.py: GRPO
# --vllm_mode colocate on a tiny model; skipped with a line saying so otherwise).
#
# Designed for the reference box (shared/PLATFORM.md): CUDA PyTorch, transformers, safetensors,
# peft, triton, numpy, pytest; no megatron-core/TE/flash-attn/vLLM and no package registry, so
# wheels are installed with `pip install --no-index --no-deps --target` into a private folder
# that goes on PYTHONPATH (the system site-packages are never modified). Exits 3 at once when
# torch sees no CUDA device.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-$PWD/gpu_check_out}

WHEELS=""
if [ $# -gt 0 ] && [ "$1" != "--" ] && [ "${1#-}" = "$1" ]; then
  WHEELS=$1
  shift
fi
[ $# -gt 0 ] && [ "$1" = "--" ] && shift
if [ -z "$WHEELS" ]; then
  for cand in "${MVLM_WHEELS:-}" "$PWD/.whl" "$ROOT/.whl" "$ROOT/scripts"; do
    if [ -n "$cand" ] && compgen -G "$cand/*.whl" >/dev/null; then
      WHEELS=$cand
      break
    fi
  done
fi

echo "== gpu_check: python $("$PY" -c 'import sys; print(sys.version.split()[0])'), mvlm at $ROOT"

# Fail fast and clearly without a GPU (before installing or building anything).
if ! "$PY" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.stderr.write(
        f"gpu_check: no CUDA device visible to torch {torch.__version__} "
        f"(CUDA build: {torch.version.cuda}); this check needs one H100/H200. Nothing was run.\n")
    sys.exit(3)
print(f"== gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}")
EOF
then
  exit 3
fi

mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# megatron-core from the wheels handed over, unless it already imports.
if ! "$PY" -c "import megatron.core" >/dev/null 2>&1; then
  if [ -z "$WHEELS" ]; then
    echo "gpu_check: megatron.core is not importable and no wheel folder was given or found" \
         "(pass WHEEL_DIR, set MVLM_WHEELS, or put the .whl files in ./.whl)" >&2
    exit 2
  fi
  SITE="$OUT/site"
  rm -rf "$SITE"
  WHLS=("$WHEELS"/*.whl)
  echo "== gpu_check: installing ${#WHLS[@]} wheel(s) from $WHEELS into $SITE"
  if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "${WHLS[@]}"
  else
    # No pip: a wheel is a zip laid out for site-packages, so unpacking it is the install.
    "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
      "$SITE" "${WHLS[@]}"
  fi
  export PYTHONPATH="$ROOT:$SITE${PYTHONPATH#"$ROOT"}"
  "$PY" -c "import megatron.core as m; print('== gpu_check: megatron-core', m.__version__)"
fi

cd "$OUT"
# Colocate step: GRPO --use_vllm true --vllm_mode colocate (vllm.LLM inside the trainer, sleep /
# wake, offload, weight sync read back) on a tiny model -- only where vLLM imports in this Python
# (it cannot run colocated on CPU, so CI tests it against a stand-in). Its result is printed
# before the table; a failure is reported but does not stop the rest of the check.
if "$PY" -c "import vllm" >/dev/null 2>&1; then
  echo "== gpu_check: colocate step (vLLM $("$PY" -c 'import vllm; print(vllm.__version__)'))"
  "$PY" "$ROOT/bench/colocate_check.py" --work_dir "$OUT/colocate" \
    || echo "== gpu_check: colocate step FAILED (logs in $OUT/colocate/*/run.log)"
else
  echo "== gpu_check: colocate step skipped: vLLM is not importable in $PY"
fi

# The driver prints the table last; everything else it logs comes before.
exec "$PY" "$ROOT/bench/gpu_check.py" --work_dir "$OUT/work" --out "$OUT/gpu_check_results.json" "$@"
