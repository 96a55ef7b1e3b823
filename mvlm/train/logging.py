"""Rank-0 training logs: progress bar, ``logging.jsonl``, tensorboard, wandb (when asked).

``<output_dir>/logging.jsonl`` gets one JSON object per logged step with at least ``step``,
``loss``, ``lr``, ``grad_norm``, ``consumed_samples`` and ``tokens_per_sec`` (eval lines carry
``eval_loss`` instead of ``loss``). The final step's record also carries
``bad_samples_skipped`` (and ``bad_samples_by_reason`` when rows were skipped): see
:func:`bad_samples_fields`. On resume, lines after the resumed step are dropped first, so the
file of an interrupted-and-resumed run equals the uninterrupted run's, line for line.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("mvlm.train")

# Fields that legitimately differ between runs (wall-clock), excluded from determinism checks.
TIMING_FIELDS = ("tokens_per_sec", "elapsed_s", "eta_s", "step_time_s")


class TrainLogger:
    """Everything user-visible about progress. All methods are no-ops off rank 0."""

    def __init__(self, output_dir: Path, total_steps: int, start_step: int, rank: int,
                 report_to: list[str], run_name: str | None = None, project: str = "mvlm",
                 tb_dir: str | Path | None = None,
                 config: dict[str, Any] | None = None, disable_bar: bool = False):
        self.rank = rank
        self.total = total_steps
        self.path = Path(output_dir) / "logging.jsonl"
        self.t0 = time.time()
        self.start_step = start_step
        self.tb = None
        self.wandb = None
        self.bar = None
        if rank != 0:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        truncate_after(self.path, start_step)
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tb_dir or Path(output_dir) / "runs"))
            except ImportError:
                log.warning("--report_to tensorboard: tensorboard is not installed "
                            "(pip install tensorboard); skipping")
        if "wandb" in report_to:
            try:
                import wandb

                self.wandb = wandb.init(project=project, name=run_name, config=config or {},
                                        dir=str(output_dir), resume="allow")
            except ImportError:
                log.warning("--report_to wandb: wandb is not installed (pip install wandb); "
                            "skipping")
        if not disable_bar:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total_steps, initial=start_step, desc="train",
                                dynamic_ncols=True, mininterval=0.5)
            except ImportError:
                self.bar = None

    def log(self, rec: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        step = rec["step"]
        done = max(1, step - self.start_step)
        elapsed = time.time() - self.t0
        rec.setdefault("elapsed_s", round(elapsed, 3))
        rec.setdefault("eta_s", round(elapsed / done * (self.total - step), 1))
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        scalars = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(("eval/" if k.startswith("eval") else "train/") + k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.bar is not None and "loss" in rec:
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                                 gnorm=f"{rec.get('grad_norm') or 0:.3f}",
                                 tok_s=f"{rec.get('tokens_per_sec', 0):.0f}", refresh=False)
        elif self.bar is None and "loss" in rec:
            log.info("step %d/%d loss %.5f lr %.3e grad_norm %s tokens/s %.0f", step, self.total,
                     rec["loss"], rec["lr"], rec.get("grad_norm"), rec.get("tokens_per_sec", 0))
        if "eval_loss" in rec:
            log.info("step %d eval_loss %.5f", step, rec["eval_loss"])

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def bad_samples_fields(counter: Any) -> dict[str, Any]:
    """What the final step's record says about skipped rows (issue 16): the total of a
    :class:`mvlm.data.errors.BadSampleCounter` (encode time and loader workers) and its count
    per reason, so a run that dropped data says so in the log it leaves, not only in warnings."""
    counts = dict(sorted(counter.counts.items()))
    return {"bad_samples_skipped": sum(counts.values()),
            **({"bad_samples_by_reason": counts} if counts else {})}


def truncate_after(path: Path, step: int) -> None:
    """Keep only records with ``step <= step`` (a resumed run re-logs what came after)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            if int(json.loads(line).get("step", 0)) <= step:
                keep.append(line)
        except (ValueError, json.JSONDecodeError):
            continue
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(x + "\n" for x in keep))
    tmp.replace(path)


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
