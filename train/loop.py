"""``mvtrain run`` as a library call: set up, train steps, finish.

Read it top to bottom: :func:`run` calls :func:`mvtrain.session.setup` (process group,
model, exact lengths, the epochs' plans, engine, resume, ``run.json``), then
:func:`_train_steps`, whose :func:`_train_step` runs one optimizer step over ``grad_accum``
planned micro-batches (:class:`mvtrain.step.WindowRunner`), reports it and checkpoints when
due, then :func:`_finish` (last checkpoint, digests, export). With ``--eval-shards`` an
evaluation (:mod:`mvtrain.evaluation`) runs at step 0, after every ``--eval-every`` steps and
after the last step; it leaves training as it was (RNG, train mode, loader, budgets).

The loss of a step is the sum of token losses over its micro-batches on every rank divided
by the global count of label tokens (all ranks, the whole window) -- not a mean of per-batch
means -- so every label token weighs the same however the budgets cut the batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mvtrain.checkpoint import (
    TrainState,
    newest_checkpoint,
    save_checkpoint,
    tag_for,
)
from mvtrain.data.loader import MicroBatch, PlannedBatches, batch_iterator
from mvtrain.distributed import (
    all_reduce_sum,
    barrier,
)
from mvtrain.evaluation import EvalResult, Evaluator, setup_eval
from mvtrain.metrics import BatchLog, Efficiency, StepReporter
from mvtrain.oom import RESTART_FILE
from mvtrain.run_config import RunConfig
from mvtrain.session import Session, setup
from mvtrain.step import WindowRunner

log = logging.getLogger("mvtrain")

SKIPPED_FILE = "skipped.jsonl"
"""In the output folder: every sample skipped for being over a budget, per epoch."""


@dataclass
class RunResult:
    steps_done: int
    losses: dict[int, float] = field(default_factory=dict)
    efficiency: dict[str, float] = field(default_factory=dict)
    oversize: int = 0
    """Samples skipped for being over a budget on their own, summed over the epochs."""
    skipped_per_epoch: list[int] = field(default_factory=list)
    skipped_examples: list[str] = field(default_factory=list)
    """The first few skipped samples: key and costs alone."""
    length_mismatches: int = 0
    output: Path | None = None
    sources: list[dict[str, Any]] = field(default_factory=list)
    """Per ``--shards`` folder: name, weight, samples per epoch (as ``run.json``)."""
    group_loss: dict[str, float] = field(default_factory=dict)
    """Per loss group: token losses summed over the steps this process ran (all ranks)."""
    group_labels: dict[str, int] = field(default_factory=dict)
    """Per loss group: label tokens over the steps this process ran (all ranks)."""
    evals: list[EvalResult] = field(default_factory=list)
    """Every evaluation this process ran (``--eval-shards``), in order."""
    best: dict[str, Any] | None = None
    """``--save-best``: the step and eval loss ``OUT/best/`` holds."""

    @property
    def loss_by_source(self) -> dict[str, float]:
        """Each loss group's token-weighted mean loss over the steps this process ran."""
        return {g: self.group_loss[g] / n for g, n in self.group_labels.items() if n}


def run(config: RunConfig) -> RunResult:
    """Set up, train every planned step (from the checkpoint when resuming), finish."""
    session = setup(config)
    result = RunResult(
        steps_done=session.state.step, output=session.output, sources=session.mix.describe()
    )
    _report_skipped(session, result)
    config = session.config
    reporter = StepReporter(
        output=session.output,
        is_main=session.info.is_main,
        efficiency=Efficiency(config.token_budget, config.patch_budget),
        batch_log=BatchLog(config.batch_log),
        total_steps=sum(session.epochs.steps),
        first_step=session.state.step,
        progress=config.progress,
        tensorboard=config.tensorboard,
    )
    evaluator: Evaluator | None = None
    try:
        evaluator = setup_eval(session)
        if evaluator is not None and session.state.step == 0:
            reporter.eval_done(0, evaluator.run(0).record())
        _train_steps(session, reporter, result, evaluator)
        _finish(session)
    finally:
        reporter.close()
    if evaluator is not None:
        result.evals = evaluator.results
        keeper = evaluator.best
        if keeper is not None and keeper.step is not None:
            result.best = {"step": keeper.step, "eval_loss": keeper.loss}
    result.steps_done = session.state.step
    result.efficiency = reporter.efficiency.report()
    return result


def _report_skipped(session: Session, result: RunResult) -> None:
    """Count the over-budget samples per epoch (all ranks) and list each in
    ``OUT/skipped.jsonl`` (rank 0)."""
    epochs = session.epochs
    result.skipped_per_epoch = [len(epochs.skipped[e]) for e in sorted(epochs.skipped)]
    result.oversize = sum(result.skipped_per_epoch)
    rows = epochs.skipped_rows()
    result.skipped_examples = [
        f"{r['key']} ({r['padded_tokens']} tokens, {r['padded_patches']} patches alone)"
        for r in rows[:3]
    ]
    path = session.output / SKIPPED_FILE
    if session.info.is_main and rows:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# --- training steps ----------------------------------------------------------------------


def _train_steps(
    session: Session, reporter: StepReporter, result: RunResult, evaluator: Evaluator | None
) -> None:
    """Optimizer steps from ``session.state.step`` to the end of the last planned epoch."""
    config, state = session.config, session.state
    runner = _window_runner(session, reporter.batch_log)
    total_steps = sum(session.epochs.steps)
    while state.step < total_steps:
        epoch, in_epoch = session.epochs.locate(state.step)
        stream = _micro_batches(session, epoch, in_epoch)
        for _ in range(in_epoch, session.epochs.steps[epoch]):
            window = [next(stream) for _ in range(config.grad_accum)]
            _train_step(session, runner, reporter, result, window, epoch, evaluator)


def _window_runner(session: Session, batch_log: BatchLog) -> WindowRunner:
    config, state, output = session.config, session.state, session.output
    return WindowRunner(
        session.engine,
        session.adapter,
        session.info,
        session.device,
        batch_log,
        on_event=lambda event: _record_event(output, state, event),
        restart_file=output / RESTART_FILE,
        faults=session.faults,
        planned_budgets=config.budgets,
        groups=session.mix.groups,
    )


def _micro_batches(session: Session, epoch: int, in_epoch: int) -> Iterator[MicroBatch]:
    """This rank's micro-batches of ``epoch`` from step ``in_epoch`` on, in plan order (a
    re-planned epoch's plan begins at a later step)."""
    accum = session.config.grad_accum
    start = session.epochs.plan_start(epoch)
    dataset = PlannedBatches(
        session.epochs.plans[epoch],
        (in_epoch - start) * accum,
        (session.epochs.steps[epoch] - start) * accum,
        session.mix.locator,
        session.tokenizer,
        session.profile,
        session.adapter,
    )
    return batch_iterator(dataset, session.workers, pin_memory=session.device.type == "cuda")


def _train_step(
    session: Session,
    runner: WindowRunner,
    reporter: StepReporter,
    result: RunResult,
    window: list[MicroBatch],
    epoch: int,
    evaluator: Evaluator | None = None,
) -> None:
    """One optimizer step on ``window``, then an eval when due, its metrics (the eval's in
    the same row), a checkpoint when due, faults."""
    state, engine, info = session.state, session.engine, session.info
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    reporter.efficiency_add(window)
    loss, by_source = None, None
    lr = engine.current_lr() if engine is not None else None  # the rate this step uses
    if engine is None:
        reporter.dry_window(info.rank, state.step, window)
        tokens = all_reduce_sum(sum(b.real_tokens for b in window if b.weight), session.device)
    else:
        outcome = runner.run(window, state.budgets, state.step)
        loss, tokens, state.budgets = outcome.loss, outcome.tokens, outcome.budgets
        by_source = outcome.loss_by_group
        for group, n in outcome.group_labels.items():
            result.group_loss[group] = result.group_loss.get(group, 0.0) + outcome.group_loss[group]
            result.group_labels[group] = result.group_labels.get(group, 0) + n
    elapsed = time.perf_counter() - started
    state.step += 1
    state.position = session.epochs.position_at(state.step)  # what a checkpoint saves
    for batch in window:
        for mismatch in batch.length_mismatches:
            log.warning("exact length differs from the plan: %s", mismatch)
        result.length_mismatches += len(batch.length_mismatches)
    if loss is not None:
        result.losses[state.step] = loss
    memory = reporter.peak_memory()  # the step's, before an eval's forwards
    evaluation = None
    if evaluator is not None and evaluator.due(state.step, sum(session.epochs.steps)):
        evaluation = evaluator.run(state.step).record()
    reporter.step_done(state.step, epoch, loss, tokens, elapsed, lr, by_source, evaluation, memory)
    every = session.config.save_every
    if engine is not None and every and state.step % every == 0:
        _save(session)
    session.faults.after_step(state.step)


def _save(session: Session) -> None:
    """A checkpoint of the current step (with the data position there)."""
    assert session.engine is not None
    save_checkpoint(session.output, session.engine, session.state, session.info)


def _record_event(output: Path, state: TrainState, event: dict[str, Any]) -> None:
    """Keep an OOM event in the checkpointed state and in OUT/events.jsonl."""
    state.events.append(event)
    with open(output / "events.jsonl", "a") as handle:
        handle.write(json.dumps(event) + "\n")


# --- finish ------------------------------------------------------------------------------


def _finish(session: Session) -> None:
    """The last checkpoint (unless just saved), parameter digests, the HF export."""
    engine, state, info, output = session.engine, session.state, session.info, session.output
    step = state.step
    if engine is not None and step > 0 and newest_checkpoint(output) != (step, tag_for(step)):
        _save(session)
    if engine is not None:
        digest = parameter_digest(engine.module)
        (output / f"params-rank{info.rank}.sha256").write_text(digest + "\n")
    if engine is not None and session.config.export and info.is_main:
        from mvtrain.export import export_hf

        export_hf(engine.module, session.tokenizer, output / "hf")
    barrier()


def parameter_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name and bytes: equal digests mean bitwise-equal weights."""
    h = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
