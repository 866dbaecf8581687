"""Setting up one ``mvtrain run``: everything the training steps need, in a :class:`Session`.

:func:`setup` checks the output folder (a previous run there needs ``--resume`` or
``--overwrite``), starts the process group, loads the model (refusing shards of another
family), fills ``auto`` budgets from the memory plan, counts exact token lengths (each
rank its share, all-gathered, cached, per ``--shards`` folder), mixes the folders
(:mod:`mvtrain.batching.sources`), plans the epochs, builds the engine, resumes from the
newest checkpoint and writes ``run.json``.

A resume reads the checkpoint's record first: an engine state that cannot carry over is
refused before the model loads (:mod:`mvtrain.resume_checks`). The epochs are planned from
the checkpoint's data position: with other settings (world size, budgets, ``--grad-accum``)
the rest of its epoch is planned anew (:mod:`mvtrain.batching.position`), ZeRO state is
re-partitioned for the new world size (:mod:`mvtrain.zero_repartition`), the new budgets
replace the checkpoint's, and the change is recorded (``events.jsonl``, ``run.json``). The
learning-rate schedule is kept unless ``--schedule-change``; when a re-plan alone changes the
step count its total steps follow.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mvshards.cost import CostModel
from mvshards.index import load_index
from mvshards.profiles import get_profile
from mvshards.units import GiB
from mvtrain.batching.epochs import REPLAN_EVENT, EpochPlans, plan_epochs
from mvtrain.batching.plan_index import PlanIndex
from mvtrain.batching.sources import SourceMix, check_compatible, parse_sources
from mvtrain.checkpoint import (
    SavedRun,
    TrainState,
    checkpoint_root,
    load_checkpoint,
    read_checkpoint,
)
from mvtrain.data.lengths import exact_lengths, gather_counts
from mvtrain.data.loader import default_loader_workers
from mvtrain.deepspeed_config import load_user_config
from mvtrain.distributed import DistInfo, barrier, device_for, dist_info, ensure_alloc_conf
from mvtrain.engine import (
    Engine,
    deepspeed_available,
    init_process_group,
    make_engine,
)
from mvtrain.faults import Faults
from mvtrain.lr_schedule import CHANGE_EVENT, LrSchedule, apply_schedule, schedule_change
from mvtrain.model.adapters import Adapter, adapter_for
from mvtrain.model.setup import build_model, load_tokenizer_only, parameter_counts
from mvtrain.precision import Precision, engine_precision
from mvtrain.resume_checks import (
    check_old_checkpoint,
    check_same_engine,
    length_unchanged,
    setup_record,
)
from mvtrain.run_config import RunConfig
from mvtrain.run_folder import (
    check_output,
    clear_run_files,
    resume_checkpoint,
    take_run_lock,
)
from mvtrain.zero_repartition import convert_to_universal, needs_repartition, universal_config

log = logging.getLogger("mvtrain")


@dataclass
class Session:
    """What setup hands to the training steps."""

    config: RunConfig
    info: DistInfo
    device: torch.device
    output: Path
    faults: Faults
    tokenizer: Any
    profile: str
    adapter: Adapter
    epochs: EpochPlans
    mix: SourceMix
    """The ``--shards`` folders: names, weights, where each sample id lives."""
    engine: Engine | None
    state: TrainState
    workers: int


def setup(config: RunConfig) -> Session:
    """Output folder check, process group, model, exact lengths, the epochs' plans, engine,
    resume, run.json."""
    config.validate()
    stale = check_output(config)  # every rank, before any rank can write to the folder
    alloc_conf = ensure_alloc_conf()
    info = dist_info()
    faults = Faults.from_env()
    use_ds = deepspeed_available() if config.use_deepspeed is None else config.use_deepspeed
    if use_ds and not deepspeed_available():
        raise RuntimeError("DeepSpeed is not installed: pip install 'mvkit[train]' or drop --zero")
    precision = engine_precision(config.dtype, use_ds)
    if os.environ.get("RANK", "0") == "0":  # after the checks, before anything is written
        take_run_lock(Path(config.output))
    if not config.dry_run:
        init_process_group(info, use_ds, config.dist_timeout_minutes)
    elif info.world_size > 1:
        init_process_group(info, use_deepspeed=False, timeout_minutes=config.dist_timeout_minutes)
    device = device_for(info)
    output = _prepare_output(config, info, stale)
    torch.manual_seed(config.seed)
    record = setup_record(config, use_ds, precision.dtype, info.world_size)
    saved = _saved_run(config, record)

    sources = parse_sources(config.shards)
    indexes = [load_index(source.path) for source in sources]  # a folder or a URL
    for index in indexes:
        index.check_shard_files()
    check_compatible([s.path for s in sources], [index.params for index in indexes])
    profile = indexes[0].params["profile"]
    bundle, tokenizer = _load_model(config, profile, precision)
    planned_peak = None
    if config.token_budget is None or config.patch_budget is None:
        config, planned_peak = _auto_budgets(config, info, use_ds)
    lengths = [_exact_lengths(config, ix, tokenizer, profile, info, faults) for ix in indexes]
    mix = SourceMix.build(
        sources, indexes, [_plan_index(ix, n) for ix, n in zip(indexes, lengths, strict=True)]
    )
    position = saved.state.position if saved is not None else None
    epochs = plan_epochs(config, mix, info, CostModel.for_profile(profile), resume=position)
    engine, state = _engine_and_state(
        config, bundle, info, device, use_ds, precision, epochs, saved
    )
    state.setup = record
    state.position = epochs.position_at(state.step)
    session = Session(
        config=config,
        info=info,
        device=device,
        output=output,
        faults=faults,
        tokenizer=tokenizer,
        profile=profile,
        adapter=adapter_for(profile, tokenizer, config.chunked_loss),
        epochs=epochs,
        mix=mix,
        engine=engine,
        state=state,
        workers=_loader_workers(config, device),
    )
    if info.is_main and epochs.change is not None:
        with open(output / "events.jsonl", "a") as handle:
            handle.write(json.dumps(epochs.change) + "\n")
    if info.is_main:
        run_record = {
            "precision": precision.as_dict(),
            "cuda_alloc_conf": alloc_conf,
            "params": parameter_counts(bundle.model) if bundle else None,
            "exact_length_recount": any(n.recounted for n in lengths),
            "predicted_peak_bytes": planned_peak,
        }
        _write_run_json(session, run_record)
    return session


def _prepare_output(config: RunConfig, info: DistInfo, stale: list[Path]) -> Path:
    """The output folder, created; with ``--overwrite``, rank 0 first deletes the ``stale``
    run files while the other ranks wait in a barrier."""
    if config.overwrite:  # the same on every rank, so each one meets the barrier
        if info.is_main:
            clear_run_files(stale)
        barrier()
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    return output


def _load_model(config: RunConfig, profile: str, precision: Precision) -> tuple[Any, Any]:
    """``(bundle, tokenizer)``; no model for a dry run. Refuses shards of another family."""
    bundle = None if config.dry_run else build_model(config, precision.weights)
    tokenizer = bundle.tokenizer if bundle else load_tokenizer_only(config)
    family = bundle.family if bundle else get_profile(profile).family
    if family is not get_profile(profile).family:
        raise ValueError(
            f"the shards were built with --profile {profile} but the model is a MiniCPM-V "
            f"{family}-family model: rebuild with the matching --profile"
        )
    return bundle, tokenizer


def _exact_lengths(
    config: RunConfig, index: Any, tokenizer: Any, profile: str, info: DistInfo, faults: Faults
) -> Any:
    """Every sample's exact token count: from the cache or an exact index, else every rank
    recounts its share and the shares are all-gathered (rank 0 writes the cache)."""
    lengths = exact_lengths(
        index,
        tokenizer,
        profile,
        Path(config.output) / "cache",
        progress=config.progress and info.is_main,
        rank=info.rank,
        world_size=info.world_size,
        gather=gather_counts,
        after_count=faults.after_recount if info.is_main else None,
    )
    if lengths.mismatches and info.is_main:
        log.warning(
            "%d samples' exact token counts differ from the index (built with another "
            "tokenizer or template?); planning uses the exact counts",
            lengths.mismatches,
        )
    return lengths


def _saved_run(config: RunConfig, record: dict[str, Any]) -> SavedRun | None:
    """The newest checkpoint's run state when resuming (not in a dry run), its engine state
    checked against this run's ``record`` (a one-line refusal when it cannot carry over)."""
    if not config.resume or config.dry_run:
        return None
    _, tag = resume_checkpoint(Path(config.output))
    saved = read_checkpoint(Path(config.output), tag)
    where = str(checkpoint_root(Path(config.output)) / tag)
    check_same_engine(saved.state.setup, record, where)
    has_position = saved.state.position is not None
    check_old_checkpoint(has_position, saved.world_size, record["world_size"], where)
    return saved


def _engine_and_state(
    config: RunConfig,
    bundle: Any,
    info: DistInfo,
    device: torch.device,
    use_ds: bool,
    precision: Precision,
    epochs: EpochPlans,
    saved: SavedRun | None = None,
) -> tuple[Engine | None, TrainState]:
    """The engine around the model (None for a dry run) and the state to start from: the
    ``saved`` checkpoint's when resuming (its ZeRO state re-partitioned for another world
    size), with its learning-rate schedule checked against this run's (a change needs
    ``--schedule-change``, unless a re-plan alone changed the step count, and then applies
    from the resumed step)."""
    schedule = LrSchedule(config.lr, config.warmup_steps, sum(epochs.steps))
    state = TrainState(step=0, budgets=config.budgets, schedule=schedule.as_dict())
    if bundle is None:
        return None, state
    bundle.model.to(device)
    user_config = load_user_config(config.deepspeed_config)
    repartition = saved is not None and needs_repartition(
        saved.world_size, info.world_size, use_ds, config.zero_stage
    )
    if repartition:
        user_config = universal_config(user_config)
    engine = make_engine(
        bundle.model,
        info,
        use_deepspeed=use_ds,
        lr=schedule.peak_lr,
        weight_decay=config.weight_decay,
        warmup_steps=schedule.warmup_steps,
        total_steps=schedule.total_steps,
        grad_accum=config.grad_accum,
        zero_stage=config.zero_stage,
        dtype=precision.dtype,
        user_config=user_config,
        config_path=Path(config.output) / "deepspeed_config.json",
    )
    if saved is not None:
        folder = checkpoint_root(Path(config.output)) / saved.tag
        engine_tag = convert_to_universal(folder, info) if repartition else ""
        state = load_checkpoint(
            Path(config.output), saved, engine, info, config.seed, engine_tag=engine_tag
        )
        _apply_replan(config, epochs, state, saved, repartition)
        _keep_or_change_schedule(config, engine, state, schedule, epochs.change, saved)
    return engine, state


def _apply_replan(
    config: RunConfig, epochs: EpochPlans, state: TrainState, saved: SavedRun, repartition: bool
) -> None:
    """A resume with other settings: record the re-plan of the epoch (and the ZeRO
    re-partition) in ``state.events``; other budgets replace the checkpoint's."""
    change = epochs.change
    if change is None:
        return
    if (change["from"]["token_budget"], change["from"]["patch_budget"]) != (
        change["to"]["token_budget"],
        change["to"]["patch_budget"],
    ):
        state.budgets = config.budgets
    if repartition:
        change["zero_repartition"] = {
            "from_world_size": saved.world_size,
            "to_world_size": change["to"]["world_size"],
            "via": f"{saved.tag}/universal",
        }
    state.events.append(change)
    log.warning(
        "resumed at step %d with %s: the %d samples of epoch %d not yet trained are planned "
        "anew (steps left in the epoch: %d)",
        change["step"],
        ", ".join(change["changed"]),
        change["planned_samples"],
        change["epoch"],
        change["steps_left_in_epoch"],
    )


def _keep_or_change_schedule(
    config: RunConfig,
    engine: Engine,
    state: TrainState,
    schedule: LrSchedule,
    replan: dict[str, Any] | None = None,
    saved: SavedRun | None = None,
) -> None:
    """Refuse a resumed run whose schedule differs from the checkpoint's, unless
    ``--schedule-change`` or a re-plan (``replan``) alone changed the total steps (same
    ``--lr``, ``--warmup-steps``, ``--max-steps``, ``--epochs``): then apply ``schedule``
    from ``state.step`` and record the change in ``state.events``."""
    old = LrSchedule.of(state.schedule) if state.schedule else None
    follows = (
        replan is not None
        and old is not None
        and (old.peak_lr, old.warmup_steps) == (schedule.peak_lr, schedule.warmup_steps)
        and length_unchanged(saved.state.setup if saved is not None else None, config)
    )
    change = schedule_change(old, schedule, state.step, config.schedule_change or follows)
    state.schedule = schedule.as_dict()
    if change is None:
        return
    if follows and not config.schedule_change:
        change["reason"] = "the resume re-planned the epoch: the total steps follow"
    apply_schedule(_lr_scheduler(engine), schedule)
    state.events.append(change)
    log.warning("learning-rate schedule changed at step %d: %s", state.step, schedule.describe())


def _lr_scheduler(engine: Engine) -> Any:
    """The engine's ``LambdaLR`` (the torch engine's own, or the one DeepSpeed wraps)."""
    scheduler = getattr(engine, "scheduler", None)
    if scheduler is None:
        scheduler = engine._engine.lr_scheduler  # type: ignore[attr-defined]
    return scheduler


def _plan_index(index: Any, lengths: Any) -> PlanIndex:
    """The index with the exact token counts and slice costs of ``lengths``."""
    return PlanIndex.from_index(index, lengths.slices, tokens=lengths.tokens)


def _loader_workers(config: RunConfig, device: torch.device) -> int:
    if config.loader_workers is not None:
        return config.loader_workers
    return default_loader_workers(device.type == "cuda")


def _write_run_json(session: Session, extra: dict[str, Any]) -> None:
    config, engine = session.config, session.engine
    record = {
        "config": {
            **{k: str(v) for k, v in vars(config).items()},
            "shards": " ".join(str(s) for s in session.mix.sources),
        },
        "world_size": session.info.world_size,
        "engine": engine.name if engine else "dry-run",
        "precision": extra["precision"],
        "loader_workers": session.workers,
        "cuda_alloc_conf": extra["cuda_alloc_conf"],
        "params": extra["params"],
        "steps_per_epoch": session.epochs.steps,
        "plan": {str(e): r for e, r in session.epochs.report.items()},
        "sources": _sources_record(session),
        "exact_length_recount": extra["exact_length_recount"],
        "budgets": {"tokens": config.token_budget, "patches": config.patch_budget},
        "predicted_peak_bytes": extra["predicted_peak_bytes"],
        "lr_schedule": session.state.schedule,
        "lr_schedule_changes": [e for e in session.state.events if e.get("event") == CHANGE_EVENT],
        "resume_replans": [e for e in session.state.events if e.get("event") == REPLAN_EVENT],
    }
    (session.output / "run.json").write_text(json.dumps(record, indent=1, default=str))


def _sources_record(session: Session) -> list[dict[str, Any]]:
    """Per ``--shards`` folder: name, path, weight, samples in it and per epoch, and the
    samples, tokens and skipped samples all ranks' plans hold per epoch."""
    records = session.mix.describe()
    reports = [session.epochs.report[e] for e in sorted(session.epochs.report)]
    for record in records:
        counts = [r["sources"][record["name"]] for r in reports if "sources" in r]
        record["planned_samples_per_epoch"] = [c["samples"] for c in counts]
        record["planned_tokens_per_epoch"] = [c["tokens"] for c in counts]
        record["skipped_per_epoch"] = [c["skipped"] for c in counts]
    return records


def _auto_budgets(config: RunConfig, info: DistInfo, use_deepspeed: bool) -> tuple[RunConfig, int]:
    """Fill 'auto' budgets from the memory plan of this run's engine and precision (``auto``
    resolved on this machine); every rank computes the same numbers."""
    from mvtrain.memory.plan import PlanRequest, make_plan
    from mvtrain.precision import resolve_dtype

    gpu_mem = config.gpu_mem
    if gpu_mem is None:
        if not torch.cuda.is_available():
            raise ValueError("'auto' budgets on a machine without CUDA need --gpu-mem (e.g. 8GiB)")
        gpu_mem = torch.cuda.get_device_properties(info.local_rank).total_memory
    fit = make_plan(
        PlanRequest(
            shards=config.shards,
            model=config.model,
            gpus=info.world_size,
            gpu_mem=gpu_mem,
            zero_stage=config.zero_stage,
            lora=config.lora,
            lora_rank=config.lora_rank,
            freeze_vision=config.freeze_vision,
            grad_ckpt=config.grad_ckpt,
            chunked_loss=config.chunked_loss,
            dtype=resolve_dtype(config.dtype),
            target=config.target,
            grad_accum=config.grad_accum,
            probe=config.probe,
            engine="deepspeed" if use_deepspeed else "torch",
        )
    ).fit
    budgets = fit.budgets
    if budgets is None:
        raise ValueError(f"'auto' budgets: nothing fits ({fit.shortfall}); see `mvtrain plan`")
    config = replace(
        config,
        token_budget=config.token_budget or budgets.token_budget,
        patch_budget=config.patch_budget or budgets.patch_budget,
    )
    if info.is_main:
        log.warning(
            "auto budgets: %d tokens, %d patches (predicted peak %.2f GiB of %.1f GiB)",
            config.token_budget,
            config.patch_budget,
            budgets.predicted_peak / GiB,
            gpu_mem / GiB,
        )
    return config, int(budgets.predicted_peak)
