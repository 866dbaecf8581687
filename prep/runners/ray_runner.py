"""Run work units as plain Ray tasks: ``mvprep build --runner ray [--ray-address ADDR]``.

One task per unit, carrying only the :class:`~mvprep.unit.UnitSpec` (a record range), the
:class:`~mvprep.options.BuildOptions` and the retry policy, never image bytes: a task reads
its own records from the data file and its images (both at the same path on every node, e.g.
a shared file system, or URLs in an object store) and writes its shard and index entry into
the output folder (or bucket) itself. Only the index entry (rows of numbers and the
rejects) comes back to the driver. The data files are indexed once, by the driver: their
record offsets go into Ray's object store once and every task adopts them (zero-copy), so
no worker scans a file.

Failures, the same rules as the local pool (:mod:`mvprep.pool`):

* a worker that dies (OOM killer, segfault, lost node) is retried by Ray (``max_retries``);
  the unit's attempt journal (:mod:`mvprep.runners.journal`) tells the next attempt which
  record the dead one was on, so a record that kills workers ``record_deaths`` times is
  rejected as "worker died" and a unit that keeps dying with no record to blame is given up
  (its records rejected by :func:`mvprep.build.build`);
* ``OSError`` (a flaky network file system) is retried too (``retry_exceptions``), at most
  :data:`IO_TRIES` times; any other exception fails the unit, as in the local pool;
* ``--unit-timeout``: the driver cancels a unit whose current attempt has run longer
  (``ray.cancel(force=True)`` kills its worker) and submits it again, counted as a death;
* bad input never reaches Ray: :func:`mvprep.unit.run_unit` turns it into rejects.

A killed attempt leaves at most ``NNNNNN.tar.tmp`` (never a shard); the next attempt
rewrites the whole shard, so there is no partial shard and no duplicate sample.

Ray is imported only here, only when this runner is used (``pip install 'mvkit[ray]'``).
A local Ray (no address) is started quietly: no dashboard, no usage stats, loopback only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from mvprep.inputs import adopt_inputs, open_inputs, share_inputs
from mvprep.options import BuildOptions
from mvprep.pool import RetryPolicy, UnitOutcome
from mvprep.readers import SharedOffsets
from mvprep.runners.journal import Journal, journal_path, mark_timeout, running_since
from mvprep.unit import FAULT_ENV, UnitEvents, UnitSpec, run_unit
from mvshards.storage import StorageError, location

IO_TRIES = 3
"""Attempts of a unit that raise OSError before the error fails the unit."""
POLL_SECONDS = 0.5
WINDOW_REFRESH_SECONDS = 30.0
LOCAL_OBJECT_STORE_BYTES = 256 << 20
"""Object store of a local Ray: only index entries travel through it."""

_QUIET_LOCAL_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # read at import: bind the node to 127.0.0.1
    "RAY_AUTH_MODE": "token",  # Ray's default for a new local cluster, set to skip its notice
}


class RayUnavailableError(RuntimeError):
    """``--runner ray`` was asked for but Ray is not installed."""


class UnitIOError(RuntimeError):
    """A unit kept failing with OSError; not retried any more."""


class UnitStorageError(RuntimeError):
    """A unit failed with a :class:`mvshards.storage.StorageError` (already retried by the
    storage layer): not retried by Ray, and the build stops with its one line."""


def ray_installed() -> bool:
    """True when ``import ray`` would work (checked without importing it)."""
    return importlib.util.find_spec("ray") is not None


def import_ray(local: bool = True) -> Any:
    """``import ray``; when ``local`` and Ray is not imported yet, set the quiet local-cluster
    environment first (Ray reads it at import: set later, the driver and the cluster it
    starts would disagree, e.g. on token authentication)."""
    if local and "ray" not in sys.modules:
        for key, value in _QUIET_LOCAL_ENV.items():
            os.environ.setdefault(key, value)
    try:
        import ray
    except ImportError:
        raise RayUnavailableError(
            "--runner ray needs Ray: pip install 'mvkit[ray]' (or pip install 'ray>=2.40'); "
            "or use the default local runner"
        ) from None
    return ray


def start_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to ``address`` or start a quiet local Ray with ``num_cpus`` CPUs.

    Returns True when this call started or connected Ray (the caller shuts it down), False
    when Ray was already initialised in this process (it is then used as it is).
    """
    ray = import_ray(local=address is None)
    if ray.is_initialized():
        return False
    common = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address is None:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            **common,
        )
    else:
        ray.init(address=address, **common)
    return True


def _unit_task(
    spec: UnitSpec,
    options: BuildOptions,
    policy: RetryPolicy,
    offsets: list[SharedOffsets] | None,
    fault: str | None,
) -> tuple[str, Any, list[str]]:
    """Body of the Ray task: ``("done", entry, deaths)`` or ``("gave_up", why, deaths)``."""
    if offsets is not None:  # the driver's index of the data files: no re-scan here
        adopt_inputs(offsets, options.data_paths)
    if fault:  # tests only: the driver's fault injection travels with the task
        os.environ[FAULT_ENV] = fault
    else:
        os.environ.pop(FAULT_ENV, None)
    journal = Journal(location(options.out_dir), spec.unit)
    try:
        history = journal.begin(policy)
    except OSError as exc:  # the output folder is not writable from this node: no retry
        raise UnitIOError(
            f"unit {spec.unit}: cannot write {journal.path} ({type(exc).__name__}: {exc}); "
            f"check the output folder {options.out_dir} on every node (mount, permissions)"
        ) from exc
    try:
        if history.gave_up is not None:
            journal.end()
            return "gave_up", history.gave_up, history.deaths
        skip = {**spec.skip, **history.skips}
        events = UnitEvents(on_record=journal.record, on_record_done=journal.record_done)
        try:
            entry = run_unit(UnitSpec(spec.unit, spec.start, spec.stop, skip), options, events)
        except StorageError as exc:  # an OSError, but retried already: never again by Ray
            journal.end()
            raise UnitStorageError(str(exc)) from None
        except OSError as exc:
            tries = journal.io_error()
            if tries >= IO_TRIES:
                raise UnitIOError(
                    f"unit {spec.unit}: {type(exc).__name__}: {exc} ({tries} attempts); check "
                    f"the output folder {options.out_dir} (space, permissions, mount)"
                ) from exc
            raise
        journal.finish()
        return "done", entry, history.deaths
    finally:
        journal.close()


@dataclass
class _Flight:
    spec: UnitSpec
    submitted: float
    cancelled: bool = False


class RayRunner:
    """Runs units as Ray tasks; same interface as :class:`mvprep.pool.UnitPool`.

    ``workers`` is the CPU count of a local Ray (ignored with ``address``: the cluster
    decides). Progress callbacks fire when a unit's result arrives.
    """

    def __init__(
        self,
        workers: int,
        options: BuildOptions,
        policy: RetryPolicy | None = None,
        address: str | None = None,
        on_image: Callable[[], None] = lambda: None,
        on_record_done: Callable[[], None] = lambda: None,
        on_death: Callable[[UnitSpec, str], None] = lambda spec, why: None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"--workers must be >= 1, got {workers}")
        self.workers, self.options, self.address = workers, options, address
        self.policy = policy or RetryPolicy()
        self.on_image, self.on_record_done, self.on_death = on_image, on_record_done, on_death
        self.out = location(options.out_dir)

    def max_retries(self, spec: UnitSpec) -> int:
        """Ray retries of one task: enough for the journal to decide first in every case."""
        records = spec.stop - spec.start
        return self.policy.unit_deaths + self.policy.record_deaths * records + IO_TRIES

    def run(self, specs: list[UnitSpec]) -> Iterator[UnitOutcome]:
        """Submit the units (at most :meth:`window` at a time), yield each outcome as it comes."""
        if not specs:
            return
        ray = import_ray(local=self.address is None)
        started_here = start_ray(self.address, self.workers)
        flights: dict[Any, _Flight] = {}
        try:
            remote = ray.remote(_unit_task)
            fault = os.environ.get(FAULT_ENV) or None
            offsets = ray.put(share_inputs(open_inputs(self.options.data_paths)))

            def submit(spec: UnitSpec) -> None:
                ref = remote.options(
                    num_cpus=1,
                    max_retries=self.max_retries(spec),
                    retry_exceptions=[OSError],
                    name=f"mvprep-unit-{spec.unit}",
                ).remote(spec, self.options, self.policy, offsets, fault)
                flights[ref] = _Flight(spec, time.monotonic())

            pending = list(reversed(specs))
            limit, next_window = self.window(ray), time.monotonic() + WINDOW_REFRESH_SECONDS
            next_deadline_check = 0.0
            while pending or flights:
                while pending and len(flights) < limit:
                    submit(pending.pop())
                refs = list(flights)
                ready, _ = ray.wait(refs, num_returns=1, timeout=POLL_SECONDS, fetch_local=False)
                if ready:
                    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                for ref in ready:
                    flight = flights.pop(ref)
                    outcome = self._collect(ray, ref, flight)
                    if outcome is None:
                        submit(flight.spec)
                    else:
                        yield outcome
                now = time.monotonic()
                if self.policy.unit_timeout is not None and now > next_deadline_check:
                    self._enforce_deadline(ray, flights)
                    next_deadline_check = now + min(self.policy.unit_timeout / 4, 5)
                if now > next_window:  # an autoscaling cluster grows: follow it
                    limit, next_window = self.window(ray), now + WINDOW_REFRESH_SECONDS
        finally:
            for ref in flights:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            if started_here:
                ray.shutdown()

    def window(self, ray: Any) -> int:
        """Tasks kept submitted at once: twice the cluster's CPUs (so a CPU that frees up
        finds work at once, while the driver tracks few tasks and deadlines stay cheap)."""
        cpus = ray.cluster_resources().get("CPU", self.workers)
        return max(4, int(2 * cpus))

    def _collect(self, ray: Any, ref: Any, flight: _Flight) -> UnitOutcome | None:
        """The outcome of a finished task; None when it must be submitted again."""
        spec = flight.spec
        try:
            kind, payload, deaths = ray.get(ref)
        except ray.exceptions.RayError as exc:
            if flight.cancelled:  # our deadline killed it: the journal counts the death
                return None
            if isinstance(exc, ray.exceptions.RayTaskError):  # the unit itself raised
                cause = getattr(exc, "cause", None)
                if isinstance(cause, UnitStorageError):
                    return UnitOutcome(spec=spec, failure=str(cause), storage_error=str(cause))
                return UnitOutcome(spec=spec, failure=str(exc))
            why = (
                f"unit {spec.unit}: Ray gave up after {self.max_retries(spec) + 1} attempts "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            )
            self.on_death(spec, why)
            journal_path(self.out, spec.unit).unlink(missing_ok=True)
            return UnitOutcome(spec=spec, failure=why, deaths=[why], gave_up=True)
        for note in deaths:
            self.on_death(spec, note)
        if kind == "gave_up":
            journal_path(self.out, spec.unit).unlink(missing_ok=True)
            return UnitOutcome(spec=spec, failure=payload, deaths=deaths, gave_up=True)
        for _ in range(int(payload.stats.get("images", 0))):
            self.on_image()
        for _ in range(spec.stop - spec.start):
            self.on_record_done()
        return UnitOutcome(spec=spec, result=payload, deaths=deaths)

    def _enforce_deadline(self, ray: Any, flights: dict[Any, _Flight]) -> None:
        """Cancel tasks whose current attempt has run past ``unit_timeout``."""
        timeout = self.policy.unit_timeout
        assert timeout is not None
        now_mono, now_wall = time.monotonic(), time.time()
        for ref, flight in flights.items():
            if flight.cancelled or now_mono - flight.submitted < timeout:
                continue
            since = running_since(self.out, flight.spec.unit)  # None: queued, not started
            if since is not None and now_wall - since > timeout:
                mark_timeout(self.out, flight.spec.unit, timeout)
                ray.cancel(ref, force=True)
                flight.cancelled = True
