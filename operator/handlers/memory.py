"""glibc's allocator, told to keep less memory for a long-lived Python process with many threads.

Python's own allocator serves small objects from its arenas; everything larger (a watch event's JSON,
a domain's XML, a status body) comes from glibc's malloc. glibc gives each thread that allocates an arena
of its own (up to eight per CPU) and keeps what is freed in each for reuse, so a process whose dozen
threads each once parsed a list of instances holds a dozen partly empty heaps. Two arenas are plenty for
threads that mostly wait on sockets, and a trim after periodic work hands back what a burst left behind.
Where the C library is not glibc, both are no-ops.
"""

from __future__ import annotations

import ctypes
import functools
import logging

log = logging.getLogger(__name__)
#: mallopt's parameter number for the most arenas (glibc's malloc.h).
M_ARENA_MAX = -8
#: Arenas for the whole process: one for the event loop, one shared by the worker threads.
ARENAS = 2


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:  # by its soname: ctypes.util.find_library would run ldconfig, which the image has not
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (both exist: this is glibc)
    except (OSError, AttributeError):
        return None
    return libc


def limit_arenas(arenas: int = ARENAS) -> None:
    """At start-up, before any thread: arenas made later are shared by threads (glibc's
    MALLOC_ARENA_MAX, set from inside, so every way of starting kubenova gets it)."""
    libc = _glibc()
    if libc is not None and not libc.mallopt(M_ARENA_MAX, arenas):
        log.warning("mallopt(M_ARENA_MAX, %d) was refused", arenas)


def trim() -> None:
    """Hand the free pages of every arena back to the kernel (glibc's malloc_trim(0))."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
