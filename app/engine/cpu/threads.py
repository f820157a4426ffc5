"""Torch CPU threads: an engine thread owns the process's only multi-threaded OpenMP team.

PyTorch's CPU kernels run on OpenMP (libgomp). libgomp keeps a pool of worker threads for every
thread that ever ran a parallel region with more than one thread, and once the process has more
of those threads than CPUs it stops spinning between regions: each of a decode step's ~100
parallel regions then waits for its workers to be woken. On the 2-core CI machine a tiny.en
5-row decode step took 15 ms on a thread that owned the only team and 34 ms as soon as one other
thread (the event loop, an audio helper, the loader) had run a multi-threaded op.

So the process default is one thread, every helper thread inherits it, and only an engine's
decode-loop thread raises its own count. libgomp's `omp_set_num_threads` sets the count for the
calling thread alone; `torch.set_num_threads` also changes the default that threads started later
take, which is why the engine thread does not use it when libgomp can be found.
"""

from __future__ import annotations

import ctypes
import logging
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

#: intra-op threads torch chose for this machine (physical cores) before anything changed it
DEFAULT_THREADS = torch.get_num_threads()


@cache
def _libgomp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded (None on builds that bundle another one)."""
    lib_dir = Path(torch.__file__).parent / "lib"
    for path in sorted(lib_dir.glob("libgomp*.so*")):
        try:
            return ctypes.CDLL(str(path))  # already loaded by torch: the same handle
        except OSError:
            continue
    return None


def confine_to_one_thread() -> None:
    """This thread, and every thread started after it that has not run torch yet, use one thread."""
    torch.set_num_threads(1)
    torch.get_num_threads()  # consumes torch's lazy per-thread initialisation now, with 1


def become_engine_thread(threads: int) -> int:
    """Give the calling thread `threads` intra-op threads (0: DEFAULT_THREADS); other threads keep
    one. Call first thing on the engine's own thread. Returns the count in effect."""
    threads = threads or DEFAULT_THREADS
    gomp = _libgomp()
    if gomp is None:
        log.debug("libgomp not found next to torch; using torch.set_num_threads(%d) process-wide", threads)
        torch.set_num_threads(threads)
        return torch.get_num_threads()
    confine_to_one_thread()
    gomp.omp_set_num_threads(threads)
    return torch.get_num_threads()
