"""Many instances across many agents (in-memory driver, one agent process per simulated node): when each
instance was created, bound and Running, where the time went (each step's latency, every process's CPU,
the apiserver's requests), how many watch events each agent received, and the controller's memory.

No timing is asserted: the figures go into the doc beside their targets, met or missed.
"""

from __future__ import annotations

import collections
import os
import pathlib
import time
from typing import Any

from bench.common import (
    FAKE_INITRD,
    FAKE_KERNEL,
    NAMESPACE,
    Bench,
    Result,
    counted,
    delete_all,
    instance,
    metric,
    percentile,
    request_counts,
    rss_mib,
    start_fake_agents,
    stop_fake_agents,
)
from bench.timeline import Timeline, create_and_follow, plot, say, watching
from kubenova.handlers.shared import COMPUTENODES, GROUP, NODE_LABEL, VERSION, VIRTUALINSTANCES
from testground import procs

SELECTOR = {"bench.kubenova.io/pool": "scale"}
#: The issue's targets: all Running within this many times the creates' own time; the controller's RSS.
RATIO_TARGET, CONTROLLER_RSS_TARGET_MIB = 1.2, 300.0
#: What an instance's lifecycle touches in the apiserver, and what ticks on its own meanwhile.
RESOURCES = ("virtualinstances", "events", "computenodes", "leases")


def cpu_seconds(pid: int | None) -> float:
    """User plus system CPU time of a process so far (0 when it is gone)."""
    if pid is None:
        return 0.0
    try:
        return procs.cpu_seconds(pid)
    except FileNotFoundError:
        return 0.0


def _pids(bench: Bench, agents: list[str]) -> dict[str, list[int]]:
    """The processes whose CPU the breakdown names, by role."""
    layout = bench.ground.layout
    found = {
        "kube-apiserver": [procs.running_pid(layout, "kube-apiserver")],
        "etcd": [procs.running_pid(layout, "etcd")],
        "controller": [procs.running_pid(layout, "controller")],
        "agents (all)": [procs.running_pid(layout, f"agent-{node}") for node in agents],
        "the benchmark itself": [os.getpid()],
    }
    return {role: [p for p in pids if p] for role, pids in found.items()}


def _cpu(pids: dict[str, list[int]]) -> dict[str, float]:
    return {role: sum(cpu_seconds(p) for p in group) for role, group in pids.items()}


def _watch_events(ports: dict[str, int]) -> dict[str, float]:
    return {node: sum(metric(port, "kubenova_watch_events_total").values()) for node, port in ports.items()}


def _bodies(count: int) -> list[dict[str, Any]]:
    bodies = []
    for i in range(count):
        body = instance(f"scale-{i}", kernel=FAKE_KERNEL, initrd=FAKE_INITRD)
        body["spec"]["nodeSelector"] = SELECTOR
        bodies.append(body)
    return bodies


def _own(bench: Bench, names: list[str]) -> dict[str, int]:
    own = dict.fromkeys(names, 0)
    listed = bench.custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, VIRTUALINSTANCES)
    for item in listed["items"]:
        own[item["metadata"]["labels"][NODE_LABEL]] += 1
    return own


def _measure(bench: Bench, names: list[str], ports: dict[str, int], count: int) -> dict[str, Any]:
    """Create ``count`` instances for the agents ``names`` and follow them to Running; the raw figures."""
    pids = _pids(bench, names)
    before_events, before, cpu_before = _watch_events(ports), request_counts(bench), _cpu(pids)
    with watching(bench, count, "scale") as timeline:
        timeline.start = time.monotonic()  # the first create is second 0
        created, elapsed = create_and_follow(bench, _bodies(count), timeline)
    cpu_after, after = _cpu(pids), request_counts(bench)
    received = _watch_events(ports)
    controller = pids["controller"][0]
    return {
        "timeline": timeline,
        "created_s": created,
        "elapsed_s": elapsed,
        "requests": counted(before, after, RESOURCES),
        "cpu_s": {role: cpu_after[role] - cpu_before[role] for role in pids},
        "own": _own(bench, names),
        "watch_events": {node: received[node] - before_events[node] for node in names},
        "controller_rss_mib": rss_mib(controller),
        "agent_rss_mib": [rss_mib(p) for p in pids["agents (all)"]],
    }


def diagnostics_interval(count: int) -> float:
    """Seconds between the agents' diagnostics rounds: the agent's default (60) up to 1,000 instances, ten
    minutes beyond. Each round writes every running instance's status once: at 10,000 instances and the
    default that alone is 167 writes/s, several times what this 2-CPU machine's apiserver serves next to
    the creates (about 20 instances/s here, five requests each); every ten minutes it is 17/s."""
    return 60.0 if count <= 1000 else 600.0


def run(bench: Bench, agents: int, count: int, plot_to: pathlib.Path | None = None) -> Result:
    names = [f"scale-{i:02d}" for i in range(agents)]
    say(f"scale: starting {agents} agent processes on the in-memory driver")
    extra = ["--diagnostics-interval", f"{diagnostics_interval(count):.0f}"]
    ports = start_fake_agents(bench, names, first_port=29500, timeout=120 + 3 * agents, extra=extra)
    try:
        for node in names:  # an aggregate of their own, so the real node takes none of these
            bench.custom.patch_cluster_custom_object(
                GROUP, VERSION, COMPUTENODES, node, {"metadata": {"labels": SELECTOR}}
            )
        time.sleep(2)
        raw = _measure(bench, names, ports, count)
        say(f"scale: all {count} Running at {raw['elapsed_s']:.1f} s; deleting them")
        delete_all(bench, timeout=600 + count / 10)
    finally:
        stop_fake_agents(bench, names)
    if plot_to is not None:
        plot(raw["timeline"], plot_to, f"{count} instances, {agents} agents: create → Running")
    return _result(raw, agents, count, plot_to)


def _steps(timeline: Timeline) -> list[str]:
    """Each step's latency, per instance: create returned → bound (the controller) → Running (the agent)."""
    names = [n for n in timeline.created if n in timeline.running]
    steps = {
        "create returned → bound to a node (controller)": [
            timeline.bound.get(n, timeline.running[n]) - timeline.created[n] for n in names
        ],
        "bound → Running in status (agent)": [
            timeline.running[n] - timeline.bound.get(n, timeline.running[n]) for n in names
        ],
        "create returned → Running": [timeline.running[n] - timeline.created[n] for n in names],
    }
    return [
        f"| {step} | {percentile(v, 50):.2f} | {percentile(v, 95):.2f} | {max(v):.2f} |"
        for step, v in steps.items()
    ]


def _request_rows(requests: dict[tuple[str, str, str], int], count: int) -> list[str]:
    totals: collections.Counter[tuple[str, str]] = collections.Counter()
    for (verb, resource, sub), n in requests.items():
        totals[verb, resource + ("/" + sub if sub else "")] += n
    return [
        f"| {verb} | {resource} | {n} | {n / count:.2f} |"
        for (verb, resource), n in sorted(totals.items(), key=lambda kv: -kv[1])
    ]


def _result(raw: dict[str, Any], agents: int, count: int, plot_to: pathlib.Path | None) -> Result:
    created, elapsed = raw["created_s"], raw["elapsed_s"]
    ratio = elapsed / created
    own, received = raw["own"], raw["watch_events"]
    per_own = sorted(received[n] / own[n] for n in own if own[n])
    rss = raw["controller_rss_mib"]
    cpu = raw["cpu_s"]
    lines = [
        f"{count} VirtualInstances across {agents} simulated nodes: one agent process per node on the "
        f"in-memory driver ({agents} processes, {min(raw['agent_rss_mib']):.0f} to "
        f"{max(raw['agent_rss_mib']):.0f} MiB RSS each), all local on this {os.cpu_count()}-CPU machine with "
        "the apiserver, etcd and the controller. One client creates them back to back. The agents' "
        f"diagnostics rounds every {diagnostics_interval(count):.0f} s (`--diagnostics-interval`; "
        "see `diagnostics_interval` in bench/scale.py for why not the default 60 s at 10,000).",
        "",
        "| figure | value | target |",
        "| --- | --- | --- |",
        f"| creates (first → last returned) | {created:.1f} s ({count / created:.0f}/s) | baseline |",
        f"| first create → all Running | {elapsed:.1f} s | ≤ {RATIO_TARGET} × creates |",
        f"| ratio | {ratio:.2f} × | ≤ {RATIO_TARGET}: {'met' if ratio <= RATIO_TARGET else 'missed'} |",
        f"| controller RSS with all Running | {rss:.0f} MiB | ≤ {CONTROLLER_RSS_TARGET_MIB:.0f} MiB: "
        f"{'met' if rss <= CONTROLLER_RSS_TARGET_MIB else 'missed'} |",
        f"| instances per agent | {min(own.values())} to {max(own.values())} | |",
        f"| watch events per own instance, per agent | {per_own[0]:.1f} to {per_own[-1]:.1f} | "
        "proportional to its own |",
        "",
        "Where the time goes, per instance, in seconds (the watch's stamps; bound = the node label seen):",
        "",
        "| step | p50 | p95 | max |",
        "| --- | --- | --- | --- |",
        *_steps(raw["timeline"]),
        "",
        f"CPU seconds each process used from the first create to all Running ({elapsed:.1f} s of wall "
        f"clock, so at most {elapsed * (os.cpu_count() or 1):.0f} CPU-seconds on this machine):",
        "",
        "| process | CPU s | share of the machine |",
        "| --- | --- | --- |",
        *[
            f"| {role} | {s:.1f} | {s / (elapsed * (os.cpu_count() or 1)):.0%} |"
            for role, s in sorted(cpu.items(), key=lambda kv: -kv[1])
        ],
        f"| all of these | {sum(cpu.values()):.1f} | "
        f"{sum(cpu.values()) / (elapsed * (os.cpu_count() or 1)):.0%} |",
        "",
        "apiserver requests in the same window (`apiserver_request_total`; instances, Events, nodes, "
        "Leases):",
        "",
        "| verb | resource | requests | per instance |",
        "| --- | --- | --- | --- |",
        *_request_rows(raw["requests"], count),
        "",
        "Each agent's watch events are counted by the agent itself (`kubenova_watch_events_total`): "
        "they follow its own instances, because the apiserver filters by the node label.",
    ]
    if plot_to is not None:
        lines += ["", f"![created, bound and Running over time]({plot_to.name})"]
    if count < 10000 and (plot_to is None or plot_to.stem != "benchmarks-scale"):  # not from that doc itself
        lines += [
            "",
            "The run at 10,000 instances on 100 agents: `python -m bench --scale`, written to "
            "[benchmarks-scale.md](benchmarks-scale.md).",
        ]
    requests = sum(raw["requests"].values())
    return Result(
        f"Scale: {count} instances, {agents} agents",
        lines,
        {
            "agents": agents,
            "count": count,
            "created_s": created,
            "elapsed_s": elapsed,
            "ratio": ratio,
            "controller_rss_mib": rss,
            "cpu_s": cpu,
            "requests": requests,
            "own": own,
            "watch_events": received,
        },
        headline=f"all {count} Running {elapsed:.1f} s after the first create; creates took {created:.1f} s "
        f"({ratio:.2f}×); controller RSS {rss:.0f} MiB",
    )
