"""Evaluation during training: ``--eval-shards DIR [--eval-every N] [--eval-max-samples M]
[--save-best]``.

* **The set.** The ``--eval-shards`` folders (repeatable, each once: no weights), or the first
  ``M`` samples of them in dataset order (fixed for the whole run). They must be built like
  the training shards (:data:`mvtrain.batching.sources.COST_FIELDS`: profile, ``--max-res``,
  image-id form; the same one-line refusal as for mixed ``--shards``). Exact token lengths
  are counted and cached as for training.
* **The plan.** The usual planner (:func:`mvtrain.batching.schedule.epoch_plan`) plans the
  whole set once, as for one rank, under the run's planned budgets, with no sample or batch
  shuffle (a fixed seed keeps it deterministic). Its micro-batches are then *dealt*: costliest
  first, each to the rank with the least cost so far (ties: the lowest rank), so every rank
  computes the same deal and the ranks' work is balanced. A set with fewer micro-batches than
  ranks is planned one sample per micro-batch, so no rank is idle while there are at least
  as many samples as ranks. Samples over a budget on their own are not evaluated (counted).
* **One eval.** ``model.eval()`` under ``torch.no_grad()``, forward each of this rank's
  micro-batches through the engine (the training precision), sum the per-sample token losses
  and label counts per loss group (:func:`mvtrain.batching.sources.sample_group`, the same
  labels as training), then ONE all-gather of every rank's sums -- a rank with fewer (or no)
  micro-batches simply joins it; eval forwards hold no collective. The result is the global
  token-weighted loss, overall and per group. An out-of-memory error retries the micro-batch
  sample by sample; a sample that fails alone is left out and counted (``eval_oom_skipped``).
* **No effect on training.** Every RNG (Python, numpy, torch, CUDA) is saved before and
  restored after; every module's train/eval flag is restored as it was; the training loader,
  the live budgets, the engine's optimizer and accumulation state are not touched. A run with
  eval trains bit for bit as one without (CPU).
* **When.** At step 0 (a fresh run, not a resumed one), every ``--eval-every`` steps, and
  after the last step.
* **Best.** With ``--save-best`` each eval that beats the best loss so far (strictly lower)
  writes ``OUT/best/``: ``checkpoints/step-NNNNNN/`` (a full checkpoint, the layout of
  ``OUT/checkpoints``), ``hf/`` (the Hugging Face export, unless ``--no-export``) and
  ``best.json`` (step, eval loss, per-group losses). It is built in ``OUT/best.new/`` and
  swapped in, so a kill leaves the previous best whole; ``--resume`` keeps comparing against
  the saved ``best.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mvshards.cost import CostModel
from mvshards.index import load_index
from mvshards.storage import location
from mvtrain.batching.bucketer import Batch, make_batch
from mvtrain.batching.plan_index import PlanIndex
from mvtrain.batching.schedule import RankPlan, epoch_plan
from mvtrain.batching.sources import (
    ShardSource,
    SourceMismatchError,
    SourceMix,
    check_compatible,
    parse_sources,
)
from mvtrain.budgets import Budgets
from mvtrain.checkpoint import capture_rng, restore_rng, save_checkpoint, tag_for
from mvtrain.data.loader import MicroBatch, PlannedBatches, batch_iterator, make_micro_batch
from mvtrain.distributed import all_gather_rows, barrier
from mvtrain.oom import free_memory

log = logging.getLogger("mvtrain")

BEST_DIR = "best"
"""``OUT/best/``: the checkpoint, the export and ``best.json`` of the best eval loss."""
BEST_STAGING = "best.new"
BEST_FILE = "best.json"
_EVAL_SEED = 0
"""The planner's seed for the eval set: fixed, so every run plans the set alike."""


@dataclass(frozen=True)
class EvalResult:
    """One evaluation, summed over every rank."""

    step: int
    loss: float
    """Sum of token losses over the eval set / its label tokens (all ranks)."""
    loss_by_group: dict[str, float]
    """Each loss group's token-weighted mean loss (groups with label tokens)."""
    labels: int
    samples: int
    seconds: float
    oom_skipped: int = 0

    def record(self) -> dict[str, Any]:
        """The ``metrics.jsonl`` fields of this eval."""
        out: dict[str, Any] = {
            "eval_loss": self.loss,
            "eval_loss_by_channel": self.loss_by_group,
            "eval_tokens": self.labels,
            "eval_samples": self.samples,
            "eval_seconds": self.seconds,
        }
        if self.oom_skipped:
            out["eval_oom_skipped"] = self.oom_skipped
        return out


# --- the eval set and its plan ------------------------------------------------------------


def eval_sources(value: Any) -> list[ShardSource]:
    """The ``--eval-shards`` folders; a weight is refused (every eval sample counts once)."""
    sources = parse_sources(value)
    for source in sources:
        if source.weight != 1:
            raise ValueError(
                f"--eval-shards {source}: eval folders take no weight (each sample counts once)"
            )
    return sources


def check_eval_shards(shards: Any, eval_shards: Any) -> None:
    """Refuse (one line, :class:`SourceMismatchError`) an eval folder built unlike the
    training shards in a :data:`mvtrain.batching.sources.COST_FIELDS` parameter, and one
    without a build."""
    first = parse_sources(shards)[0].path
    for source in eval_sources(eval_shards):
        if not (Path(source.path) / "manifest.json").exists():
            raise ValueError(
                f"--eval-shards {source.path} has no manifest.json: build it with "
                f"`mvprep build ... --out {source.path}`"
            )
        params = [_build_params(first), _build_params(source.path)]
        try:
            check_compatible([first, source.path], params)
        except SourceMismatchError as exc:
            raise SourceMismatchError(f"--eval-shards {source.path}: {exc}") from None


def _build_params(folder: Path) -> dict[str, Any]:
    """The build parameters in ``folder/manifest.json``."""
    folder = location(folder)  # the training shards may be a URL
    return dict(json.loads((folder / "manifest.json").read_text()).get("params", {}))


def head(index: PlanIndex, count: int | None) -> PlanIndex:
    """The first ``count`` rows of ``index`` in dataset order (all of them for None)."""
    if count is None or count >= len(index):
        return index
    return replace(
        index,
        keys=index.keys[:count],
        shard_ids=index.shard_ids[:count],
        tokens=index.tokens[:count],
        patches=index.patches[:count],
        slices=index.slices[:count],
        max_patches_per_slice=index.max_patches_per_slice[:count],
    )


@dataclass(frozen=True)
class EvalPlan:
    """The eval set's micro-batches dealt over the ranks."""

    per_rank: tuple[tuple[Batch, ...], ...]
    """Rank ``r``'s micro-batches, in plan order."""
    samples: int
    """Samples evaluated (all ranks)."""
    oversize: int
    """Samples over a budget on their own: not evaluated."""


def plan_eval(
    index: PlanIndex, world_size: int, budgets: Budgets, cost_model: CostModel
) -> EvalPlan:
    """Plan ``index`` once with the training planner (no shuffle) and deal its micro-batches
    over ``world_size`` ranks: costliest first, each to the least-loaded rank. With fewer
    micro-batches than ranks, one sample per micro-batch."""
    plan = epoch_plan(
        index,
        _EVAL_SEED,
        0,
        0,
        1,
        budgets,
        cost_model,
        shuffle_buffer=1,
        batch_shuffle_window=1,
    )
    batches = list(plan.batches)
    if len(batches) < world_size:
        batches = [
            make_batch([sample], budgets, cost_model, b.bucket, b.reason)
            for b in batches
            for sample in b.samples
        ]
    load = [0.0] * world_size
    mine: list[list[tuple[int, Batch]]] = [[] for _ in range(world_size)]
    order = sorted(range(len(batches)), key=lambda i: (-batches[i].cost, i))
    for i in order:
        rank = min(range(world_size), key=lambda r: (load[r], r))
        load[rank] += batches[i].cost
        mine[rank].append((i, batches[i]))
    return EvalPlan(
        per_rank=tuple(tuple(b for _, b in sorted(found)) for found in mine),
        samples=sum(b.num_samples for b in batches),
        oversize=len(plan.oversize),
    )


# --- running an eval ----------------------------------------------------------------------


@dataclass
class Evaluator:
    """Runs the eval set on this rank's share and sums over ranks; keeps the best."""

    session: Any
    """The run's :class:`mvtrain.session.Session`."""
    mix: SourceMix
    plan: EvalPlan
    every: int | None
    best: BestKeeper | None = None
    results: list[EvalResult] = field(default_factory=list)

    @property
    def groups(self) -> tuple[str, ...]:
        return self.mix.groups

    def due(self, step: int, total_steps: int) -> bool:
        """Whether an eval follows optimizer step ``step`` (every N steps, and the last)."""
        return step == total_steps or bool(self.every and step % self.every == 0)

    def run(self, step: int) -> EvalResult:
        """Evaluate the model as it is after ``step`` steps; training state untouched."""
        session = self.session
        started = time.perf_counter()
        rng = capture_rng()
        module = session.engine.module
        modes = [(m, m.training) for m in module.modules()]
        module.eval()
        try:
            with torch.no_grad():
                sums = self._local_sums()
        finally:
            for m, training in modes:
                m.training = training
            restore_rng(rng)
        result = self._gather(step, sums, time.perf_counter() - started)
        self.results.append(result)
        if session.info.is_main:
            log.info(
                "eval at step %d: loss %.4f over %d label tokens (%s)",
                step,
                result.loss,
                result.labels,
                ", ".join(f"{g} {v:.4f}" for g, v in result.loss_by_group.items()),
            )
        if self.best is not None:
            self.best.offer(result, session)
        return result

    def _batches(self) -> Iterator[MicroBatch]:
        session = self.session
        mine = self.plan.per_rank[session.info.rank]
        plan = RankPlan(
            seed=_EVAL_SEED,
            epoch=0,
            rank=session.info.rank,
            world_size=session.info.world_size,
            budgets=session.config.budgets,
            cost_model=CostModel.for_profile(session.profile),
            shards=(),
            batches=mine,
            oversize=(),
        )
        dataset = PlannedBatches(
            plan,
            0,
            len(mine),
            self.mix.locator,
            session.tokenizer,
            session.profile,
            session.adapter,
        )
        return batch_iterator(dataset, session.workers, pin_memory=session.device.type == "cuda")

    def _local_sums(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This rank's per-group loss sums and label counts (float64, on the device) and
        the samples an out-of-memory error left out."""
        device = self.session.device
        size = len(self.groups)
        loss = torch.zeros(size, dtype=torch.float64, device=device)
        labels = torch.zeros(size, dtype=torch.float64, device=device)
        skipped = 0
        for batch in self._batches():
            for piece in self._fitting(batch):
                if piece is None:
                    skipped += 1
                    continue
                rows_loss, rows_count, sources = piece
                index = torch.tensor([self._position(g) for g in sources], device=device)
                loss.index_add_(0, index, rows_loss.to(device, torch.float64))
                labels.index_add_(0, index, rows_count.to(device, torch.float64))
        return loss, labels, skipped

    def _position(self, group: str) -> int:
        try:
            return self.groups.index(group)
        except ValueError:
            raise ValueError(
                f"eval sample group {group!r} is not one of the eval set's loss groups "
                f"{list(self.groups)}"
            ) from None

    def _forward(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        from mvtrain.model.pixel_input import model_inputs

        session = self.session
        inputs = model_inputs(batch.host_inputs, session.device)
        rows = session.adapter.forward_loss(session.engine, inputs)
        return rows.row_loss.detach(), rows.row_count.detach(), list(batch.sources)

    def _fitting(
        self, batch: MicroBatch
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]] | None]:
        """The batch's per-row sums; after an out-of-memory error, each sample's alone
        (None for a sample that fails alone)."""
        try:
            result = self._forward(batch)
        except torch.OutOfMemoryError:
            result = None
            free_memory()
        if result is not None:
            yield result
            return
        adapter = self.session.adapter
        for sample in batch.samples:
            alone = make_micro_batch(batch.position, [sample], 1.0, adapter)
            try:
                yield self._forward(alone)
            except torch.OutOfMemoryError:
                free_memory()
                log.warning("eval: sample %s is out of memory even alone; left out", sample.id)
                yield None

    def _gather(
        self, step: int, sums: tuple[torch.Tensor, torch.Tensor, int], seconds: float
    ) -> EvalResult:
        """The one collective of an eval: every rank's sums, read on the host."""
        loss, labels, skipped = sums
        rows = all_gather_rows(
            [float(skipped), *loss.unbind(), *labels.unbind()], self.session.device
        )
        size = len(self.groups)
        total_loss = [sum(row[1 + g] for row in rows) for g in range(size)]
        total_labels = [sum(row[1 + size + g] for row in rows) for g in range(size)]
        count = sum(total_labels)
        oom_skipped = int(sum(row[0] for row in rows))
        return EvalResult(
            step=step,
            loss=sum(total_loss) / count if count else float("nan"),
            loss_by_group={
                g: total_loss[i] / total_labels[i]
                for i, g in enumerate(self.groups)
                if total_labels[i]
            },
            labels=int(count),
            samples=self.plan.samples - oom_skipped,
            seconds=seconds,
            oom_skipped=oom_skipped,
        )


def setup_eval(session: Any) -> Evaluator | None:
    """The run's evaluator (None without ``--eval-shards`` or in a dry run): the eval
    folders checked against the training shards, their exact lengths, the dealt plan."""
    from mvtrain.session import _exact_lengths, _plan_index

    config = session.config
    if not config.eval_shards:
        return None
    if session.engine is None:
        log.warning("--dry-run: no evaluation")
        return None
    sources = eval_sources(config.eval_shards)
    check_eval_shards(config.shards, sources)
    indexes = [load_index(Path(s.path)) for s in sources]
    for index in indexes:
        index.check_shard_files()
    lengths = [
        _exact_lengths(config, ix, session.tokenizer, session.profile, session.info, session.faults)
        for ix in indexes
    ]
    mix = SourceMix.build(
        sources, indexes, [_plan_index(ix, n) for ix, n in zip(indexes, lengths, strict=True)]
    )
    plan = plan_eval(
        head(mix.index, config.eval_max_samples),
        session.info.world_size,
        config.budgets,
        CostModel.for_profile(session.profile),
    )
    if session.info.is_main:
        counts = [len(b) for b in plan.per_rank]
        log.info(
            "eval set: %d samples in %d micro-batches (per rank %s)%s",
            plan.samples,
            sum(counts),
            counts,
            f"; {plan.oversize} over the budgets left out" if plan.oversize else "",
        )
    if plan.samples == 0:
        raise ValueError(
            "--eval-shards: no eval sample fits the budgets (or the folders are empty)"
        )
    best = BestKeeper.load(session.output, config.resume) if config.save_best else None
    return Evaluator(session, mix, plan, config.eval_every, best)


# --- the best checkpoint ------------------------------------------------------------------


@dataclass
class BestKeeper:
    """``--save-best``: ``OUT/best/`` holds the checkpoint and export of the lowest eval loss."""

    output: Path
    loss: float = float("inf")
    step: int | None = None

    @classmethod
    def load(cls, output: Path, resume: bool) -> BestKeeper:
        """The best so far: ``OUT/best/best.json`` when resuming, else none yet."""
        keeper = cls(Path(output))
        saved = Path(output) / BEST_DIR / BEST_FILE
        if resume and saved.exists():
            record = json.loads(saved.read_text())
            keeper.loss, keeper.step = float(record["eval_loss"]), int(record["step"])
        return keeper

    def offer(self, result: EvalResult, session: Any) -> bool:
        """Save ``result``'s model as the best when its loss is lower (every rank calls)."""
        if not np.isfinite(result.loss) or result.loss >= self.loss:
            return False
        self.loss, self.step = result.loss, result.step
        engine, state, info = session.engine, session.state, session.info
        staging, final = self.output / BEST_STAGING, self.output / BEST_DIR
        if info.is_main and staging.exists():
            shutil.rmtree(staging)
        barrier()
        save_checkpoint(staging, engine, state, info)
        if info.is_main:
            hf = None
            if session.config.export:
                from mvtrain.export import export_hf

                export_hf(engine.module, session.tokenizer, staging / "hf", keep_model=True)
                hf = "hf"
            record = {
                "step": result.step,
                "eval_loss": result.loss,
                "eval_loss_by_channel": result.loss_by_group,
                "checkpoint": f"checkpoints/{tag_for(state.step)}",
                "hf": hf,
            }
            (staging / BEST_FILE).write_text(json.dumps(record, indent=1) + "\n")
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
            log.info("best eval loss %.4f at step %d: saved in %s", result.loss, result.step, final)
        barrier()
        return True
