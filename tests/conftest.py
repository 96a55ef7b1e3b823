"""Session-wide fixtures. Tiny checkpoints are built once per session and reused read-only."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """tiny_ckpt(family, variant="default", **overrides) -> Path, cached per argument set."""
    from mvlm.testing.tiny_models import build_tiny_checkpoint

    cache: dict = {}

    def get(family: str, variant: str = "default", **overrides) -> Path:
        key = (family, variant, tuple(sorted(overrides.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"{family}_{variant}")
            cache[key] = build_tiny_checkpoint(family, d / "hf", variant=variant, **overrides)
        return cache[key]

    return get
