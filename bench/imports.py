"""Image imports: the importer's throughput next to curl of the same file from the same server, and
apply → Running of an instance whose image must be downloaded next to a second one of the cached image."""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
import time
import uuid
from typing import Any

from bench.common import Bench, Result, apply_and_wait, delete_all, percentile
from kubenova.driver.imports import Importer
from kubenova.handlers.shared import GROUP, VERSION
from testground import guest
from testground import served as testground_served

#: The file the throughput runs fetch: large enough that set-up costs vanish, small enough for tmpfs.
THROUGHPUT_MIB = 512


def _unique(served: testground_served.Served, source: pathlib.Path | None, mib: int = 0) -> tuple[str, str]:
    """A file no node has cached, in the servers' folder: a copy of ``source`` with bytes of its own, or
    ``mib`` MiB of random data; its name and sha256."""
    name = f"bench-{uuid.uuid4().hex[:8]}.{'qcow2' if source else 'raw'}"
    path = served.root / name
    if source:
        shutil.copyfile(source, path)
    with path.open("ab") as f:
        f.write(os.urandom(mib << 20 if mib else 512))
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return name, digest.hexdigest()


def _throughput(served: testground_served.Served, runs: int) -> tuple[list[float], list[float], int]:
    """Seconds per fetch of one file: the importer (streamed, hashed, fsynced, inspected) and curl -o."""
    name, digest = _unique(served, None, THROUGHPUT_MIB)
    size = (served.root / name).stat().st_size
    ours, curl = [], []
    try:
        for _ in range(runs + 1):  # the first round warms the server's page cache and pools: not counted
            with tempfile.TemporaryDirectory(dir=served.root.parent) as tmp:
                started = time.monotonic()
                subprocess.run(["curl", "-sSf", "-o", f"{tmp}/out", served.url(name)], check=True)
                curl.append(time.monotonic() - started)
                os.sync()  # curl leaves its file dirty; the importer's fsync must not pay for it
            with tempfile.TemporaryDirectory(dir=served.root.parent) as tmp:
                importer = Importer(tmp, max_bytes=size + 1)
                started = time.monotonic()
                importer.fetch_url(served.url(name), f"sha256:{digest}")
                ours.append(time.monotonic() - started)
    finally:
        (served.root / name).unlink()
    return ours[1:], curl[1:], size


def _instance(name: str, url: str, digest: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VirtualInstance",
        "metadata": {"name": name},
        "spec": {
            "flavor": {"vcpus": 1, "memoryMiB": 96},
            "boot": {"image": {"url": url, "checksum": f"sha256:{digest}"}},
        },
    }


def run(bench: Bench, runs: int) -> Result:
    served = testground_served.info(bench.ground.layout)
    ours, curl, size = _throughput(served, runs)
    mib = size / 2**20
    ratio = percentile(curl, 50) / percentile(ours, 50)
    first, second = [], []
    for i in range(runs):
        name, digest = _unique(served, served.root / guest.DISK_IMAGE)
        first.append(apply_and_wait(bench, _instance(f"imp-{i}-a", served.url(name), digest))[0])
        second.append(apply_and_wait(bench, _instance(f"imp-{i}-b", served.url(name), digest))[0])
        delete_all(bench)
        (served.root / name).unlink()
    disk_mib = (served.root / guest.DISK_IMAGE).stat().st_size / 2**20
    lines = [
        f"{runs} fetches of a {mib:.0f} MiB file from the test ground's file server (loopback, plain HTTP), "
        "after one round not counted: kubenova's importer (streamed, sha256 on a second thread, fsync, "
        "`qemu-img info`) next to `curl -o` of the same file from the same server (no hash, no fsync), "
        "alternating.",
        "",
        "| | p50 s | MiB/s at p50 |",
        "| --- | --- | --- |",
        f"| importer | {percentile(ours, 50):.2f} | {mib / percentile(ours, 50):.0f} |",
        f"| curl | {percentile(curl, 50):.2f} | {mib / percentile(curl, 50):.0f} |",
        "",
        f"Throughput ratio importer / curl: {ratio:.2f} "
        f"(target ≥ 0.9: {'met' if ratio >= 0.9 else 'missed'}).",
        "",
        f"apply → Running of an instance booting a {disk_mib:.0f} MiB image by URL (the test disk, a copy no "
        "node has), then of a second instance of the same image on the same node (a cache hit: no download), "
        f"s, {runs} runs:",
        "",
        "| instance | p50 | max |",
        "| --- | --- | --- |",
        f"| first (downloads) | {percentile(first, 50):.2f} | {max(first):.2f} |",
        f"| second (cached) | {percentile(second, 50):.2f} | {max(second):.2f} |",
    ]
    return Result(
        "Image imports",
        lines,
        {
            "size_bytes": size,
            "importer_s": ours,
            "curl_s": curl,
            "first_running_s": first,
            "cached_running_s": second,
        },
    )
