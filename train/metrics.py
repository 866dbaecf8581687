"""What a run reports: the per-micro-batch JSON log, efficiency totals, TensorBoard scalars."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mvtrain.batching.sources import split_group_losses
from mvtrain.data.loader import MicroBatch


class BatchLog:
    """``--batch-log FILE``: one JSON line per micro-batch, appended with one ``write`` each
    (O_APPEND), so several ranks can share the file without interleaving lines."""

    def __init__(self, path: Path | None) -> None:
        self._fd = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    @property
    def enabled(self) -> bool:
        return self._fd is not None

    def write(
        self, rank: int, step: int, micro: int, batch: MicroBatch, loss: float | None
    ) -> None:
        if self._fd is None:
            return
        line = {
            "rank": rank,
            "step": step,
            "micro": micro,
            "keys": batch.keys,
            "sources": batch.sources,
            "num_samples": len(batch.keys),
            "max_len": batch.max_len,
            "real_tokens": batch.real_tokens,
            "padded_tokens": batch.padded_tokens,
            "real_patches": batch.real_patches,
            "padded_patches": batch.padded_patches,
            "weight": batch.weight,
            "loss": loss,
        }
        os.write(self._fd, (json.dumps(line, separators=(",", ":")) + "\n").encode())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class Efficiency:
    """Running totals of real vs padded cost over the real (weight > 0) micro-batches."""

    token_budget: int
    patch_budget: int
    real_tokens: int = 0
    padded_tokens: int = 0
    real_patches: int = 0
    padded_patches: int = 0
    batches: int = 0

    def add(self, batch: MicroBatch) -> None:
        if batch.weight == 0:
            return
        self.batches += 1
        self.real_tokens += batch.real_tokens
        self.padded_tokens += batch.padded_tokens
        self.real_patches += batch.real_patches
        self.padded_patches += batch.padded_patches

    def report(self) -> dict[str, float]:
        n = max(self.batches, 1)
        return {
            "token_efficiency": self.real_tokens / max(self.padded_tokens, 1),
            "patch_efficiency": self.real_patches / max(self.padded_patches, 1)
            if self.padded_patches
            else 1.0,
            "token_budget_utilisation": self.padded_tokens / n / self.token_budget,
            "patch_budget_utilisation": self.padded_patches / n / self.patch_budget,
            "micro_batches": self.batches,
        }


class Scalars:
    """TensorBoard scalars on rank 0 (a no-op when TensorBoard is missing or disabled)."""

    def __init__(self, folder: Path | None) -> None:
        self._writer: Any = None
        if folder is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self._writer = SummaryWriter(log_dir=str(folder))

    def log(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class StepReporter:
    """What every optimizer step reports: a ``metrics.jsonl`` row and TensorBoard scalars
    (rank 0), the progress bar, the batch log and the efficiency totals."""

    def __init__(
        self,
        output: Path,
        is_main: bool,
        efficiency: Efficiency,
        batch_log: BatchLog,
        total_steps: int,
        first_step: int,
        progress: bool,
        tensorboard: bool,
    ) -> None:
        self.is_main, self.efficiency, self.batch_log = is_main, efficiency, batch_log
        self.metrics_file = Path(output) / "metrics.jsonl"
        self.scalars = Scalars(Path(output) / "tensorboard" if is_main and tensorboard else None)
        self.bar = tqdm(
            total=total_steps,
            initial=first_step,
            desc="mvtrain",
            unit="step",
            disable=not (progress and is_main),
            dynamic_ncols=True,
        )

    def efficiency_add(self, window: list[MicroBatch]) -> None:
        for batch in window:
            self.efficiency.add(batch)

    def dry_window(self, rank: int, step: int, window: list[MicroBatch]) -> None:
        for micro, batch in enumerate(window):
            self.batch_log.write(rank, step, micro, batch, None)

    def step_done(
        self,
        step: int,
        epoch: int,
        loss: float | None,
        tokens: float,
        elapsed: float,
        lr: float | None,
        loss_by_source: dict[str, float] | None = None,
        evaluation: dict[str, Any] | None = None,
        memory: dict[str, int] | None = None,
    ) -> None:
        """One ``metrics.jsonl`` row (rank 0): ``loss_by_source`` is each loss group's
        token-weighted mean loss over the step's window on all ranks (groups without label
        tokens in it left out), written as ``loss_by_channel`` (the channels) and
        ``loss_by_source`` (folders, for samples without a channel), and to TensorBoard as
        ``loss/GROUP`` (:func:`mvtrain.batching.sources.split_group_losses`);
        ``evaluation``: the fields of an eval run after this step
        (:meth:`mvtrain.evaluation.EvalResult.record`), in the same row; ``memory``: the
        step's peaks taken before that eval (:meth:`peak_memory`; None: read now)."""
        record: dict[str, Any] = {
            "step": step,
            "epoch": epoch,
            "tokens_per_s": tokens / max(elapsed, 1e-9),
            **self.efficiency.report(),
        }
        if loss is not None:
            record["loss"] = loss
        record.update(split_group_losses(loss_by_source or {}))
        if lr is not None:
            record["lr"] = lr
        record.update(self.peak_memory() if memory is None else memory)
        record.update(evaluation or {})
        if self.is_main:
            self._write(step, record)
            self.scalars.log(step, {f"loss/{k}": v for k, v in (loss_by_source or {}).items()})
            self.bar.set_postfix_str(
                f"loss {loss:.4f}" if loss is not None else "dry run", refresh=False
            )
        self.bar.update(1)

    @staticmethod
    def peak_memory() -> dict[str, int]:
        """The CUDA memory peaks since the step began (nothing on CPU)."""
        if not torch.cuda.is_available():
            return {}
        return {
            "max_memory_allocated": torch.cuda.max_memory_allocated(),
            "max_memory_reserved": torch.cuda.max_memory_reserved(),
        }

    def eval_done(self, step: int, evaluation: dict[str, Any]) -> None:
        """A ``metrics.jsonl`` row of an eval alone (step 0, before any training step)."""
        if self.is_main:
            self._write(step, {"step": step, **evaluation})

    def _write(self, step: int, record: dict[str, Any]) -> None:
        """Append ``record`` to ``metrics.jsonl`` and its numbers to TensorBoard: every float
        field, and each group's eval loss as ``eval_loss/GROUP``."""
        with open(self.metrics_file, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, float)}
        by_group = record.get("eval_loss_by_channel") or {}
        scalars.update({f"eval_loss/{k}": v for k, v in by_group.items()})
        self.scalars.log(step, scalars)

    def close(self) -> None:
        self.bar.close()
        self.batch_log.close()
        self.scalars.close()
