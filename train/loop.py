"""``mvtrain run`` as a library call: plan, build, stream, step, checkpoint, export.

Read it top to bottom: :func:`run` sets up (process group, model, plans, engine, resume),
then :func:`_train_steps` runs optimizer steps of ``grad_accum`` planned micro-batches each.
The loss of a step is the sum of token losses over its micro-batches on every rank divided
by the global count of label tokens (all ranks, the whole window) -- not a mean of per-batch
means -- so every label token weighs the same however the budgets cut the batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mvshards.index import load_index
from mvtrain.adapters import adapter_for
from mvtrain.bucketer import Budgets, CostModel
from mvtrain.checkpoint import TrainState, load_checkpoint, newest_checkpoint, save_checkpoint
from mvtrain.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    device_for,
    dist_info,
    ensure_alloc_conf,
)
from mvtrain.engine import deepspeed_available, init_process_group, load_user_config, make_engine
from mvtrain.lengths import exact_lengths
from mvtrain.loader import PlannedBatches, batch_iterator, default_loader_workers
from mvtrain.metrics import BatchLog, Efficiency, Scalars
from mvtrain.model_setup import build_model, load_tokenizer_only, parameter_counts
from mvtrain.plan import PlanIndex, RankPlan, all_rank_plans, equal_step_plans, plan_report
from mvtrain.precision import engine_precision
from mvtrain.run_config import RunConfig
from mvtrain.step import RESTART_FILE, LiveBudgets, WindowRunner

log = logging.getLogger("mvtrain")

FAULT_ENV = "MVTRAIN_FAULT"
"""Fault injection for tests: ``kill-after-step:K`` SIGKILLs every rank right after step K;
``slow-recount:S`` makes rank 0 sleep S seconds after recounting lengths, before the barrier."""


@dataclass
class EpochPlans:
    """Every epoch's plan for this rank and the step count all ranks share."""

    steps: list[int]
    plans: dict[int, RankPlan]
    report: dict[int, dict[str, Any]]

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of a global step."""
        for epoch, n in enumerate(self.steps):
            if step < n:
                return epoch, step
            step -= n
        raise IndexError("step past the planned epochs")


@dataclass
class RunResult:
    steps_done: int
    losses: dict[int, float] = field(default_factory=dict)
    efficiency: dict[str, float] = field(default_factory=dict)
    oversize: int = 0
    length_mismatches: int = 0
    output: Path | None = None


def _plan_epochs(
    config: RunConfig, index: PlanIndex, info: DistInfo, cost_model: CostModel
) -> EpochPlans:
    budgets = Budgets(tokens=config.token_budget, patches=config.patch_budget)
    steps: list[int] = []
    plans: dict[int, RankPlan] = {}
    reports: dict[int, dict[str, Any]] = {}
    for epoch in range(config.epochs if config.max_steps is None else 10**6):
        rank_plans = all_rank_plans(
            index,
            config.seed,
            epoch,
            info.world_size,
            budgets,
            cost_model,
            shuffle_buffer=config.shuffle_buffer,
        )
        n, padded = equal_step_plans(rank_plans, config.grad_accum)
        steps.append(n)
        plans[epoch] = padded[info.rank]
        reports[epoch] = plan_report(rank_plans)
        if config.max_steps is not None and sum(steps) >= config.max_steps:
            break
    if config.max_steps is not None:
        total, trimmed = config.max_steps, []
        for n in steps:
            trimmed.append(min(n, total))
            total -= trimmed[-1]
        steps = trimmed
    return EpochPlans(steps, plans, reports)


def _auto_budgets(config: RunConfig, info: DistInfo, use_deepspeed: bool) -> tuple[RunConfig, int]:
    """Fill 'auto' budgets from the memory plan of this run's engine and precision (``auto``
    resolved on this machine); every rank computes the same numbers."""
    from mvtrain.memory_plan import PlanRequest, make_plan
    from mvtrain.precision import resolve_dtype

    gpu_mem = config.gpu_mem
    if gpu_mem is None:
        if not torch.cuda.is_available():
            raise ValueError("'auto' budgets on a machine without CUDA need --gpu-mem (e.g. 8GiB)")
        gpu_mem = torch.cuda.get_device_properties(info.local_rank).total_memory
    plan = make_plan(
        PlanRequest(
            shards=Path(config.shards),
            model=config.model,
            gpus=info.world_size,
            gpu_mem=gpu_mem,
            zero_stage=config.zero_stage,
            lora=config.lora,
            lora_rank=config.lora_rank,
            freeze_vision=config.freeze_vision,
            grad_ckpt=config.grad_ckpt,
            dtype=resolve_dtype(config.dtype),
            target=config.target,
            grad_accum=config.grad_accum,
            probe=config.probe,
            engine="deepspeed" if use_deepspeed else "torch",
        )
    )
    if plan["token_budget"] is None:
        raise ValueError(f"'auto' budgets: nothing fits ({plan['error']}); see `mvtrain plan`")
    config = replace(
        config,
        token_budget=config.token_budget or plan["token_budget"],
        patch_budget=config.patch_budget or plan["patch_budget"],
    )
    if info.is_main:
        log.warning(
            "auto budgets: %d tokens, %d patches (predicted peak %.2f GiB of %.1f GiB)",
            config.token_budget,
            config.patch_budget,
            plan["predicted_peak_bytes"] / 2**30,
            gpu_mem / 2**30,
        )
    return config, int(plan["predicted_peak_bytes"])


def _record_event(output: Path, state: TrainState, event: dict[str, Any]) -> None:
    """Keep an OOM event in the checkpointed state and in OUT/events.jsonl."""
    state.events.append(event)
    with open(output / "events.jsonl", "a") as handle:
        handle.write(json.dumps(event) + "\n")


def _inject_fault(step: int) -> None:
    if os.environ.get(FAULT_ENV) == f"kill-after-step:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _slow_recount() -> None:
    action, _, seconds = os.environ.get(FAULT_ENV, "").partition(":")
    if action == "slow-recount":
        time.sleep(float(seconds))


def run(config: RunConfig) -> RunResult:
    config.validate()
    alloc_conf = ensure_alloc_conf()
    info = dist_info()
    use_ds = deepspeed_available() if config.use_deepspeed is None else config.use_deepspeed
    if use_ds and not deepspeed_available():
        raise RuntimeError("DeepSpeed is not installed: pip install 'mvkit[train]' or drop --zero")
    precision = engine_precision(config.dtype, use_ds)
    if not config.dry_run:
        init_process_group(info, use_ds, config.dist_timeout_minutes)
    elif info.world_size > 1:
        init_process_group(info, use_deepspeed=False, timeout_minutes=config.dist_timeout_minutes)
    torch.manual_seed(config.seed)
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    device = device_for(info)

    index = load_index(Path(config.shards))
    profile = index.params["profile"]
    bundle = None if config.dry_run else build_model(config, precision.weights)
    tokenizer = bundle.tokenizer if bundle else load_tokenizer_only(config)
    family = bundle.family if bundle else ("4.6" if "4.6" in profile else "2.6")
    if ("4.6" in profile) != (family == "4.6"):
        raise ValueError(
            f"the shards were built with --profile {profile} but the model is a MiniCPM-V "
            f"{family}-family model: rebuild with the matching --profile"
        )
    cost_model = CostModel.for_profile(profile)
    planned_peak = None
    if config.token_budget is None or config.patch_budget is None:
        config, planned_peak = _auto_budgets(config, info, use_ds)
    cache = output / "cache"
    if info.is_main:  # rank 0 recounts and caches; the others then read the cache
        lengths = exact_lengths(index, tokenizer, profile, cache, progress=config.progress)
        _slow_recount()
    barrier()
    if not info.is_main:
        lengths = exact_lengths(index, tokenizer, profile, cache)
    if lengths.mismatches and info.is_main:
        log.warning(
            "%d samples' exact token counts differ from the index (built with another "
            "tokenizer or template?); planning uses the exact counts",
            lengths.mismatches,
        )
    plan_index = PlanIndex.from_arrays(
        index.keys,
        index.shard_ids,
        lengths.tokens,
        index.num_patches,
        num_shards=len(index.shards),
        slice_table=lengths.slices,
    )
    epochs = _plan_epochs(config, plan_index, info, cost_model)
    total_steps = sum(epochs.steps)
    adapter = adapter_for(profile, tokenizer)
    key_shard = {k: int(s) for k, s in zip(index.keys, index.shard_ids, strict=True)}
    shard_paths = index.shard_paths()

    engine = None
    state = TrainState(
        step=0, budgets={"tokens": config.token_budget, "patches": config.patch_budget}
    )
    if bundle is not None:
        bundle.model.to(device)
        engine = make_engine(
            bundle.model,
            info,
            use_deepspeed=use_ds,
            lr=config.lr,
            weight_decay=config.weight_decay,
            warmup_steps=config.warmup_steps,
            total_steps=total_steps,
            grad_accum=config.grad_accum,
            zero_stage=config.zero_stage,
            dtype=precision.dtype,
            user_config=load_user_config(config.deepspeed_config),
        )
        if config.resume:
            found = newest_checkpoint(output)
            if found is not None:
                state = load_checkpoint(output, found[1], engine, info)

    budgets = LiveBudgets(tokens=state.budgets["tokens"], patches=state.budgets["patches"])
    result = RunResult(steps_done=state.step, output=output)
    result.oversize = sum(len(p.oversize) for p in epochs.plans.values())
    efficiency = Efficiency(config.token_budget, config.patch_budget)
    batch_log = BatchLog(config.batch_log)
    runner = WindowRunner(
        engine,
        adapter,
        info,
        device,
        batch_log,
        on_event=lambda event: _record_event(output, state, event),
        restart_file=output / RESTART_FILE,
        planned_budgets=LiveBudgets(tokens=config.token_budget, patches=config.patch_budget),
    )
    scalars = Scalars(output / "tensorboard" if info.is_main and config.tensorboard else None)
    metrics_file = output / "metrics.jsonl"
    bar = tqdm(
        total=total_steps,
        initial=state.step,
        desc="mvtrain",
        unit="step",
        disable=not (config.progress and info.is_main),
        dynamic_ncols=True,
    )
    workers = config.loader_workers
    if workers is None:
        workers = default_loader_workers(device.type == "cuda")
    if info.is_main:
        (output / "run.json").write_text(
            json.dumps(
                {
                    "config": {k: str(v) for k, v in vars(config).items()},
                    "world_size": info.world_size,
                    "engine": engine.name if engine else "dry-run",
                    "precision": precision.as_dict(),
                    "loader_workers": workers,
                    "cuda_alloc_conf": alloc_conf,
                    "params": parameter_counts(bundle.model) if bundle else None,
                    "steps_per_epoch": epochs.steps,
                    "plan": {str(e): r for e, r in epochs.report.items()},
                    "exact_length_recount": lengths.recounted,
                    "budgets": {"tokens": config.token_budget, "patches": config.patch_budget},
                    "predicted_peak_bytes": planned_peak,
                },
                indent=1,
                default=str,
            )
        )
    try:
        step = state.step
        while step < total_steps:
            epoch, in_epoch = epochs.locate(step)
            plan = epochs.plans[epoch]
            dataset = PlannedBatches(
                plan,
                in_epoch * config.grad_accum,
                epochs.steps[epoch] * config.grad_accum,
                shard_paths,
                key_shard,
                tokenizer,
                profile,
                adapter,
            )
            stream = batch_iterator(dataset, workers, pin_memory=device.type == "cuda")
            for _ in range(in_epoch, epochs.steps[epoch]):
                window = [next(stream) for _ in range(config.grad_accum)]
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                started = time.perf_counter()
                for batch in window:
                    efficiency.add(batch)
                loss = None
                if engine is None:
                    _dry_window(window, info, step, batch_log)
                    trained = sum(b.real_tokens for b in window if b.weight)
                    tokens = all_reduce_sum(trained, device)
                else:
                    outcome = runner.run(window, budgets, step)
                    loss, tokens = outcome.loss, outcome.tokens
                    state.budgets = budgets.as_dict()
                elapsed = time.perf_counter() - started
                step += 1
                state.step = step
                for batch in window:
                    for mismatch in batch.length_mismatches:
                        log.warning("exact length differs from the plan: %s", mismatch)
                    result.length_mismatches += len(batch.length_mismatches)
                record = {
                    "step": step,
                    "epoch": epoch,
                    "tokens_per_s": tokens / max(elapsed, 1e-9),
                    **efficiency.report(),
                }
                if loss is not None:
                    result.losses[step] = loss
                    record["loss"] = loss
                if engine is not None:
                    record["lr"] = engine.current_lr()
                if torch.cuda.is_available():
                    record["max_memory_allocated"] = torch.cuda.max_memory_allocated()
                    record["max_memory_reserved"] = torch.cuda.max_memory_reserved()
                if info.is_main:
                    with open(metrics_file, "a") as handle:
                        handle.write(json.dumps(record) + "\n")
                    scalars.log(step, {k: v for k, v in record.items() if isinstance(v, float)})
                    bar.set_postfix_str(
                        f"loss {loss:.4f}" if loss is not None else "dry run", refresh=False
                    )
                bar.update(1)
                if engine is not None and config.save_every and step % config.save_every == 0:
                    save_checkpoint(output, engine, state, info)
                _inject_fault(step)
        if (
            engine is not None
            and step > 0
            and newest_checkpoint(output) != (step, f"step-{step:06d}")
        ):
            save_checkpoint(output, engine, state, info)
        if engine is not None:
            digest = parameter_digest(engine.module)
            (output / f"params-rank{info.rank}.sha256").write_text(digest + "\n")
        if engine is not None and config.export and info.is_main:
            from mvtrain.export import export_hf

            export_hf(engine.module, tokenizer, output / "hf")
        barrier()
    finally:
        bar.close()
        batch_log.close()
        scalars.close()
    result.steps_done = state.step
    result.efficiency = efficiency.report()
    return result


def parameter_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name and bytes: equal digests mean bitwise-equal weights."""
    h = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _dry_window(window: list[Any], info: DistInfo, step: int, batch_log: BatchLog) -> None:
    for micro, batch in enumerate(window):
        batch_log.write(info.rank, step, micro, batch, None)
