"""Placement: which ComputeNode an instance goes to. Pure functions, so they are unit-tested alone."""
from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping

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


@dataclasses.dataclass(frozen=True)
class Usage:
    vcpus: int = 0
    memory_mib: int = 0
    disk_gib: int = 0

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(self.vcpus + other.vcpus, self.memory_mib + other.memory_mib, self.disk_gib + other.disk_gib)


class Unschedulable(Exception):
    """No node fits; the message says why in words a person can act on."""


def choose_node(request: Usage, pinned: str | None, nodes: Mapping[str, NodeView],
                used: Mapping[str, Usage], now: datetime.datetime,
                selector: Mapping[str, str] | None = None) -> str:
    """The fitting node with the most free memory (spreads instances); raises Unschedulable."""
    if not nodes:
        raise Unschedulable("no ComputeNode is registered; start a kubenova agent on a node")
    candidates = [nodes[pinned]] if pinned in nodes else [] if pinned else list(nodes.values())
    if pinned and not candidates:
        raise Unschedulable(f"spec.nodeName {pinned!r} names no registered ComputeNode")
    reasons = []
    best: tuple[int, str] | None = None
    for node in candidates:
        if not node.enabled:
            reasons.append(f"{node.name}: disabled")
            continue
        if node.maintenance:
            reasons.append(f"{node.name}: in maintenance")
            continue
        mismatch = sorted(k for k, v in (selector or {}).items() if node.labels.get(k) != v)
        if mismatch:
            reasons.append(f"{node.name}: labels do not match spec.nodeSelector ({', '.join(mismatch)})")
            continue
        if node.heartbeat is None or now - node.heartbeat > HEARTBEAT_GRACE:
            reasons.append(f"{node.name}: agent not reporting")
            continue
        taken = used.get(node.name, Usage())
        free = Usage(int(node.vcpus * CPU_ALLOCATION_RATIO) - taken.vcpus,
                     int(node.memory_mib * RAM_ALLOCATION_RATIO) - taken.memory_mib,
                     int(node.disk_gib * DISK_ALLOCATION_RATIO) - taken.disk_gib)
        if free.vcpus < request.vcpus:
            reasons.append(f"{node.name}: {free.vcpus} vCPUs free, {request.vcpus} requested")
            continue
        if free.memory_mib < request.memory_mib:
            reasons.append(f"{node.name}: {free.memory_mib} MiB free, {request.memory_mib} MiB requested")
            continue
        if free.disk_gib < request.disk_gib:
            reasons.append(f"{node.name}: {free.disk_gib} GiB of disk free, {request.disk_gib} GiB requested")
            continue
        if best is None or free.memory_mib > best[0]:
            best = (free.memory_mib, node.name)
    if best is None:
        raise Unschedulable("no ComputeNode fits: " + "; ".join(reasons))
    return best[1]
