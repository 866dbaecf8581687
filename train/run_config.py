"""Options of one ``mvtrain run``: a plain dataclass the CLI fills and a notebook can too."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvtrain.budgets import Budgets

DEFAULT_TOKEN_BUDGET = 16384
DEFAULT_PATCH_BUDGET = 65536


DTYPES = ("auto", "bf16", "fp16", "fp32")
"""The ``--dtype`` values (:mod:`mvtrain.precision` says what each engine does with them)."""


def check_dtype(name: str) -> str:
    """``name`` if it is a ``--dtype`` value (one of :data:`DTYPES`), else ``ValueError``."""
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return name


MAX_EPOCHS = 10**6
"""Epochs planned at most for ``--max-steps`` alone (an empty plan stops at the first)."""


@dataclass
class RunConfig:
    shards: Any
    """The shard folders: a folder, ``DIR:WEIGHT``, or a list of those (or of
    :class:`mvtrain.batching.sources.ShardSource`); see :mod:`mvtrain.batching.sources`."""
    model: str
    """``tiny`` or a local model folder."""
    output: Path
    token_budget: int | None = DEFAULT_TOKEN_BUDGET
    """None: 'auto', taken from the memory plan (or a probe fit)."""
    patch_budget: int | None = DEFAULT_PATCH_BUDGET
    gpu_mem: int | None = None
    """Card size for 'auto' budgets; None: the CUDA device's (required on CPU)."""
    target: float = 0.9
    probe: Path | None = None
    grad_accum: int = 1
    max_steps: int | None = None
    """Stop after this many optimizer steps (a cap on ``epochs`` when both are given)."""
    epochs: int | None = None
    """Passes over the data; None: 1, or as many as ``max_steps`` takes when that is given."""
    zero_stage: int = 2
    deepspeed_config: Path | None = None
    use_deepspeed: bool | None = None
    """None: DeepSpeed when importable, else plain torch."""
    lora: bool = False
    lora_rank: int = 8
    freeze_vision: bool = False
    grad_ckpt: bool = False
    chunked_loss: bool = True
    """The loss from the hidden states in chunks (:mod:`mvtrain.model.chunked_loss`); False:
    the plain logits loss (``--no-chunked-loss``)."""
    dtype: str = "auto"
    """Training precision, one of :data:`DTYPES`; ``auto``: bf16 where
    CUDA supports it, else fp32."""
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    seed: int = 0
    batch_log: Path | None = None
    save_every: int | None = None
    resume: bool = False
    overwrite: bool = False
    """Delete a previous run's files in ``output`` first (see :mod:`mvtrain.run_folder`)."""
    schedule_change: bool = False
    """On resume, accept a learning-rate schedule that differs from the checkpoint's."""
    dry_run: bool = False
    trust_remote_code: bool = False
    loader_workers: int | None = None
    """DataLoader workers per rank; None: auto."""
    shuffle_buffer: int = 1000
    progress: bool = True
    tensorboard: bool = True
    export: bool = True
    dist_timeout_minutes: float = 60.0
    """How long a collective waits for the other ranks before failing."""
    eval_shards: Any = ()
    """``--eval-shards``: held-out shard folders (a folder or a list); empty: no eval. See
    :mod:`mvtrain.evaluation`."""
    eval_every: int | None = None
    """Evaluate every N optimizer steps (besides step 0 and the end); None: only those."""
    eval_max_samples: int | None = None
    """Evaluate the first M eval samples (dataset order) only; None: all of them."""
    save_best: bool = False
    """Keep the checkpoint and export of the lowest eval loss in ``OUT/best/``."""

    @property
    def epoch_limit(self) -> int:
        """The most epochs to plan: ``--epochs``; without it 1, or no limit (10**6) when
        ``--max-steps`` alone says how long to train. ``--max-steps`` then caps the steps."""
        if self.epochs is not None:
            return self.epochs
        return 1 if self.max_steps is None else MAX_EPOCHS

    @property
    def budgets(self) -> Budgets:
        """The run's budgets; ``auto`` ones must have been filled in (the session does)."""
        if self.token_budget is None or self.patch_budget is None:
            raise ValueError("'auto' budgets are filled in from the memory plan first")
        return Budgets(self.token_budget, self.patch_budget)

    def validate(self) -> None:
        for name, value in (
            ("--token-budget", self.token_budget),
            ("--patch-budget", self.patch_budget),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive or 'auto', got {value}")
        if self.resume and self.overwrite:
            raise ValueError(
                "--resume continues the run in --output, --overwrite deletes it: pick one"
            )
        if self.grad_accum < 1:
            raise ValueError(f"--grad-accum must be >= 1, got {self.grad_accum}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(
                f"--zero must be 0, 1 or 2 (ZeRO-3 is not supported), got {self.zero_stage}"
            )
        check_dtype(self.dtype)
        if self.dist_timeout_minutes <= 0:
            raise ValueError(f"--dist-timeout must be positive, got {self.dist_timeout_minutes}")
        if self.loader_workers is not None and self.loader_workers < 0:
            raise ValueError(f"--loader-workers must be >= 0 or 'auto', got {self.loader_workers}")
        if self.save_every is not None and self.save_every < 1:
            raise ValueError(f"--save-every must be >= 1, got {self.save_every}")
        from mvtrain.batching.sources import parse_sources

        for source in parse_sources(self.shards):
            if not (source.path / "manifest.json").exists():  # a folder or a URL
                raise ValueError(
                    f"{source.path} has no manifest.json: build it with `mvprep build ... "
                    f"--out {source.path}` (or finish that build by re-running it)"
                )
        self._validate_eval()

    def _validate_eval(self) -> None:
        """The ``--eval-*`` options: positive counts, ``--save-best`` and ``--eval-every``
        need ``--eval-shards``, each eval folder holds a build."""
        for name, value in (
            ("--eval-every", self.eval_every),
            ("--eval-max-samples", self.eval_max_samples),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not self.eval_shards:
            for name, given in (("--save-best", self.save_best), ("--eval-every", self.eval_every)):
                if given:
                    raise ValueError(f"{name} needs --eval-shards DIR (the held-out shards)")
            return
        from mvtrain.evaluation import check_eval_shards

        check_eval_shards(self.shards, self.eval_shards)
