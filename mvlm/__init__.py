"""mvlm: Megatron-Core based 3D-parallel training for vision-language models."""

__version__ = "0.1.0"
