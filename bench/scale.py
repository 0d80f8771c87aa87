"""Many instances across many agents (in-memory driver, local processes): time until all run, the
apiserver's request rate, and how many watch events each agent received."""

from __future__ import annotations

import os
import time

from bench.common import (
    FAKE_INITRD,
    FAKE_KERNEL,
    Bench,
    Result,
    counted,
    create_all_and_wait,
    delete_all,
    instance,
    metric,
    request_counts,
    start_fake_agents,
    stop_fake_agents,
)
from kubenova.handlers.shared import COMPUTENODES, GROUP, NODE_LABEL, VERSION, VIRTUALINSTANCES

SELECTOR = {"bench.kubenova.io/pool": "scale"}


def run(bench: Bench, agents: int, count: int) -> Result:
    names = [f"scale-{i:02d}" for i in range(agents)]
    ports = start_fake_agents(bench, names, first_port=29500)
    try:
        for node in names:  # an aggregate of their own, so the real node takes none of these
            bench.custom.patch_cluster_custom_object(
                GROUP, VERSION, COMPUTENODES, node, {"metadata": {"labels": SELECTOR}}
            )
        time.sleep(2)
        before_events = {
            node: sum(metric(port, "kubenova_watch_events_total").values()) for node, port in ports.items()
        }
        before = request_counts(bench)
        bodies = []
        for i in range(count):
            body = instance(f"scale-{i}", kernel=FAKE_KERNEL, initrd=FAKE_INITRD)
            body["spec"]["nodeSelector"] = SELECTOR
            bodies.append(body)
        created, elapsed = create_all_and_wait(bench, bodies)
        requests = sum(
            counted(
                before, request_counts(bench), ("virtualinstances", "events", "computenodes", "leases")
            ).values()
        )
        own = {node: 0 for node in names}
        for item in bench.custom.list_namespaced_custom_object(GROUP, VERSION, "bench", VIRTUALINSTANCES)[
            "items"
        ]:
            own[item["metadata"]["labels"][NODE_LABEL]] += 1
        received = {
            node: sum(metric(port, "kubenova_watch_events_total").values()) - before_events[node]
            for node, port in ports.items()
        }
        delete_all(bench)
    finally:
        stop_fake_agents(bench, names)
    per_own = sorted(received[n] / own[n] for n in names if own[n])
    lines = [
        f"{count} VirtualInstances across {agents} agents on the in-memory driver, all local processes "
        f"on this {os.cpu_count()}-CPU machine (the creates took {created:.1f} s).",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| first create → all Running | {elapsed:.1f} s (target ≤ 60 s: "
        f"{'met' if elapsed <= 60 else 'missed'}) |",
        f"| apiserver requests (instances, Events, nodes, Leases) | {requests} "
        f"({requests / elapsed:.0f}/s) |",
        f"| instances per agent | {min(own.values())} to {max(own.values())} |",
        f"| watch events per own instance, per agent | {per_own[0]:.1f} to {per_own[-1]:.1f} |",
        "",
        "Each agent's watch events are counted by the agent itself (`kubenova_watch_events_total`): "
        "they follow its own instances, because the apiserver filters by the node label.",
    ]
    return Result(
        f"Scale: {count} instances, {agents} agents",
        lines,
        {
            "agents": agents,
            "count": count,
            "elapsed_s": elapsed,
            "requests": requests,
            "own": own,
            "watch_events": received,
        },
    )
