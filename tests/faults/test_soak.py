"""Soak: bounded create/delete churn; afterwards domains equal objects and the agents' resources are flat.

500 cycles run on an agent with the in-memory driver (the agent's own bookkeeping, watches and
writes under churn) and 50 on the real libvirtd (the driver's connections, event callbacks and
files). Growth is measured between the end of a warm-up round and the end of the run, so
one-time costs (imports, thread pools, caches filled once) do not count as a leak.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import kubernetes
import libvirt
import pytest

from kubenova.handlers.agent.node_reporter import lease_name
from kubenova.handlers.shared import COMPUTENODES, GROUP, NODE_LABEL, VERSION, VIRTUALINSTANCES
from testground import ground as testground
from testground import guest, procs
from tests.helpers import REPORT, eventually
from tests.integration.test_virtualinstance import make

pytestmark = pytest.mark.long

FAKE_NODE, FAKE_PORT = "soak-fake", 29590


def usage(pid: int) -> dict[str, float]:
    """Open file descriptors, threads and resident memory (MiB) of a process."""
    status = dict(line.split(":", 1) for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines())
    return {
        "fds": len(list(pathlib.Path(f"/proc/{pid}/fd").iterdir())),
        "threads": int(status["Threads"]),
        "rss": int(status["VmRSS"].split()[0]) / 1024,
    }


def churn(
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
    cycles: int,
    batch: int,
    body: dict[str, Any],
    pid: int,
    after_round: Any = None,
    every_round: bool = True,
) -> tuple[dict[str, float], dict[str, float]]:
    """``cycles`` creates and deletes, ``batch`` at a time; the process's usage after round one and at the
    end.

    ``after_round(n)`` checks the hypervisor holds ``n`` domains, after each round or the last only.
    """
    warm: dict[str, float] = {}
    for round_ in range(cycles // batch):
        names = [f"soak-{round_}-{i}" for i in range(batch)]
        for name in names:
            custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, VIRTUALINSTANCES, {**body, "metadata": {"name": name}}
            )

        def all_running() -> bool:
            items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES)["items"]
            return len(items) == batch and all(
                (o.get("status") or {}).get("phase") == "Running" for o in items
            )

        eventually(all_running, timeout=300, interval=0.2, what=f"round {round_}: {batch} instances Running")
        last = round_ == cycles // batch - 1
        if after_round and (every_round or last):
            after_round(batch)
        custom.delete_collection_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES)
        eventually(
            lambda: (
                not custom.list_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES)["items"]
            ),
            timeout=300,
            interval=0.2,
            what=f"round {round_}: every instance deleted",
        )
        if after_round and (every_round or last):
            after_round(0)
        if round_ == 0:
            warm = usage(pid)
    return warm, usage(pid)


def flat(what: str, warm: dict[str, float], end: dict[str, float], cycles: int) -> None:
    REPORT.append(
        f"soak {what}, {cycles} cycles: fds {warm['fds']:.0f} -> {end['fds']:.0f}, threads "
        f"{warm['threads']:.0f} -> {end['threads']:.0f}, RSS {warm['rss']:.1f} -> {end['rss']:.1f} MiB"
    )
    assert end["fds"] <= warm["fds"] + 5, f"{what}: file descriptors grew {warm} -> {end}"
    assert end["threads"] <= warm["threads"] + 4, f"{what}: threads grew {warm} -> {end}"
    assert end["rss"] <= warm["rss"] * 1.15 + 10, f"{what}: memory grew {warm} -> {end}"


def test_500_cycles_on_the_fake_driver(
    ground: testground.Ground, custom: kubernetes.client.CustomObjectsApi, namespace: str
) -> None:
    store = ground.layout.state / "soak-images"
    store.mkdir(exist_ok=True)
    for name in ("kernel", "initrd"):
        (store / name).write_bytes(name.encode())
    procs.start(
        ground.layout,
        f"agent-{FAKE_NODE}",
        [
            sys.executable,
            "-m",
            "kubenova.cli",
            "agent",
            "--node",
            FAKE_NODE,
            "--driver",
            "fake",
            "--image-store",
            str(store),
            "--metrics-address",
            f"127.0.0.1:{FAKE_PORT}",
        ],
        f"--node {FAKE_NODE}",
        env=ground.env(),
    )
    try:
        eventually(
            lambda: (
                (
                    (
                        custom.get_cluster_custom_object(GROUP, VERSION, COMPUTENODES, FAKE_NODE).get(
                            "status"
                        )
                        or {}
                    ).get("capacity")
                )
                if _exists(custom, FAKE_NODE)
                else None
            ),
            timeout=60,
            what="the fake agent's ComputeNode",
        )
        pid = procs.running_pid(ground.layout, f"agent-{FAKE_NODE}")
        assert pid
        body = make("x", nodeName=FAKE_NODE, boot={"kernel": {"image": "kernel", "initrd": "initrd"}})

        def counted(expected: int) -> None:
            eventually(
                lambda: (
                    (
                        custom.get_cluster_custom_object(GROUP, VERSION, COMPUTENODES, FAKE_NODE).get(
                            "status"
                        )
                        or {}
                    ).get("instanceCount")
                    == expected
                ),
                timeout=60,
                what=f"the fake hypervisor to hold {expected} domains",
            )

        # The ComputeNode's count is published every 20 s: checked in the last round only.
        warm, end = churn(custom, namespace, 500, 25, body, pid, counted, every_round=False)
        flat("fake driver agent", warm, end, 500)
    finally:
        procs.stop(ground.layout, f"agent-{FAKE_NODE}")
        custom.delete_cluster_custom_object(GROUP, VERSION, COMPUTENODES, FAKE_NODE)
        kubernetes.client.CoordinationV1Api(custom.api_client).delete_namespaced_lease(
            lease_name(FAKE_NODE), "kubenova-system"
        )


def _exists(custom: kubernetes.client.CustomObjectsApi, node: str) -> bool:
    try:
        custom.get_cluster_custom_object(GROUP, VERSION, COMPUTENODES, node)
        return True
    except kubernetes.client.ApiException as exc:
        if exc.status == 404:
            return False
        raise


def test_50_cycles_on_real_libvirt(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    hypervisor: libvirt.virConnect,
    namespace: str,
) -> None:
    pid = procs.running_pid(ground.layout, f"agent-{ground.node}")
    assert pid
    body = make("x", nodeName=ground.node)
    body["spec"]["boot"]["kernel"]["cmdline"] = guest.CMDLINE

    def domains_equal_objects(expected: int) -> None:
        """Every domain of the node belongs to an instance bound there, and the other way round."""
        objects = [
            o["metadata"]
            for o in custom.list_cluster_custom_object(GROUP, VERSION, VIRTUALINSTANCES)["items"]
            if (o["metadata"].get("labels") or {}).get(NODE_LABEL) == ground.node
        ]
        bound = {m["uid"] for m in objects}
        assert len(bound) == expected, [
            (m["namespace"], m["name"], m["uid"], m.get("deletionTimestamp")) for m in objects
        ]
        assert {d.UUIDString() for d in hypervisor.listAllDomains()} == bound
        folders = {p.name for p in (ground.node_dir() / "instances").iterdir()} - {"_base"}  # the image cache
        assert folders == bound, "disks and config drives"

    warm, end = churn(custom, namespace, 50, 5, body, pid, domains_equal_objects)
    flat("libvirt agent", warm, end, 50)
