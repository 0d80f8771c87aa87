"""The compute contract in memory: the libvirt driver's semantics without a hypervisor.

Two users shape it. Scale benchmarks run a thousand instances across twenty agents on two
cores, so an instance is a few small objects, with no thread, timer or sleep of its own.
Handler and conformance tests need to see what a guest would see, so a simulated guest
prints the same console lines as the real test guest (testground/guest.py), the instance
folder, config drive and image cache follow the libvirt driver's, and every time-dependent
behaviour reads an injectable clock, so tests move time instead of waiting.

The package, by role: ``guest`` is the guest simulator (console, clock, counters), ``disks`` the
storage model, ``instance`` one instance, ``serial`` the console's socket (a real one, which echoes);
FakeDriver (``driver``) stacks the layers over the host's state (``host``): ``instances`` (making and
booting), ``lifecycle``, ``access`` (console, guest agent and diagnostics), ``volumes`` and ``migration``.
"""

from __future__ import annotations

from kubenova.driver.fake.driver import FakeDriver
from kubenova.driver.fake.guest import (
    BOOT_MARKER,
    CD_FILE_LINE,
    DISK_LINE,
    MAC_EVERY,
    MAC_LINE,
    NET_LINE,
    RESCUE_MARKER,
    TICK,
    WRITE_HOOK,
    WROTE_LINE,
)

__all__ = [
    "FakeDriver",
    "BOOT_MARKER",
    "RESCUE_MARKER",
    "TICK",
    "DISK_LINE",
    "CD_FILE_LINE",
    "NET_LINE",
    "MAC_LINE",
    "MAC_EVERY",
    "WROTE_LINE",
    "WRITE_HOOK",
]
