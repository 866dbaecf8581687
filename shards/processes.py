"""Set-up of the processes that do the work (build workers, training ranks, loader workers):
they cannot outlive the command that started them (a ``kill -9`` of the parent must not leave
orphans writing into its output), and the ones that fill pixel buffers keep freed memory."""

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


def keep_freed_memory(mmap_threshold: int, trim_threshold: int) -> bool:
    """Make glibc's malloc keep freed blocks of up to ``mmap_threshold`` bytes for reuse, and
    up to ``trim_threshold`` bytes of freed heap before handing memory back; True when it
    took, False where there is no glibc ``mallopt`` (nothing changes).

    By default glibc serves each multi-MB pixel buffer (a decoded photo, a micro-batch's
    pixel pack) with a fresh ``mmap`` and unmaps it when freed, so every image pays its page
    faults again: the kernel zeroing MBs, 8-16 ms of CPU per 12 MP photo in
    ``scripts/bench_prep.py``, about a sixth of the loader's time per sample in
    ``scripts/bench_loader.py``. Output bytes never change.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no glibc here
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc <malloc.h>
    mmap_set = mallopt(m_mmap_threshold, mmap_threshold) == 1
    trim_set = mallopt(m_trim_threshold, trim_threshold) == 1
    return mmap_set and trim_set
