"""Driver spawn → running, and → the guest's boot marker, against raw virDomainCreateXML of the same XML.

Run: python -m bench.driver_spawn [--runs N]. Starts the test ground if needed (no kubenova
processes). Prints a markdown table; each row shows kubenova's figure, the raw-libvirt
baseline measured in the same run, and their ratio.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
import time
import uuid
import xml.etree.ElementTree as ET

import libvirt

from bench.common import console_at
from kubenova.driver.base import InstanceSpec, KernelBoot
from kubenova.driver.images import ImageStore
from kubenova.driver.libvirt.driver import LibvirtDriver
from testground import ground as testground
from testground import guest


def wait_marker(path: pathlib.Path, started: float, timeout: float = 120) -> float:
    deadline = started + timeout
    while time.monotonic() < deadline:
        if path.exists() and guest.BOOT_MARKER in path.read_text(errors="replace"):
            return time.monotonic() - started
        time.sleep(0.01)
    raise TimeoutError(f"no boot marker in {path}")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def row(name: str, ours: list[float], raw: list[float]) -> str:
    cells = []
    for p in (50, 95, 100):
        a, b = percentile(ours, p), percentile(raw, p)
        cells.append(f"{a * 1000:.0f} / {b * 1000:.0f} ({a / b:.2f}×)")
    return f"| {name} | " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> None:
    args = argparse.ArgumentParser(description=__doc__)
    args.add_argument("--runs", type=int, default=10)
    opts = args.parse_args(argv)
    ground = testground.up(start_kubenova_processes=False)
    root = ground.node_dir() / "bench"
    shutil.rmtree(root, ignore_errors=True)
    store = ImageStore(ground.image_store)
    driver = LibvirtDriver(ground.libvirt_uri, "qemu", root / "instances", store, root / "volumes")
    driver.init_host(ground.node)
    conn = libvirt.open(ground.libvirt_uri)
    boot = KernelBoot(store.resolve("k", guest.KERNEL), store.resolve("i", guest.INITRD), guest.CMDLINE)
    spawn_t, spawn_m, raw_t, raw_m = [], [], [], []
    for i in range(opts.runs):
        spec = InstanceSpec(
            uuid=str(uuid.uuid4()), name=f"bench-{i}", namespace="bench", vcpus=1, memory_mib=128, boot=boot
        )
        started = time.monotonic()
        driver.spawn(spec)
        spawn_t.append(time.monotonic() - started)
        spawn_m.append(wait_marker(driver.console_path(spec.uuid), started))
        xml = ET.fromstring(conn.lookupByUUIDString(spec.uuid).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        driver.destroy(spec.uuid)
        # The identical definition, under a new identity, started the raw way.
        xml.find("uuid").text = str(uuid.uuid4())  # type: ignore[union-attr]
        xml.find("name").text = f"bench_raw-{i}"  # type: ignore[union-attr]
        console = root / f"raw-{i}.log"
        console_at(xml, console)
        started = time.monotonic()
        dom = conn.createXML(ET.tostring(xml, encoding="unicode"), 0)
        raw_t.append(time.monotonic() - started)
        raw_m.append(wait_marker(console, started))
        dom.destroy()
    conn.close()
    shutil.rmtree(root, ignore_errors=True)
    print(f"driver spawn vs raw libvirt createXML, {opts.runs} runs each, ms (kubenova / raw (ratio))\n")
    print("| step | p50 | p95 | max |\n| --- | --- | --- | --- |")
    print(row("spawn → running", spawn_t, raw_t))
    print(row("spawn → boot marker", spawn_m, raw_m))
    print(f"\noverhead p50: {(statistics.median(spawn_t) - statistics.median(raw_t)) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
