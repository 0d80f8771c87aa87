"""No write storms while pending: instances that wait on a full cluster while the nodes' capacity keeps
moving. Every change sends every pending instance through placement again; what must not follow is a
status write (and an Event) per instance per change: the figures belong in the Event, the status keeps a
message that changes only when the reason does. Counted from the apiserver's own request counters.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

from bench.common import (
    FAKE_INITRD,
    FAKE_KERNEL,
    NAMESPACE,
    Bench,
    Result,
    counted,
    create,
    delete_all,
    instance,
    list_version,
    request_counts,
    running,
    start_fake_agents,
    stop_fake_agents,
    wait_for,
    watch,
)
from bench.timeline import say
from kubenova.handlers.shared import COMPUTENODES, GROUP, VERSION, VIRTUALINSTANCES, condition

SELECTOR = {"bench.kubenova.io/pool": "storm"}
NODES = ["storm-0", "storm-1"]
#: The in-memory host has 16 GiB (24 GiB to place with Nova's 1.5 overcommit): one such instance fills it.
BIG_MIB = 16000
#: Seconds between two capacity changes: each gets a placement pass of its own.
SPACING = 0.3
WRITES = ("PATCH", "PUT", "APPLY", "POST")


def _body(name: str) -> dict[str, Any]:
    body = instance(name, memory_mib=BIG_MIB, kernel=FAKE_KERNEL, initrd=FAKE_INITRD)
    body["spec"]["nodeSelector"] = SELECTOR
    return body


class Messages:
    """Every Scheduled message each instance's status has shown, from a watch of the bench's own."""

    def __init__(self, bench: Bench) -> None:
        self.seen: dict[str, list[str]] = collections.defaultdict(list)
        #: status changes the watch brought, by instance (each one a status write the apiserver took)
        self.writes: collections.Counter[str] = collections.Counter()
        self._status: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, args=(bench, list_version(bench)), daemon=True)
        self._thread.start()

    def _follow(self, bench: Bench, version: str) -> None:
        for event in watch(bench, version, 1200):
            obj = event["object"]
            name, status = obj["metadata"]["name"], obj.get("status") or {}
            if status != self._status.get(name, {}):
                self.writes[name] += 1
            self._status[name] = status
            cond = condition(status, "Scheduled")
            if cond and cond["status"] == "False":
                said = self.seen[name]
                if not said or said[-1] != cond["message"]:
                    said.append(cond["message"])
            if self._stop.is_set():
                return  # the generator's own end stops the watch

    def pending(self) -> int:
        return len(self.seen)

    def fillers_writes(self) -> int:
        """Status writes to the filling instances (not pending ones) the watch saw."""
        return sum(n for name, n in self.writes.items() if name.startswith("fill-"))

    def changes(self) -> int:
        """Reason changes after the first Unschedulable status, over every instance."""
        return sum(len(said) - 1 for said in self.seen.values())

    def stop(self) -> None:
        self._stop.set()


def _status_writes(before: collections.Counter[Any], after: collections.Counter[Any]) -> dict[str, int]:
    """Status writes on VirtualInstances (those the apiserver took, and those it refused: a guarded
    write from an old copy) and Events posted, between two readings of request_counts(codes=True)."""
    found = counted(before, after, ("virtualinstances", "events"))
    status = {key: n for key, n in found.items() if key[1] == "virtualinstances" and key[2] == "status"}
    return {
        "status": sum(n for key, n in status.items() if key[3].startswith("2")),
        "refused": sum(n for key, n in status.items() if not key[3].startswith("2")),
        "events": sum(n for key, n in found.items() if key[1] == "events" and key[0] in WRITES),
    }


def _quiet(bench: Bench, settle: float = 5.0) -> collections.Counter[Any]:
    """The request counters once no VirtualInstance status was written for ``settle`` seconds."""
    last = request_counts(bench, codes=True)
    while True:
        time.sleep(settle)
        now = request_counts(bench, codes=True)
        if not any(_status_writes(last, now)[k] for k in ("status", "refused")):
            return now
        last = now


def _change_capacity(bench: Bench, changes: int) -> None:
    """``changes`` capacity moves on the full nodes (memory up 1 MiB each time, as an agent publishes
    after a memory hot-add): the free figures move, what does not fit still does not."""
    for i in range(changes):
        node = NODES[i % len(NODES)]
        bench.custom.patch_cluster_custom_object_status(
            GROUP, VERSION, COMPUTENODES, node, {"status": {"capacity": {"memoryMiB": 16384 + 1 + i}}}
        )
        if (i + 1) % 20 == 0 or i + 1 == changes:
            say(f"storm: {i + 1}/{changes} capacity changes")
        time.sleep(SPACING)


def _get(bench: Bench, name: str) -> dict[str, Any]:
    return dict(bench.custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, VIRTUALINSTANCES, name))


def run(bench: Bench, pending: int, changes: int, settle: float = 5.0) -> Result:
    """``settle``: the seconds without a status write that count as quiet (the smoke run, which quotes
    no figure, takes one)."""
    # No diagnostics rounds: the filling instances' status writes would count with the pending ones'.
    start_fake_agents(bench, NODES, first_port=29700, extra=["--diagnostics-interval", "3600"])
    messages = Messages(bench)
    try:
        for node in NODES:
            bench.custom.patch_cluster_custom_object(
                GROUP, VERSION, COMPUTENODES, node, {"metadata": {"labels": SELECTOR}}
            )
        for node in NODES:  # fill each node with one instance it can take
            create(bench, _body(f"fill-{node}"))
        wait_for("the nodes full", lambda: all(running(_get(bench, f"fill-{n}")) for n in NODES))
        before = _quiet(bench, settle)
        fillers = messages.fillers_writes()
        for i in range(pending):
            create(bench, _body(f"pending-{i}"))
        wait_for("every instance pending", lambda: messages.pending() >= pending, timeout=300 + pending / 5)
        say(f"storm: {pending} pending on a full cluster")
        middle = _quiet(bench, settle)
        _change_capacity(bench, changes)
        after = _quiet(bench, settle)
        fillers = messages.fillers_writes() - fillers
        delete_all(bench)
    finally:
        messages.stop()
        stop_fake_agents(bench, NODES)
    first, during = _status_writes(before, middle), _status_writes(middle, after)
    return _result(first, during, messages, fillers, pending, changes)


def _result(
    first: dict[str, int],
    during: dict[str, int],
    messages: Messages,
    fillers: int,
    pending: int,
    changes: int,
) -> Result:
    reasons = messages.changes()
    total = sum(phase[k] for phase in (first, during) for k in ("status", "refused")) - fillers
    target = pending + reasons
    lines = [
        f"{len(NODES)} nodes on the in-memory driver, each full with one {BIG_MIB} MiB instance; {pending} "
        f"more such instances pending; then {changes} capacity changes on those nodes ({SPACING} s apart, "
        "a placement pass over every pending instance each). Status writes and Events on VirtualInstances "
        "from `apiserver_request_total`; the status messages from a watch.",
        "",
        "| figure | until all pending | during the changes | target |",
        "| --- | --- | --- | --- |",
        f"| status writes | {first['status']} | {during['status']} | ≤ {pending} + reason changes |",
        f"| refused (409, an old copy) | {first['refused']} | {during['refused']} | |",
        f"| Events posted | {first['events']} | {during['events']} | |",
        f"| reason changes seen in status | | {reasons} | |",
        f"| status writes to the filling instances (from the watch) | {fillers} | | |",
        f"| status writes for the pending, refused ones too | {total} | | ≤ {target}: "
        f"{'met' if total <= target else 'missed'} |",
        "",
        "The status says which constraint fails on which node and never the figures (they move with every "
        "change); the figures go into the Event posted with each status write.",
    ]
    return Result(
        f"No write storms: {pending} pending, {changes} capacity changes",
        lines,
        {
            "pending": pending,
            "changes": changes,
            "first": first,
            "during": during,
            "reason_changes": reasons,
            "fillers_writes": fillers,
            "pending_writes": total,
        },
        headline=f"status writes {first['status']} (+{first['refused']} refused) + {during['status']} "
        f"(+{during['refused']}) during {changes} changes "
        f"(target ≤ {target})",
    )
