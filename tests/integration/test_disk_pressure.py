"""A node whose instances folder fills up, on a real libvirtd and QEMU: the guest that writes is paused on an
I/O error, which status says once and the agent tries again only after a growing delay; it runs on once
there is room; console logs stay capped; the node's other guest runs on."""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import kubernetes
import libvirt
import pytest

from kubenova.handlers.shared import GROUP, VERSION, VIRTUALINSTANCES
from testground import ground as testground
from testground import guest, libvirt_host
from tests.helpers import REPORT, eventually
from tests.integration.test_agent import wait_ready
from tests.integration.test_virtualinstance import cond, get, make

NODE = "node-8"
#: The node's instances folder: by placement's books (capacity and measured free disk, both whole GiB) room
#: for the filler's 1 GiB disk and hardly more.
INSTANCES_MIB = 1100
#: virtlogd's cap on each console log there: the filler's kernel (booted without "quiet") prints more.
CONSOLE_CAP = 4096
#: What the ballast leaves free: the filler's guest writes 1 MiB a second, so it meets the full disk soon.
LEFT_MIB = 8
#: How long the test watches the paused guest's object (the agent's first try comes IO_ERROR_DELAY seconds
#: after the pause, its second twice as long after that).
WINDOW = 24
#: Status writes the watch may see meanwhile: at most two per try (ran, stopped again), the diagnostics
#: pass after the pause and after the try, and slack; a resume loop writes hundreds.
MAX_WRITES = 8


@pytest.fixture(scope="module")
def disk_node(ground: testground.Ground) -> Iterator[str]:
    testground.add_node(ground, NODE, instances_mib=INSTANCES_MIB, console_log_max_bytes=CONSOLE_CAP)
    yield NODE
    testground.remove_node(ground, NODE)


def console(folder: pathlib.Path) -> str:
    """The console log with the parts virtlogd rolled over, oldest first."""
    parts = sorted(folder.glob("console.log.*"), key=lambda p: -int(p.suffix[1:]))
    return "".join(p.read_text(errors="replace") for p in [*parts, folder / "console.log"] if p.exists())


def domain(ground: testground.Ground, uid: str) -> tuple[int, int, int]:
    """(state, reason, id) of the instance's domain: the id is its QEMU process's, new at every start."""
    conn = libvirt.open(libvirt_host.uri(ground.layout, NODE))
    try:
        dom = conn.lookupByUUIDString(uid)
        state, reason = dom.state()
        return state, reason, dom.ID()
    finally:
        conn.close()


def watch(
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
    name: str,
    version: str,
    seconds: int,
    since: float,
) -> list[tuple[float, dict[str, Any]]]:
    """Every version of the object written after ``version``, for ``seconds``, each with when it came (in
    seconds after the monotonic ``since``)."""
    stream = kubernetes.watch.Watch().stream(
        custom.list_namespaced_custom_object,
        GROUP,
        VERSION,
        namespace,
        VIRTUALINSTANCES,
        field_selector=f"metadata.name={name}",
        resource_version=version,
        timeout_seconds=seconds,
    )
    return [(time.monotonic() - since, e["object"]) for e in stream if e["type"] == "MODIFIED"]


def test_a_full_disk_pauses_the_writer_says_so_once_retries_slowly_and_spares_the_rest(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    core: kubernetes.client.CoreV1Api,
    namespace: str,
    disk_node: str,
) -> None:
    instances = ground.node_dir(disk_node) / "instances"
    filler_boot = {
        "kernel": {
            "image": guest.KERNEL,
            "initrd": guest.INITRD,
            "cmdline": f"console=ttyS0 panic=-1 {guest.fill_hook('vda')}",
        }
    }
    for body in (
        make("bystander", nodeName=disk_node),
        make(
            "filler",
            nodeName=disk_node,
            boot=filler_boot,
            ephemeralDisks=[{"name": "scratch", "sizeGiB": 1}],
        ),
    ):
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, body)
    bystander = wait_ready(custom, namespace, "bystander")
    filler = wait_ready(custom, namespace, "filler")
    uid, other = filler["metadata"]["uid"], bystander["metadata"]["uid"]
    qemu = domain(ground, uid)[2]
    eventually(
        lambda: f"{guest.FILLED} vda 1" in console(instances / uid), timeout=60, what="the guest to fill"
    )

    ballast = instances / "ballast"
    try:
        # Something else takes the node's disk, as other guests' disks do: what is left goes in seconds.
        fs = os.statvfs(instances)
        with open(ballast, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, fs.f_bavail * fs.f_frsize - LEFT_MIB * 2**20)
        start = time.monotonic()
        paused = eventually(
            lambda: (
                (o := get(custom, namespace, "filler")) and cond(o, "Ready").get("reason") == "IOError" and o
            ),
            timeout=LEFT_MIB + 30,
            interval=0.2,
            what="Ready=False, reason IOError",
        )
        seen = time.monotonic()
        ready = cond(paused, "Ready")
        assert (paused["status"]["powerState"], ready["status"]) == ("Paused", "False")
        assert disk_node in ready["message"] and "instances folder" in ready["message"], ready["message"]
        assert domain(ground, uid)[:2] == (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR)

        version = paused["metadata"]["resourceVersion"]
        versions = watch(custom, namespace, "filler", version, WINDOW, seen)
        said = [(round(t, 1), v["status"]["powerState"], cond(v, "Ready").get("reason")) for t, v in versions]
        REPORT.append(
            f"disk pressure: IOError {seen - start:.1f}s after the disk filled; {len(versions)} status "
            f"writes in the next {WINDOW}s: {said}"
        )
        assert len(versions) <= MAX_WRITES, said
        # Let run only after the delay (a try can show as Running for a moment), and not again within it.
        assert all(t >= testground.IO_ERROR_DELAY - 2 for t, power, _ in said if power == "Running"), said
        still = get(custom, namespace, "filler") or {}
        assert cond(still, "Ready").get("reason") == "IOError"  # the disk is still full: paused again
        warnings = [
            e.reason
            for e in core.list_namespaced_event(namespace, field_selector="involvedObject.name=filler").items
            if e.type == "Warning"
        ]
        assert warnings.count("IOError") == 1, warnings

        # The other guest on the node, whose disks take nothing more, ran on throughout.
        assert domain(ground, other)[0] == libvirt.VIR_DOMAIN_RUNNING
        assert cond(get(custom, namespace, "bystander"), "Ready")["status"] == "True"
    finally:
        ballast.unlink(missing_ok=True)  # an operator made room

    # The next try (2 x IO_ERROR_DELAY after the first) finds room: the guest runs on, in the same boot.
    wait_ready(custom, namespace, "filler", timeout=2 * testground.IO_ERROR_DELAY + 20)
    assert domain(ground, uid)[::2] == (libvirt.VIR_DOMAIN_RUNNING, qemu)
    # virtlogd kept each guest's console log within its cap: rolled over, never past it.
    for folder in (instances / uid, instances / other):
        logs = sorted(folder.glob("console.log*"))
        assert all(p.stat().st_size <= CONSOLE_CAP for p in logs), [(p.name, p.stat().st_size) for p in logs]
        assert len(logs) <= 1 + libvirt_host.CONSOLE_LOG_BACKUPS
    assert (instances / uid / "console.log.1").exists(), "the filler's kernel printed more than the cap"
