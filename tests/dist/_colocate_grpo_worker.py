"""Worker for tests/dist/test_colocate_sync.py::test_grpo_colocate_through_trainer (one
plain process, CPU, fp32): `mvlm rlhf --rlhf_type grpo --use_vllm true --vllm_mode colocate
--sleep_level 1 --offload_model true --check_weight_sync true` through the real command line and
Trainer, with the colocated engine replaced where vLLM cannot run on CPU: the ``vllm.LLM`` by the
stand-in of tests/fake_vllm.py (sleep / wake calls are logged), and the engine body that runs
inside it by the transformers model of tests/e2e/_hf_rollout_server.py (``HFPool``: loads the
synced tensors, samples, returns full-vocabulary log-probs), so the trainer's mismatch metric
shows whether the engine holds the current policy at every rollout.

    python _colocate_grpo_worker.py SPEC_JSON   (spec: argv, events_out)
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "e2e")]


def main() -> int:
    from _hf_rollout_server import HFPool
    from fake_vllm import FakeLLM

    from mvlm.rl import grpo_cli
    from mvlm.rl.rollout import colocate

    logging.basicConfig(level=logging.INFO)  # as `mvlm` sets it up (the sync lines are INFO)
    spec = json.loads(Path(sys.argv[1]).read_text())
    events: list = []
    colocate.colocate_unavailable = lambda: None  # CPU: the stand-ins below take vLLM's place
    colocate.build_llm = lambda cfg, model_dir, dtype: FakeLLM(model_dir, events=events)
    pools: list = []
    colocate._InProcess = lambda llm: pools.append(HFPool(str(llm.hf_dir))) or pools[-1]
    rc = grpo_cli.run_grpo(spec["argv"])
    # how far the engine's weights moved from the checkpoint (the syncs carried training)
    start = FakeLLM(pools[0].model.name_or_path).weights
    moved = max(float((p.detach() - start[n]).abs().max())
                for n, p in pools[0].model.named_parameters() if n in start)
    Path(spec["events_out"]).write_text(json.dumps({"events": events, "moved": moved}))
    return rc


if __name__ == "__main__":
    sys.exit(main())
