"""torchrun worker for test_objective_plugin: a new objective plugs into the Trainer unchanged.

``RefLogpObjective`` is what a preference or RL objective needs, written against the public
interface only (``mvlm.train.objectives.base``): a frozen reference model built in ``setup``
(``trainer.build_frozen_model``), a reference forward in ``prepare_step``
(``trainer.forward_only``) whose per-token log-probs are attached to each micro-batch, and an
extra metric reported from ``loss``. Its loss is SFT's, so its run must log exactly SFT's
numbers. Also checks ``token_logps`` (minus the vocab-parallel cross-entropy the model returns)
against ``log_softmax`` of the TP-gathered logits.

Spec (JSON, argv[1]): ``{"argv": [...], "out": DIR, "result": FILE}``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def _objective_class():
    from megatron.core import tensor_parallel

    from mvlm.train.objectives.base import token_logps
    from mvlm.train.objectives.sft import SFTObjective, local_loss_mask
    from mvlm.train.steps import model_forward, unwrap

    class RefLogpObjective(SFTObjective):
        name = "sft_with_ref_logp"
        metrics = ("lm_loss", "logp_minus_ref", "ref_logp")

        def setup(self, trainer) -> None:
            self.ref = trainer.build_frozen_model()
            self.vocab = trainer.bundle.hf_config.get_text_config().vocab_size
            self.max_logits_dlogp = 0.0

        def _ref_step(self, store: list):
            def step(data_iterator, model):
                batch = next(data_iterator)
                out = model_forward(model, batch)
                if not unwrap(model).post_process:
                    return out, None
                no_labels = {k: v for k, v in batch.items() if k != "labels"}
                logits = tensor_parallel.gather_from_tensor_model_parallel_region(
                    model_forward(model, no_labels))[..., :self.vocab].float()
                labels = batch["labels"]
                ref = torch.log_softmax(logits, -1).gather(
                    -1, labels.clamp(min=0)[..., None])[..., 0] * (labels >= 0)
                self.max_logits_dlogp = max(self.max_logits_dlogp,
                                            float((ref - token_logps(out)).abs().max()))
                store.append(token_logps(out).detach())

                def no_loss(o):
                    return o.sum() * 0, torch.tensor(1, dtype=torch.int), {}

                return out, no_loss

            return step

        def prepare_step(self, trainer, batches):
            store: list = []
            trainer.forward_only(self.ref.models, batches, self._ref_step(store))
            return [dict(b, ref_logps=r) for b, r in zip(batches, store, strict=True)]

        def loss(self, batch, output):
            loss_sum, n, reports = super().loss(batch, output)
            mask = local_loss_mask(batch)
            d = ((token_logps(output).float() - batch["ref_logps"].float()) * mask).sum()
            r = (batch["ref_logps"].float() * mask).sum()
            reports["logp_minus_ref"] = torch.stack([d.detach(), n.detach().float()])
            reports["ref_logp"] = torch.stack([r.detach(), n.detach().float()])
            return loss_sum, n, reports

    return RefLogpObjective


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    dist.init_process_group("gloo")
    from mvlm.train.args import parse_train_args
    from mvlm.train.trainer import train

    obj = _objective_class()()
    logs = {}
    for name, objective in (("sft", None), ("ref", obj)):
        out = Path(spec["out"]) / name
        train(parse_train_args(spec["argv"] + ["--output_dir", str(out)], "sft"), objective)
        dist.barrier()
        logs[name] = [json.loads(x) for x in (out / "logging.jsonl").read_text().splitlines()]
    t = torch.tensor([obj.max_logits_dlogp], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        Path(spec["result"]).write_text(json.dumps(
            {"logs": logs, "max_logits_dlogp": float(t)}))
        print("WORKER OK", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
