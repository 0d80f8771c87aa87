"""Rewrites of a whole domain definition that keep what libvirt wrote into it: the rescue definition, and
the definition a live migration's target runs the moving guest with.

Each starts from a definition libvirt has already accepted (the domain's own, or the target's), changes
only what it must, and goes through ElementTree like config.py.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from kubenova.driver.base import DriverError
from kubenova.driver.libvirt.config import GuestAgentChannel, GuestDisk, sub_element

_TARGET = re.compile(r"^(vd|sd)([a-z])$")


def rescue_definition(original: str, rescue_disk: str) -> str:
    """The domain ``original`` booting ``rescue_disk`` (as vda) by BIOS, with its own disks moved one name on.

    Everything else of the definition stays as libvirt wrote it; the device addresses go, so libvirt
    assigns them afresh around the new first disk.
    """
    root = ET.fromstring(original)
    os_el = root.find("os")
    if os_el is None:
        raise DriverError("the domain definition has no <os>")
    for tag in ("kernel", "initrd", "cmdline", "boot"):
        for el in os_el.findall(tag):
            os_el.remove(el)
    sub_element(os_el, "boot", dev="hd")
    devices = root.find("devices")
    if devices is None:
        raise DriverError("the domain definition has no <devices>")
    for target in devices.findall("disk/target"):
        match = _TARGET.match(target.get("dev", ""))
        if match:  # make room for the rescue disk in front
            target.set("dev", match.group(1) + chr(ord(match.group(2)) + 1))
    for disk in devices.findall("disk"):
        address = disk.find("address")
        if address is not None:
            disk.remove(address)
    devices.insert(0, GuestDisk(source=rescue_disk, target="vda").format_dom())
    return ET.tostring(root, encoding="unicode")


def migration_definition(target: str, running: str) -> str:
    """The target's definition (``target``) as the moving guest must arrive in it: with the <cpu> the guest
    runs with now (``running``, its migratable XML), and without the guest agent's channel where the guest
    was started without one. A guest's CPU and its devices cannot change under it: a host-model guest's
    CPU was expanded on the source at its start, and re-expanding it on the target would give it another
    one mid-run (libvirt refuses what breaks the guest's ABI; a CPU it may let through). Everything else,
    paths, networks, filters and metadata, stays the target's own, which the target's qemu hook checks.

    Only the running definition changes: the target keeps its own for the next boot (``PERSIST_XML``), so
    the guest gets the channel and a CPU of the target's at its next boot there.
    """
    dest, live = ET.fromstring(target), ET.fromstring(running)
    cpu = live.find("cpu")
    children = list(dest)
    old = dest.find("cpu")
    if old is not None:
        dest.remove(old)
    if cpu is not None:
        dest.insert(children.index(old) if old is not None else len(children), cpu)
    devices = dest.find("devices")
    if GuestAgentChannel.find(live) is None and devices is not None:
        for channel in devices.findall("channel"):
            if GuestAgentChannel.target_of(channel) is not None:
                devices.remove(channel)
    return ET.tostring(dest, encoding="unicode")
