"""The node network: how soon status shows a guest's address after its DHCP lease, measured against the
lease itself (libvirt's lease table, polled every POLL seconds by the benchmark on its own connection).

The pod → Service → VM comparison needs cluster mode's pods: ``python -m bench.service_path``.
"""

from __future__ import annotations

import threading
import time

import libvirt

from bench.common import Bench, Result, create, delete_all, instance, list_version, percentile, watch
from kubenova.driver.base import stable_mac
from testground import libvirt_host

POLL = 0.02


def _lease_seen(uri: str, network: str, mac: str, found: dict[str, float], stop: threading.Event) -> None:
    conn = libvirt.open(uri)
    try:
        net = conn.networkLookupByName(network)
        while not stop.is_set():
            if any(lease["mac"] == mac for lease in net.DHCPLeases()):
                found[mac] = time.monotonic()
                return
            time.sleep(POLL)
    finally:
        conn.close()


def _one(bench: Bench, name: str) -> tuple[float, float]:
    """(apply → lease, lease → status.ipAddresses) of one instance, in seconds."""
    version = list_version(bench)
    started = time.monotonic()
    uid = create(bench, instance(name, node=bench.ground.node))  # the node whose leases are polled
    mac = stable_mac(uid, "default")
    found: dict[str, float] = {}
    stop = threading.Event()
    poller = threading.Thread(
        target=_lease_seen,
        args=(libvirt_host.uri(bench.ground.layout, bench.ground.node), "kubenova", mac, found, stop),
        daemon=True,
    )
    poller.start()
    try:
        for event in watch(bench, version, 180, field_selector=f"metadata.name={name}"):
            if (event["object"].get("status") or {}).get("ipAddresses"):
                shown = time.monotonic()
                break
        else:
            raise TimeoutError(f"{name} got no address in status")
    finally:
        stop.set()
        poller.join(5)
    if mac not in found:
        raise TimeoutError(f"the lease of {name} never showed in libvirt")
    return found[mac] - started, shown - found[mac]


def run(bench: Bench, runs: int) -> Result:
    leases, shown = [], []
    try:
        for index in range(runs):
            lease, status = _one(bench, f"lease-{index}")
            leases.append(lease)
            shown.append(status)
    finally:
        delete_all(bench)
    lines = [
        f"{runs} instances on node-0's default network, one at a time. The lease is seen by polling "
        f"libvirt's lease table every {POLL * 1000:.0f} ms on the benchmark's own connection; status is "
        "seen through a watch. Target: the address in status within 2 s of the lease.",
        "",
        "| | p50 | max |",
        "| --- | --- | --- |",
        f"| apply → DHCP lease (boot, DHCP) | {percentile(leases, 50):.2f} s | {max(leases):.2f} s |",
        f"| lease → status.ipAddresses | {percentile(shown, 50):.2f} s | {max(shown):.2f} s |",
        "",
        f"Target {'met' if max(shown) <= 2 else 'missed'}: the slowest took {max(shown):.2f} s. "
        "The agent reads the leases every 0.5 s and looks at the instance whose lease changed.",
        "",
        "Pod → Service → VM next to pod → Service → pod: cluster mode, `python -m bench.service_path`, "
        "in [benchmarks-network.md](benchmarks-network.md).",
    ]
    return Result(
        "Node network: lease to status",
        lines,
        {"lease_s": leases, "status_after_lease_s": shown},
    )
