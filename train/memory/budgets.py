"""Token and patch budgets that fit a GPU, from static memory and the activation model.

What is predicted is the device memory the training process holds at its peak -- the figure
an out-of-memory error is about: the caching allocator's *reserved* memory
(``torch.cuda.max_memory_reserved``) plus what lives outside it (CUDA context, NCCL
buffers). In parts (:func:`memory_breakdown`):

* allocated = static (weights, gradients, optimizer, ZeRO buckets) + cuBLAS workspace +
  activation peak of the micro-batch -- comparable to ``torch.cuda.max_memory_allocated``;
* reserved = allocated + allocator fragmentation (a fraction of the activation peak);
* device = reserved + CUDA context + NCCL buffers.

The non-tensor terms are ESTIMATES, named in :class:`Overhead`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, Protocol

from mvshards.units import GiB, MiB, p99
from mvtrain.memory.static import StaticMemory

ROUND = 64

CUDA_CONTEXT_BYTES = 512 * MiB
"""ESTIMATE of the CUDA context per GPU on an H100-class card with lazy module loading
(``CUDA_MODULE_LOADING=LAZY``, the default since CUDA 12.2 on Linux and set by PyTorch since
1.13): PyTorch PR #86509 measured 287,047,680 bytes with lazy loading against 666,632,192
eager for a bare ``torch`` context; cuDNN, cuBLAS and NCCL kernels loaded on first use add to
it. Outside the caching allocator: not in ``memory_reserved``."""
CUBLAS_WORKSPACE_BYTES = 32 * MiB
"""cuBLAS workspace per handle and stream: the cuBLAS API reference (``cublasSetWorkspace``)
recommends 32 MiB on Hopper (4 MiB on earlier architectures), and PyTorch allocates that much
on sm90+ (PR #120925). Taken from the caching allocator: in ``memory_allocated``."""
CUBLAS_HANDLES = 2
"""ESTIMATE: cuBLAS handles are per thread -- one for the forward, one for autograd's
backward thread, each with its workspace."""
NCCL_BUFFSIZE = 4 * MiB
"""``NCCL_BUFFSIZE`` default, "The default is 4194304 (4 MiB)" (NCCL user guide, environment
variables): the buffer per connection between a pair of GPUs."""
NCCL_CHANNELS = 32
"""ESTIMATE of the channels NCCL opens on an NVLink node (each a ring with a send and a
receive connection). LL/LL128 protocol buffers and NVLS (NVSwitch) buffers are not counted."""
FRAGMENTATION = 0.10
"""ESTIMATE of reserved minus allocated at the peak, as a fraction of the activation peak:
the caching allocator rounds blocks and keeps freed ones cached; activations are the
allocations that come and go. ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` lowers it
(PyTorch CUDA semantics notes); ``scripts/gpu_check.py`` reports the measured gap."""


@dataclass(frozen=True)
class Overhead:
    """GPU memory besides the model's tensors, per GPU, by name. All ESTIMATES (see the
    module constants for the sources); :meth:`for_gpus` gives the defaults."""

    cuda_context: int = CUDA_CONTEXT_BYTES
    cublas_workspace: int = CUBLAS_HANDLES * CUBLAS_WORKSPACE_BYTES
    nccl_buffers: int = 0
    """``NCCL_BUFFSIZE`` x channels x 2 (send + receive); 0 on one GPU."""
    fragmentation_fraction: float = FRAGMENTATION

    @classmethod
    def for_gpus(cls, num_gpus: int) -> Overhead:
        nccl = NCCL_BUFFSIZE * NCCL_CHANNELS * 2 if num_gpus > 1 else 0
        return cls(nccl_buffers=nccl)

    @classmethod
    def none(cls) -> Overhead:
        """No overhead at all (the bare static + activation figure)."""
        return cls(0, 0, 0, 0.0)

    @property
    def fixed(self) -> int:
        """The batch-independent terms."""
        return self.cuda_context + self.cublas_workspace + self.nccl_buffers

    def fragmentation(self, activation_peak: int) -> int:
        return int(self.fragmentation_fraction * activation_peak)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fixed": self.fixed, "estimate": True}


class PeakModel(Protocol):
    """What the budget rule needs of an activation model (:class:`ActivationModel`, or a
    probe fit)."""

    def peak_bytes(
        self,
        padded_tokens: int,
        padded_patches: int,
        batch_size: int | None = None,
        max_len: int | None = None,
        padded: bool | None = None,
    ) -> int: ...


class BudgetError(ValueError):
    """Nothing fits: ``needed`` bytes for the p99 sample vs ``available`` on the card."""

    def __init__(self, message: str, needed: int, available: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.available = available


@dataclass(frozen=True)
class IndexStats:
    """What the budget rule needs from the shard index (per-sample padded costs); the p99
    figures are by nearest rank (:func:`mvshards.units.p99`)."""

    count: int
    total_tokens: int
    total_patches: int
    tokens_p99: int
    patches_p99: int
    tokens_max: int
    patches_max: int

    @property
    def patch_token_ratio(self) -> float:
        return self.total_patches / self.total_tokens if self.total_tokens else 0.0

    @classmethod
    def from_costs(cls, costs: Iterable[Sequence[int]]) -> IndexStats:
        """From ``(tokens, patches)`` pairs, or index rows ``[key, tokens, patches, images]``."""
        tokens: list[int] = []
        patches: list[int] = []
        for row in costs:
            t, p = (row[1], row[2]) if isinstance(row[0], str) else (row[0], row[1])
            tokens.append(int(t))
            patches.append(int(p))
        if not tokens:
            raise ValueError("the index is empty: no samples to plan budgets for")
        return cls(
            count=len(tokens),
            total_tokens=sum(tokens),
            total_patches=sum(patches),
            tokens_p99=p99(tokens),
            patches_p99=p99(patches),
            tokens_max=max(tokens),
            patches_max=max(patches),
        )


class BudgetPlan(NamedTuple):
    token_budget: int
    patch_budget: int
    predicted_peak: int
    """Device bytes at the peak of the worst micro-batch the budgets allow (reserved +
    context + NCCL; see the module doc)."""
    activation_peak: int = 0
    """Activation peak of that batch."""
    predicted_reserved: int = 0
    """The ``torch.cuda.max_memory_reserved`` part of :attr:`predicted_peak`."""
    predicted_allocated: int = 0
    """The ``torch.cuda.max_memory_allocated`` part of :attr:`predicted_peak`."""


def _static_total(static: int | StaticMemory) -> int:
    return static.total if isinstance(static, StaticMemory) else int(static)


def memory_breakdown(
    static: int | StaticMemory, activation_peak: int, overhead: Overhead
) -> dict[str, int]:
    """``allocated``, ``reserved`` and ``device`` bytes (module doc) for an activation peak."""
    allocated = _static_total(static) + overhead.cublas_workspace + int(activation_peak)
    reserved = allocated + overhead.fragmentation(activation_peak)
    device = reserved + overhead.cuda_context + overhead.nccl_buffers
    return {"allocated": allocated, "reserved": reserved, "device": device}


def predicted_peak_bytes(
    static: int | StaticMemory,
    act: PeakModel,
    padded_tokens: int,
    padded_patches: int,
    batch_size: int | None = None,
    max_len: int | None = None,
    overhead: Overhead | None = None,
) -> int:
    """Peak device bytes of one micro-batch; without ``overhead``, static + activation peak."""
    peak = act.peak_bytes(padded_tokens, padded_patches, batch_size, max_len)
    return memory_breakdown(static, peak, overhead or Overhead.none())["device"]


def worst_batch_peak(act: PeakModel, tokens: int, patches: int, longest: int) -> int:
    """Activation peak of the worst micro-batch within ``(tokens, patches)`` budgets when the
    longest sample has ``longest`` tokens (:func:`plan_budgets`, step 3)."""
    length = max(1, min(longest, tokens)) if tokens else 1
    batch = max(1, tokens // length)
    return act.peak_bytes(tokens, patches, batch, length, padded=batch > 1)


def _stats(index_stats: IndexStats | Mapping[str, Any]) -> IndexStats:
    if isinstance(index_stats, IndexStats):
        return index_stats
    return IndexStats(**{k: int(index_stats[k]) for k in IndexStats.__dataclass_fields__})


def _round_down(value: float) -> int:
    return int(value) // ROUND * ROUND


def _largest_multiple(fits: Callable[[int], bool], low: int) -> int:
    """The largest multiple of :data:`ROUND` at or above ``low`` (itself a multiple, or 0)
    for which ``fits`` holds, given that ``fits(low)`` does (or ``low`` is 0); ``fits`` is
    monotone."""
    lo, step = low // ROUND, 1
    while fits((lo + step) * ROUND) and step < 1 << 40:
        step *= 2
    hi = lo + step  # does not fit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * ROUND) else (lo, mid)
    return lo * ROUND


def _fill(
    need: Callable[[int, int], int], available: int, ratio: float, need_t: int, need_p: int
) -> tuple[int, int]:
    """Steps 2 to 4 of :func:`plan_budgets`: the largest ``(T, P)`` at the index's patch/token
    ``ratio`` whose ``need`` is within ``available``, a budget below the p99 sample's
    ``need_t``/``need_p`` raised to it and the other one refilled; ``P`` at least 1."""

    def fits(tokens: int, patches: int) -> bool:
        return need(tokens, patches) <= available

    tokens = _largest_multiple(lambda t: fits(t, _round_down(ratio * t)), 0)
    patches = _round_down(ratio * tokens)
    if tokens < need_t:
        tokens = need_t
        patches = max(need_p, _largest_multiple(lambda p: fits(tokens, p), 0))
    elif patches < need_p:
        patches = need_p
        tokens = max(need_t, _largest_multiple(lambda t: fits(t, patches), 0))
    return tokens, max(patches, 1)


def plan_budgets(
    static_bytes: int | StaticMemory,
    activation_model: PeakModel,
    gpu_bytes: int,
    target_fraction: float,
    index_stats: IndexStats | Mapping[str, Any],
    overhead: Overhead | None = None,
) -> BudgetPlan:
    """Budgets that fit ``target_fraction`` of a ``gpu_bytes`` card, by this rule:

    1. Headroom for activations: ``target_fraction * gpu_bytes - static - fixed overhead``; the
       activation peak ``A`` of a batch then needs ``A + fragmentation(A)`` of it.
    2. The budgets keep the dataset's own mix: ``patch_budget = ratio * token_budget`` with
       ``ratio = total padded-cost patches / total tokens`` over the index, so a micro-batch of
       typical samples reaches both budgets at about the same time (neither resource idles).
    3. The worst micro-batch the bucketer can form under ``(T, P)`` fills both budgets at once,
       with the longest sample of the index setting the padding shape (``B = T // L_max``
       sequences of ``L_max``, which maximises the quadratic mask term ``B*L^2 = T*L_max``).
       ``T`` is the largest multiple of :data:`ROUND` whose worst batch, with
       ``P = ratio * T`` rounded down to a multiple of :data:`ROUND`, fits; ``T + ROUND`` does
       not (found by bisection: the peak is monotone in ``T``).
    4. The p99 sample (nearest rank, :func:`mvshards.units.p99`) must fit alone: if ``T`` is
       below the p99 token count (or ``P`` below the p99 patch count) that budget is raised to
       it and the other one gets the largest multiple of :data:`ROUND` that still fits. When
       even that does not fit, :class:`BudgetError` says how many bytes are missing.

    The patch budget is at least 1, also for a text-only index, whose micro-batches still run
    the dummy image.

    ``overhead`` None: :meth:`Overhead.for_gpus` of the static memory's GPU count (one GPU
    when ``static_bytes`` is a plain number)."""
    if not 0 < target_fraction <= 1:
        raise ValueError(f"target fraction must be in (0, 1], got {target_fraction}")
    if overhead is None:
        gpus = static_bytes.num_gpus if isinstance(static_bytes, StaticMemory) else 1
        overhead = Overhead.for_gpus(gpus)
    stats = _stats(index_stats)
    act, longest = activation_model, max(1, stats.tokens_max)
    limit = int(target_fraction * gpu_bytes)
    fixed = _static_total(static_bytes) + overhead.fixed
    available = limit - fixed

    def need(tokens: int, patches: int) -> int:
        peak = worst_batch_peak(act, tokens, patches, longest)
        return peak + overhead.fragmentation(peak)

    need_t, need_p = max(1, stats.tokens_p99), stats.patches_p99
    needed = need(need_t, need_p)
    if needed > available:
        raise BudgetError(
            f"the p99 sample ({need_t} tokens, {need_p} patches) needs {needed / GiB:.2f} GiB of "
            f"activations (with fragmentation) but only {max(available, 0) / GiB:.2f} GiB remain "
            f"of {target_fraction:.0%} x {gpu_bytes / GiB:.1f} GiB after {fixed / GiB:.2f} GiB "
            "static + overhead",
            needed=fixed + needed,
            available=limit,
        )
    tokens, patches = _fill(need, available, stats.patch_token_ratio, need_t, need_p)
    peak = worst_batch_peak(act, tokens, patches, longest)
    parts = memory_breakdown(static_bytes, peak, overhead)
    return BudgetPlan(tokens, patches, parts["device"], peak, parts["reserved"], parts["allocated"])
