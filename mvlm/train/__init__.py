"""Training: `mvlm pt` / `mvlm sft` (args, trainer loop, steps, checkpoints) and `mvlm export`.

Import the submodule you need; this package imports nothing on its own, so ``mvlm sft --help``
(which only needs :mod:`mvlm.train.args`) stays free of torch and Megatron-Core.
"""
