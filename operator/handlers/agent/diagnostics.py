"""Diagnostics: Nova's get_diagnostics into each instance's status and onto a Prometheus endpoint."""

from __future__ import annotations

import logging
import threading
from typing import Any

import prometheus_client

from kubenova.driver.base import Diagnostics, DriverError, InstanceNotRunning
from kubenova.handlers.agent.instances import InstanceAgent
from kubenova.handlers.shared import now

log = logging.getLogger(__name__)

_LABELS = ("namespace", "name", "uid")


class Metrics:
    """The same figures as status.diagnostics, in a registry of the agent's own (no process globals)."""

    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        reg = self.registry
        self.cpu = prometheus_client.Gauge(
            "kubenova_instance_cpu_seconds", "CPU time the guest has used.", _LABELS, registry=reg
        )
        self.memory = prometheus_client.Gauge(
            "kubenova_instance_memory_bytes", "Memory the guest uses now.", _LABELS, registry=reg
        )
        self.disk = prometheus_client.Gauge(
            "kubenova_instance_disk_bytes",
            "Bytes read or written per disk.",
            (*_LABELS, "device", "direction"),
            registry=reg,
        )
        self.disk_requests = prometheus_client.Gauge(
            "kubenova_instance_disk_requests",
            "Read or write requests per disk.",
            (*_LABELS, "device", "direction"),
            registry=reg,
        )
        self.net = prometheus_client.Gauge(
            "kubenova_instance_network_bytes",
            "Bytes received or sent per interface.",
            (*_LABELS, "interface", "direction"),
            registry=reg,
        )
        self.instances = prometheus_client.Gauge(
            "kubenova_node_instances", "Instances bound to this node.", registry=reg
        )
        self.watch_events = prometheus_client.Counter(
            "kubenova_watch_events",
            "Watch events the agent received, by resource (the apiserver filters them "
            "by node, so they follow this node's own objects).",
            ("resource",),
            registry=reg,
        )
        self._series: dict[str, set[tuple[prometheus_client.Gauge, tuple[str, ...]]]] = {}

    def record(self, namespace: str, name: str, uid: str, diag: Diagnostics) -> None:
        labels = (namespace, name, uid)
        series = self._series.setdefault(uid, set())

        def put(gauge: prometheus_client.Gauge, value: float, *extra: str) -> None:
            gauge.labels(*labels, *extra).set(value)
            series.add((gauge, (*labels, *extra)))

        put(self.cpu, diag.cpu_time_ns / 1e9)
        put(self.memory, diag.memory_kib * 1024)
        for device, stats in diag.disks.items():
            for direction, value, requests in (
                ("read", stats.rd_bytes, stats.rd_req),
                ("write", stats.wr_bytes, stats.wr_req),
            ):
                put(self.disk, value, device, direction)
                put(self.disk_requests, requests, device, direction)
        for iface, counters in diag.interfaces.items():
            put(self.net, counters.rx_bytes, iface, "rx")
            put(self.net, counters.tx_bytes, iface, "tx")

    def tracked(self) -> set[str]:
        return set(self._series)

    def forget(self, uid: str) -> None:
        """Drop every series of an instance that is gone or stopped."""
        for gauge, labels in self._series.pop(uid, set()):
            gauge.remove(*labels)


def as_status(diag: Diagnostics) -> dict[str, Any]:
    return {
        "disks": [
            {
                "name": name,
                "rdReq": s.rd_req,
                "rdBytes": s.rd_bytes,
                "wrReq": s.wr_req,
                "wrBytes": s.wr_bytes,
                "errs": s.errs,
            }
            for name, s in sorted(diag.disks.items())
        ],
        "interfaces": [
            {
                "name": name,
                "rxBytes": s.rx_bytes,
                "rxPackets": s.rx_packets,
                "rxErrs": s.rx_errs,
                "rxDrop": s.rx_drop,
                "txBytes": s.tx_bytes,
                "txPackets": s.tx_packets,
                "txErrs": s.tx_errs,
                "txDrop": s.tx_drop,
            }
            for name, s in sorted(diag.interfaces.items())
        ],
    }


def collect(
    agent: InstanceAgent, metrics: Metrics, spread: float = 0.0, stopping: threading.Event | None = None
) -> None:
    """One pass over this node's instances; a status write only where a counter moved.

    The writes are spread evenly over ``spread`` seconds. Agents started together run their rounds
    together: at 10,000 instances on 100 nodes, a round written at once was 10,000 status writes within
    two minutes, and the apiserver's fair queuing then gave a user's creates one slot in a hundred (they
    fell from 15 to 0.5 a second until it passed). ``stopping`` ends the round early: an agent asked to
    stop would otherwise wait for it, since the interpreter joins this thread before it exits."""
    metrics.instances.set(len(agent.cache.objects))
    for gone in metrics.tracked() - set(agent.cache.objects):
        metrics.forget(gone)
    running = [
        (uid, body)
        for uid, body in list(agent.cache.objects.items())
        if not body["metadata"].get("deletionTimestamp") and "powerState" in (body.get("status") or {})
    ]
    gap = spread / len(running) if running else 0.0
    pause = stopping or threading.Event()
    for uid, body in running:
        if pause.wait(gap):
            return
        meta = body["metadata"]
        try:
            diag = agent.driver.get_diagnostics(uid)
        except InstanceNotRunning:
            metrics.forget(uid)
            continue
        except DriverError as exc:
            log.debug("no diagnostics for %s: %s", uid, exc)
            continue
        metrics.record(meta["namespace"], meta["name"], uid, diag)
        with agent.cache.queue.lock(uid):  # not while the queue works on it
            _write(agent, uid, diag)


def _write(agent: InstanceAgent, uid: str, diag: Diagnostics) -> None:
    """Write the figures into the newest body, read under the object's lock: ``info`` is written whole, so
    one read before a reconcile's write (a flavor changed by a resize, say) would put the old vcpus back."""
    body = agent.cache.objects.get(uid)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return
    status = body.get("status") or {}
    figures = as_status(diag)
    info = {**(status.get("info") or {}), "memKiB": diag.memory_kib, "cpuTimeNs": diag.cpu_time_ns}
    old = {k: v for k, v in (status.get("diagnostics") or {}).items() if k != "updateTime"}
    if old != figures or status.get("info") != info:
        agent.write(body, {"diagnostics": {**figures, "updateTime": now()}, "info": info})
