"""The fake driver's guest simulator: what a guest prints on its serial console, its clock, its counters.

It prints the same lines as the real test guest (testground/guest.py), so one conformance test
reads both drivers. Nothing runs on a timer: the ticks are derived from the clock when the console
is read, or when a new line has to go after them, which is what keeps a thousand guests free.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import re
from collections.abc import Iterable, Mapping

from kubenova.driver.base import InterfaceStats, KernelBoot

# The console lines of the real test guest (testground/guest.py), so one conformance test
# reads both drivers.
BOOT_MARKER = "KUBENOVA-GUEST-BOOTED"
RESCUE_MARKER = "KUBENOVA-RESCUE-BOOTED"
TICK = "kubenova-guest-tick"
DISK_LINE = "kubenova-disk"
CD_FILE_LINE = "kubenova-cd-file"
NET_LINE = "kubenova-net"
#: The guest prints its eth0's MAC before tick 0 and every MAC_EVERY ticks after it.
MAC_LINE, MAC_EVERY = "kubenova-mac", 10
WROTE_LINE = "kubenova-wrote"
#: ``kubenova.write=<dev>:<pattern>`` on the kernel command line: once per boot the guest
#: writes <pattern> at the start of the disk that is (or appears) at <dev>, so tests see
#: guest writes land. Like the real guest, only the last such argument counts, and a
#: malformed one switches the hook off.
WRITE_HOOK = "kubenova.write="
#: ``kubenova.dirty=<MiB>``: the guest rewrites that much of its memory over and over (the real guest's hook),
#: faster than any capped link carries it, so a live transfer's pre-copy never catches up on its own.
DIRTY_HOOK = "kubenova.dirty="
_HOOK_DEVICE = re.compile(r"[a-z0-9]+")
_HOOK_PATTERN = re.compile(r"[A-Za-z0-9-]+")

# The simulated guest's I/O, so counters move the way a real guest's do: at every boot it reads
# the first sector of each disk and makes one DHCP exchange per interface; every second it runs
# it sends and receives one minimal Ethernet frame per interface.
DHCP_BYTES = 342
FRAME_BYTES = 64
#: The test guest sleeps nearly all the time.
CPU_SHARE = 0.01


@dataclasses.dataclass
class Ticks:
    """A run of tick lines kept as two numbers, so a guest running for days costs no memory."""

    first: int
    stop: int
    #: the MAC the guest prints every MAC_EVERY ticks, when it has an eth0
    mac: str | None = None

    def render(self) -> str:
        return "".join(
            (f"{MAC_LINE} eth0 {self.mac}\n" if self.mac and n % MAC_EVERY == 0 else "") + f"{TICK} {n}\n"
            for n in range(self.first, self.stop)
        )


@dataclasses.dataclass
class Guest:
    """The simulated guest: its serial console and how long it has run.

    No timer prints the ticks: they are derived from the clock when the console is read, or
    when a new line has to go after them. That is what keeps a thousand guests free.
    """

    console: list[str | Ticks] = dataclasses.field(default_factory=list)
    boots: int = 0
    #: running seconds of this boot before ``running_since``
    ran: float = 0.0
    running_since: float | None = None
    #: ticks of this boot already on the console
    ticks: int = 0
    #: running seconds of all earlier boots; the network counters keep growing across boots
    ran_before: float = 0.0
    #: whether the write hook has fired in this boot (the guest tries once per boot)
    wrote: bool = False
    #: the MAC of the guest's eth0, None without interfaces
    mac: str | None = None

    def seconds(self, now: float) -> float:
        return self.ran + (now - self.running_since if self.running_since is not None else 0.0)

    def lifetime_seconds(self, now: float) -> float:
        return self.ran_before + self.seconds(now)

    def flush(self, due: int) -> None:
        """Put ticks up to (not including) ``due`` on the console."""
        if not self.boots or due <= self.ticks:
            return
        last = self.console[-1] if self.console else None
        if isinstance(last, Ticks) and last.stop == self.ticks and last.mac == self.mac:
            last.stop = due
        else:
            self.console.append(Ticks(self.ticks, due, self.mac))
        self.ticks = due

    def print(self, now: float, line: str) -> None:
        """The guest prints tick N at second N and acts between ticks: a line goes before the next tick."""
        self.flush(math.ceil(self.seconds(now)))
        self.console.append(line + "\n")

    def boot(self, now: float, lines: Iterable[str]) -> None:
        self.stop(now)
        self.ran_before += self.ran
        self.ran, self.ticks = 0.0, 0
        self.boots += 1
        self.wrote = False
        self.console.append("".join(line + "\n" for line in lines))
        self.running_since = now

    def stop(self, now: float) -> None:
        if self.running_since is None:
            return
        self.flush(math.floor(self.seconds(now)) + 1)
        self.ran += now - self.running_since
        self.running_since = None

    def run(self, now: float) -> None:
        if self.running_since is None:
            self.running_since = now

    def render(self, now: float) -> str:
        self.flush(math.floor(self.seconds(now)) + 1)
        return "".join(part if isinstance(part, str) else part.render() for part in self.console)

    def report_write(self, now: float, device: str, pattern: str) -> None:
        """The line the write hook prints once its write landed."""
        self.print(now, f"{WROTE_LINE} {device} {pattern}")

    def cpu_time_ns(self, now: float) -> int:
        """The CPU time of this boot: the guest sleeps nearly all the time (CPU_SHARE)."""
        return int(self.seconds(now) * CPU_SHARE * 1e9)

    def interface_stats(self, now: float) -> InterfaceStats:
        """Every interface carries the same simulated traffic (see DHCP_BYTES and FRAME_BYTES)."""
        seconds = math.floor(self.lifetime_seconds(now))
        packets = self.boots + seconds
        octets = self.boots * DHCP_BYTES + seconds * FRAME_BYTES
        return InterfaceStats(
            rx_bytes=octets,
            rx_packets=packets,
            rx_errs=0,
            rx_drop=0,
            tx_bytes=octets,
            tx_packets=packets,
            tx_errs=0,
            tx_drop=0,
        )


def parse_write_hook(boot: KernelBoot | None) -> tuple[str, str] | None:
    hooks = [
        arg.removeprefix(WRITE_HOOK).partition(":")
        for arg in (boot.cmdline.split() if boot else ())
        if arg.startswith(WRITE_HOOK) and ":" in arg
    ]
    if not hooks:
        return None
    device, _, pattern = hooks[-1]
    if not _HOOK_DEVICE.fullmatch(device) or not _HOOK_PATTERN.fullmatch(pattern):
        return None
    return device, pattern


def parse_dirty_hook(boot: KernelBoot | None) -> int:
    """The MiB the guest keeps rewriting: the last hook's; 0 without one, or with a malformed one (which the
    real guest ignores)."""
    values = [
        arg.removeprefix(DIRTY_HOOK)
        for arg in (boot.cmdline.split() if boot else ())
        if arg.startswith(DIRTY_HOOK)
    ]
    return int(values[-1]) if values and values[-1].isdecimal() else 0


def boot_lines(
    rescue: bool, disks: Iterable[tuple[str, int, str]], drive: Mapping[str, bytes], network: bool
) -> list[str]:
    """What the guest prints as it boots: its marker, each disk's ``(device, sectors, head)`` in device order,
    every file of its config drive (``drive``, empty without one) and, with interfaces, its network."""
    lines = [f"{RESCUE_MARKER if rescue else BOOT_MARKER} kernel=fake"]
    lines += [f"{DISK_LINE} {name} sectors={sectors} head={head}" for name, sectors, head in sorted(disks)]
    lines += [
        f"{CD_FILE_LINE} {path} {base64.b64encode(data).decode()}" for path, data in sorted(drive.items())
    ]
    if network:
        lines.append(f"{NET_LINE} eth0 up")
    return lines
