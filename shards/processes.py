"""Child processes that cannot outlive the command that started them (build workers,
training ranks): a ``kill -9`` of the parent must not leave orphans writing into its output."""

from __future__ import annotations

import ctypes
import signal
import sys

PR_SET_PDEATHSIG = 1
"""``prctl`` option: the signal Linux sends a process when its parent thread dies."""


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (a ``preexec_fn``, or the first
    call of a forked worker). Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:
            pass
