"""glibc's allocator settings: taken here (a glibc machine), and a trim hands freed heap back."""

from __future__ import annotations

import logging
import threading

import pytest

from kubenova.handlers import memory


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1])


def test_the_arena_limit_is_taken(caplog: pytest.LogCaptureFixture) -> None:
    assert memory._glibc() is not None
    with caplog.at_level(logging.WARNING):
        memory.limit_arenas()
    assert not caplog.records


def test_a_trim_returns_what_threads_freed() -> None:
    """Blocks of 4 KiB (above Python's small-object allocator, below glibc's mmap threshold) freed
    in another thread's arena stay in the process until a trim."""

    def churn() -> None:
        blocks = [bytearray(4096) for _ in range(20_000)]  # about 80 MiB
        del blocks

    worker = threading.Thread(target=churn)
    worker.start()
    worker.join()
    before = rss_kib()
    memory.trim()
    assert rss_kib() < before - 10_000
