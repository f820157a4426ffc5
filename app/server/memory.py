"""Give freed memory back to the operating system (glibc only; a no-op elsewhere).

A request for a long file allocates and frees hundreds of MB of sample blocks from worker
threads. glibc keeps freed memory in per-thread arenas (up to 8 per core) instead of returning
it, so RSS climbs under load and stays there. Fewer arenas and a `malloc_trim` after each
large request keep RSS near what is actually in use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

#: mallopt parameter numbers in glibc's malloc.h.
_M_ARENA_MAX = -8
_M_MMAP_THRESHOLD = -3
#: Allocations this large get their own mapping, returned to the OS when freed. Setting it
#: also stops glibc from raising the threshold after each large free (its default), which
#: moves big, short-lived buffers (batches of varying size) into the heap, where they fragment.
MMAP_THRESHOLD = 8 * 1024 * 1024
#: Arenas for the whole process: worker threads share them instead of each holding its own.
ARENA_MAX = 2
#: A request that held at least this much decoded audio triggers a trim when it ends.
TRIM_AFTER_BYTES = 16 * 1024 * 1024

_libc: ctypes.CDLL | None = None


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
        except OSError:
            libc = None
        if libc is None or not hasattr(libc, "malloc_trim") or not hasattr(libc, "mallopt"):
            return None
        _libc = libc
    return _libc


def limit_arenas(arenas: int = ARENA_MAX) -> None:
    """Cap malloc arenas (as MALLOC_ARENA_MAX would); call before worker threads start."""
    libc = _glibc()
    if libc is None:
        return
    if not libc.mallopt(_M_ARENA_MAX, arenas):
        log.debug("mallopt(M_ARENA_MAX) refused")
    if not libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        log.debug("mallopt(M_MMAP_THRESHOLD) refused")


def trim() -> None:
    """Return free heap memory to the OS (takes milliseconds; run it off the event loop)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
