# mvlm on the NGC PyTorch image: CUDA, NCCL, PyTorch, Transformer Engine, apex and flash-attn come
# from the base image (built together by NVIDIA); mvlm adds megatron-core, its Python dependencies
# and the GPU extras at the versions setup.py pins (tests/unit/test_dockerfile.py checks they match).
#
#   docker build -t mvlm .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 -v /data:/data mvlm \
#       sft --model /data/Qwen2.5-VL-7B-Instruct --dataset /data/train.jsonl --output_dir /data/out
#   multi-GPU: docker run ... --entrypoint torchrun mvlm --nproc-per-node 8 -m mvlm sft ...
#
# torch/torchvision are NOT reinstalled: setup.py pins the CPU-CI versions, the image's own CUDA
# build is what TE/apex/flash-attn are compiled against. mvlm is installed with --no-deps and its
# other requirements listed here explicitly.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.10-py3
FROM ${BASE_IMAGE}

# ---- pins: must equal setup.py (install_requires and extras_require["gpu"]) -------------------
ARG MEGATRON_CORE_VERSION=0.19.2
ARG TRANSFORMER_ENGINE_VERSION=2.20.0
ARG FLASH_ATTN_VERSION=2.8.3
ARG VLLM_VERSION=0.33.0
ARG DALI_VERSION=2.4.0
# 1: install vLLM into its own venv /opt/vllm (it pins its own torch; kept apart from the image's)
ARG WITH_VLLM=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV CUDA_DEVICE_MAX_CONNECTIONS=1 \
    NCCL_ASYNC_ERROR_HANDLING=1 \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1 \
    PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT=110 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_DISABLE_TELEMETRY=1

WORKDIR /workspace/mvlm

# Python dependencies first (cached layer): the same pins as setup.py's install_requires, minus
# torch/torchvision (from the image).
RUN pip install --no-cache-dir \
        "megatron-core==${MEGATRON_CORE_VERSION}" \
        "transformers==5.24.0" \
        "tokenizers>=0.22" \
        "safetensors>=0.6" \
        "datasets>=4.0" \
        "pyarrow>=18" \
        "pillow>=10" \
        "psutil>=5.9" \
        "pyyaml>=6" \
        "numpy>=1.26" \
        "einops>=0.8" \
        "tqdm>=4.66" \
        "tensorboard>=2.18" \
        "av>=14" \
        "peft>=0.20" \
        "math-verify==0.9.0" \
        "nvidia-dali-cuda130==${DALI_VERSION}"

# Transformer Engine and flash-attn: keep the image's build when it is the pinned version, else
# build the pinned one against the image's torch (slow, but the versions then match setup.py).
RUN python -c "import transformer_engine as te, sys; sys.exit(te.__version__.split('+')[0] != '${TRANSFORMER_ENGINE_VERSION}')" \
    || pip install --no-cache-dir --no-build-isolation "transformer-engine[pytorch]==${TRANSFORMER_ENGINE_VERSION}"
RUN python -c "import flash_attn, sys; sys.exit(flash_attn.__version__ != '${FLASH_ATTN_VERSION}')" \
    || MAX_JOBS=8 pip install --no-cache-dir --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"

# vLLM in its own venv (rollout server for RL; `--vllm_mode server` launches /opt/vllm/bin/vllm).
RUN if [ "${WITH_VLLM}" = 1 ]; then \
        python -m venv /opt/vllm \
        && /opt/vllm/bin/pip install --no-cache-dir "vllm==${VLLM_VERSION}"; \
    fi

COPY . /workspace/mvlm
RUN pip install --no-cache-dir --no-deps -e /workspace/mvlm \
    && python -c "import mvlm, megatron.core, transformer_engine; print('mvlm', mvlm.__file__)"

ENTRYPOINT ["mvlm"]
CMD ["--help"]
