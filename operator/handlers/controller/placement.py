"""Placement: which ComputeNode an instance goes to. Pure functions, so they are unit-tested alone."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping, Sequence

#: A node whose agent has not reported for this long takes no new instances.
HEARTBEAT_GRACE = datetime.timedelta(seconds=60)
#: Nova's default overcommit: vCPUs are time-shared, memory is overcommitted a little.
CPU_ALLOCATION_RATIO = 16.0
RAM_ALLOCATION_RATIO = 1.5
#: Disks are thin (qcow2 overlays); Nova's disk_allocation_ratio defaults to 1.0.
DISK_ALLOCATION_RATIO = 1.0


@dataclasses.dataclass(frozen=True)
class NodeView:
    name: str
    enabled: bool
    heartbeat: datetime.datetime | None
    vcpus: int
    memory_mib: int
    disk_gib: int = 0
    maintenance: bool = False
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: Seconds since its agent's Lease expired, as the controller reckons it; None while it renews.
    unreachable_for: float | None = None
    #: Its agent says it cannot act (libvirtd does not answer): ComputeNode Ready=False.
    ready: bool = True
    #: An admin or a node-health tool says the node is down for good (spec.fenced, or its Node is gone).
    fenced: bool = False
    #: disk no instance's request counts: what the node's volumes and snapshots hold on it
    stored_gib: int = 0
    #: what the node measured free, less what its instances' disks may still grow (None: not reported)
    disk_available_least_gib: int | None = None
    #: the named CPU models a guest can get there (its status.cpuModels; empty: not reported)
    cpu_models: frozenset[str] = frozenset()
    #: the files of its image store, as shared.store_keys name them (its status.images)
    images: frozenset[str] = frozenset()

    def has(self, needs: Sequence[Sequence[str]]) -> bool:
        """Whether its store holds every file an instance boots from (each need: the names it may go by)."""
        return all(any(key in self.images for key in need) for need in needs)


@dataclasses.dataclass(frozen=True)
class Usage:
    vcpus: int = 0
    memory_mib: int = 0
    disk_gib: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.vcpus + other.vcpus, self.memory_mib + other.memory_mib, self.disk_gib + other.disk_gib
        )


class Unschedulable(Exception):
    """No node fits. The message says why in words a person can act on, and names only which constraints
    fail, never the live figures: it goes into the instance's status, which must not be rewritten every
    time some node's free capacity moves. ``detail`` adds the figures, for the Event.
    """

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail or message


def _short(request: Usage, have: Usage) -> list[str]:
    return [
        what
        for what, want, got in (
            ("vCPUs", request.vcpus, have.vcpus),
            ("memory", request.memory_mib, have.memory_mib),
            ("disk", request.disk_gib, have.disk_gib),
        )
        if want > got
    ]


def _figures(request: Usage, have: Usage, what: str) -> str:
    return (
        f"{have.vcpus} vCPUs {what}, {request.vcpus} requested; {have.memory_mib} MiB {what}, "
        f"{request.memory_mib} MiB requested; {have.disk_gib} GiB of disk {what}, "
        f"{request.disk_gib} GiB requested"
    )


def choose_node(
    request: Usage,
    pinned: str | None,
    nodes: Mapping[str, NodeView],
    used: Mapping[str, Usage],
    now: datetime.datetime,
    selector: Mapping[str, str] | None = None,
    cpu_model: str | None = None,
    needs: Sequence[Sequence[str]] = (),
) -> str:
    """The fitting node with the most free memory (spreads instances), among those whose image store
    holds what the instance boots from (``needs``, see NodeView.has) if any does; raises Unschedulable.

    ``cpu_model``: the instance's spec.cpu.model, which only a node listing it can run.
    """
    if not nodes:
        raise Unschedulable("no ComputeNode is registered; start a kubenova agent on a node")
    candidates = [nodes[pinned]] if pinned and pinned in nodes else [] if pinned else list(nodes.values())
    if pinned and not candidates:
        raise Unschedulable(f"spec.nodeName {pinned!r} names no registered ComputeNode")
    reasons, details = [], []
    best: tuple[bool, int, str] | None = None
    for node in candidates:
        reason, detail = _misfit(node, request, used.get(node.name, Usage()), now, selector, cpu_model)
        if reason:
            reasons.append(f"{node.name}: {reason}")
            details.append(f"{node.name}: {detail or reason}")
            continue
        free_memory = int(node.memory_mib * RAM_ALLOCATION_RATIO) - used.get(node.name, Usage()).memory_mib
        if best is None or (node.has(needs), free_memory) > best[:2]:
            best = (node.has(needs), free_memory, node.name)
    if best is None:
        if cpu_model and all(r.endswith(_cpu_misfit(cpu_model)) for r in reasons):
            raise Unschedulable(
                f"no ComputeNode can run CPU model {cpu_model!r} (spec.cpu.model): none lists it in its "
                "status.cpuModels; name a model a node lists, or remove spec.cpu.model"
            )
        raise Unschedulable(
            "no ComputeNode fits: " + "; ".join(reasons), "no ComputeNode fits: " + "; ".join(details)
        )
    return best[2]


def _cpu_misfit(model: str) -> str:
    return f"cannot run CPU model {model!r} (not in its status.cpuModels)"


def _misfit(
    node: NodeView,
    request: Usage,
    taken: Usage,
    now: datetime.datetime,
    selector: Mapping[str, str] | None,
    cpu_model: str | None,
) -> tuple[str, str]:
    """Why ``node`` cannot take the request ("" when it can), and the same with the figures."""
    if not node.enabled:
        return "disabled", ""
    if node.maintenance:
        return "in maintenance", ""
    if node.fenced:
        return "fenced", ""
    if node.unreachable_for is not None:
        return "agent not reporting (its Lease expired)", ""
    if not node.ready:
        return "not ready (its agent cannot reach libvirt)", ""
    mismatch = sorted(k for k, v in (selector or {}).items() if node.labels.get(k) != v)
    if mismatch:
        return f"labels do not match spec.nodeSelector ({', '.join(mismatch)})", ""
    if cpu_model and cpu_model not in node.cpu_models:
        return _cpu_misfit(cpu_model), ""
    if node.heartbeat is None or now - node.heartbeat > HEARTBEAT_GRACE:
        return "agent not reporting", ""
    capacity = Usage(
        int(node.vcpus * CPU_ALLOCATION_RATIO),
        int(node.memory_mib * RAM_ALLOCATION_RATIO),
        int(node.disk_gib * DISK_ALLOCATION_RATIO),
    )
    too_big = _short(request, capacity)
    if too_big:  # however much is freed, it never fits here
        return (
            f"asks for more {' and '.join(too_big)} than the node has in all",
            _figures(request, capacity, "in all"),
        )
    # Disk by the books (capacity less every request and what volumes and snapshots hold) and as measured
    # (disk_available_least, which also sees what kubenova never placed): the smaller of the two.
    disk = capacity.disk_gib - taken.disk_gib - node.stored_gib
    if node.disk_available_least_gib is not None:
        disk = min(disk, node.disk_available_least_gib)
    free = Usage(capacity.vcpus - taken.vcpus, capacity.memory_mib - taken.memory_mib, disk)
    short = _short(request, free)
    if short:
        return f"not enough free {' and '.join(short)}", _figures(request, free, "free")
    return "", ""
