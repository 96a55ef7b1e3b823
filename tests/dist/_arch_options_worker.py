"""torchrun worker of test_text_arch_options_tp: registers the test-only families
(tests/arch_families.py) on every rank, runs ONE ``mvlm convert`` (its argv from the spec; a
second conversion in the same process group cannot re-create its gloo groups), and rank 0 writes
the --verify results."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: arch_families


def main(spec_path: str) -> None:
    import arch_families
    import torch.distributed as dist

    from mvlm.convert import verify
    from mvlm.convert.command import add_convert_args, run_convert

    logging.basicConfig(level=logging.WARNING)
    spec = json.loads(Path(spec_path).read_text())
    arch_families.register()
    seen: list = []
    orig = verify.verify_against_hf

    def spy(*a, **k):
        r = orig(*a, **k)
        seen.extend(r)
        return r

    verify.verify_against_hf = spy

    def convert(argv: list[str]) -> None:
        p = argparse.ArgumentParser()
        add_convert_args(p)
        run_convert(p.parse_args(argv))

    convert(spec["argv"])
    res = [{"name": r.name, "dlogits": r.max_abs_logits, "loss": [r.loss_mcore, r.loss_hf]}
           for r in seen]
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(spec["out"]).write_text(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1])
