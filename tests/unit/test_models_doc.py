"""docs/models.md's family table equals the registry: a family added without its row, or a row
whose model_type, transformers class, media or experts column disagrees with the family, fails."""
from __future__ import annotations

from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "models.md"
HEADER = "| family | model_type | transformers class | media | LLM | experts (EP) | template |"


def family_rows(text: str) -> dict[str, list[str]]:
    """The cells of the supported-families table, keyed by family name."""
    lines = text.splitlines()
    start = lines.index(HEADER) + 2  # skip the header and the |---| line
    rows: dict[str, list[str]] = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


def test_family_table_matches_registry():
    from mvlm.models.registry import families
    from mvlm.testing.tiny_models import tiny_config

    rows = family_rows(DOC.read_text())
    specs = {s.name: s for s in families()}
    assert sorted(rows) == sorted(specs), "docs/models.md rows != registered families"
    for name, spec in specs.items():
        _, mtypes, cls, media, _, experts, _ = rows[name]
        assert mtypes.split(", ") == list(spec.model_types), name
        assert cls == spec.hf_model_class, name
        assert media == (", ".join(k.name for k in spec.media) or "text"), name
        arch = spec.text_arch(tiny_config(name))
        assert experts == ("yes" if arch.num_experts else "no"), name


def test_the_table_check_can_fail():
    text = DOC.read_text()
    rows = family_rows(text)
    name = sorted(rows)[0]
    dropped = "\n".join(x for x in text.splitlines() if not x.startswith(f"| {name} |"))
    assert name not in family_rows(dropped)
    with pytest.raises(ValueError):
        family_rows(text.replace(HEADER, "| renamed |"))
