"""Migrations between two real libvirtd hosts (node-1, node-2), driven only through the Kubernetes API."""

from __future__ import annotations

import pathlib
import re
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import kubernetes
import libvirt
import pytest

from kubenova.handlers.controller.maintenance import EVACUATION_LABEL
from kubenova.handlers.shared import (
    COMPUTENODES,
    GROUP,
    MIGRATIONS,
    NODE_LABEL,
    VERSION,
    VIRTUALINSTANCES,
    VOLUMEATTACHMENTS,
)
from testground import ground as testground
from testground import guest, libvirt_host
from testground.served import Served
from tests.helpers import PacketWatch, empty_namespace, eventually
from tests.integration.test_agent import attach, delete_and_wait, wait_action, wait_ready
from tests.integration.test_image_imports import serve
from tests.integration.test_virtualinstance import cond, get, make

NODES = ("node-1", "node-2")
POOL = "test.kubenova.io/pool"
BOOT = 120


@pytest.fixture(scope="module")
def nodes(ground: testground.Ground, custom: kubernetes.client.CustomObjectsApi) -> Iterator[tuple[str, str]]:
    """Two more compute nodes, labelled so that only this module's instances (which select the label) go
    there."""
    for node in NODES:
        testground.add_node(ground, node)
        custom.patch_cluster_custom_object(
            GROUP, VERSION, COMPUTENODES, node, {"metadata": {"labels": {POOL: "migration"}}}
        )
    yield NODES
    for node in NODES:
        testground.remove_node(ground, node)


def vi(name: str, **spec: Any) -> dict[str, Any]:
    return make(name, nodeSelector={POOL: "migration"}, **spec)


def node_of(custom: kubernetes.client.CustomObjectsApi, namespace: str, name: str) -> str:
    return str((get(custom, namespace, name) or {})["metadata"]["labels"][NODE_LABEL])


def other(node: str) -> str:
    return NODES[1] if node == NODES[0] else NODES[0]


def console(ground: testground.Ground, uid: str, node: str) -> str:
    path = ground.console_log(uid, node)
    return path.read_text(errors="replace") if path.exists() else ""


def guest_mac(ground: testground.Ground, uid: str, node: str) -> str | None:
    """The MAC the guest last said its eth0 has (it says so every few ticks)."""
    found = re.findall(rf"{guest.MAC} eth0 (\S+)", console(ground, uid, node))
    return found[-1] if found else None


#: The most common NIC: no macAddress, so kubenova chooses one (it must keep it for the instance's life).
NIC = [{"name": "eth0", "network": libvirt_host.NETWORK}]


def ticks(ground: testground.Ground, uid: str, node: str) -> int:
    found = re.findall(rf"{guest.TICK} (\d+)", console(ground, uid, node))
    return int(found[-1]) if found else -1


def has_domain(ground: testground.Ground, node: str, uid: str) -> bool:
    conn = libvirt.open(libvirt_host.uri(ground.layout, node))
    try:
        conn.lookupByUUIDString(uid)
        return True
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()


def running(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
    body: dict[str, Any],
) -> tuple[str, str]:
    """Create the instance and wait until its guest ticks; returns (uid, node)."""
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, body)
    obj = wait_ready(custom, namespace, body["metadata"]["name"])
    uid, node = obj["metadata"]["uid"], obj["metadata"]["labels"][NODE_LABEL]
    assert node in NODES
    eventually(lambda: ticks(ground, uid, node) >= 1, timeout=BOOT, what="the guest to tick")
    return uid, node


def migrate(
    custom: kubernetes.client.CustomObjectsApi, namespace: str, name: str, instance: str, **spec: Any
) -> None:
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        MIGRATIONS,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Migration",
            "metadata": {"name": name},
            "spec": {"instanceRef": {"name": instance}, "type": "Live", **spec},
        },
    )


def migration(custom: kubernetes.client.CustomObjectsApi, namespace: str, name: str) -> dict[str, Any]:
    return dict(custom.get_namespaced_custom_object(GROUP, VERSION, namespace, MIGRATIONS, name))


def wait_phase(
    custom: kubernetes.client.CustomObjectsApi, namespace: str, name: str, *phases: str, timeout: float = 180
) -> dict[str, Any]:
    """The Migration once its phase is one of ``phases``; a timeout names the phase and message it had."""
    seen: dict[str, Any] = {}

    def probe() -> dict[str, Any] | None:
        seen.update(migration(custom, namespace, name))
        return seen if seen.get("status", {}).get("phase") in phases else None

    try:
        found = eventually(probe, timeout=timeout, interval=0.2, what=f"Migration {name} {'/'.join(phases)}")
        return dict(found)
    except AssertionError as exc:
        status = seen.get("status", {})
        raise AssertionError(f"{exc}; it was {status.get('phase')}: {status.get('message')}") from None


def running_again(custom: kubernetes.client.CustomObjectsApi, namespace: str, name: str) -> None:
    """After a migration that ended without moving it: Ready and phase Running again.

    The source wrote phase Migrating while the migration's steps ran; it says Running once it sees
    the migration end, at the latest at its next resync (30 s).
    """
    eventually(
        lambda: wait_ready(custom, namespace, name)["status"]["phase"] == "Running",
        timeout=90,
        interval=1,
        what=f"{name} Running again",
    )


def test_live_migration_moves_a_running_guest_without_restarting_it(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
    nodes: tuple[str, str],
) -> None:
    uid, source = running(ground, custom, namespace, vi("live", interfaces=NIC))
    target = other(source)
    mac = eventually(lambda: guest_mac(ground, uid, source), timeout=BOOT, what="the guest's MAC")
    assert get(custom, namespace, "live")["status"]["interfaces"] == [
        {"name": "eth0", "macAddress": mac, "network": libvirt_host.NETWORK}
    ]
    migrate(custom, namespace, "live-1", "live")
    done = wait_phase(custom, namespace, "live-1", "Succeeded", "Failed")
    status = done["status"]
    assert status["phase"] == "Succeeded", status.get("message")
    assert (status["sourceNode"], status["targetNode"], status["instanceUID"]) == (source, target, uid)
    assert status["progress"]["elapsedMs"] > 0 and status["progress"]["downtimeMs"] >= 0
    assert status["startTime"] and status["completionTime"]
    assert node_of(custom, namespace, "live") == target
    assert get(custom, namespace, "live")["status"]["node"] == target, (
        "the status never contradicts the Migration"
    )
    # Ready again once the target's agent has written its own status.
    eventually(
        lambda: (
            (o := wait_ready(custom, namespace, "live"))
            and next(c for c in o["status"]["conditions"] if c["type"] == "Scheduled")["message"]
            == f"placed on {target}"
            and o
        ),
        timeout=60,
        what="the target's agent to report the instance",
    )
    assert has_domain(ground, target, uid) and not has_domain(ground, source, uid)
    assert not ground.instance_dir(uid, source).exists(), "the source's files are cleaned up"
    # The same guest goes on counting on the target: no new boot.
    first = eventually(
        lambda: ticks(ground, uid, target) >= 0 and ticks(ground, uid, target),
        timeout=30,
        what="the counter on the target",
    )
    eventually(lambda: ticks(ground, uid, target) > first, timeout=30, what="the counter to go on")
    assert guest.BOOT_MARKER not in console(ground, uid, target)
    assert (
        eventually(lambda: guest_mac(ground, uid, target), timeout=30, what="the guest's MAC on the target")
        == mac
    ), "the guest sees the address it had"
    assert get(custom, namespace, "live")["status"]["interfaces"][0]["macAddress"] == mac
    delete_and_wait(custom, namespace, "live")
    assert not has_domain(ground, target, uid)


class FlowWatch(PacketWatch):
    """The first payload bytes of each TCP connection through a link, as an eavesdropper on the migration
    network sees them."""

    def __init__(self, link: str) -> None:
        super().__init__(link)
        #: (source, source port, destination, destination port) -> the first payload bytes
        self.first: dict[tuple[str, int, str, int], bytes] = {}

    def seen(self, frame: bytes) -> None:
        ip = frame[14:]
        if frame[12:14] != b"\x08\x00" or len(ip) < 20 or ip[9] != socket.IPPROTO_TCP:
            return
        tcp = ip[(ip[0] & 0x0F) * 4 :]
        payload = tcp[(tcp[12] >> 4) * 4 :]
        sport, dport = struct.unpack("!HH", tcp[:4])
        key = (socket.inet_ntoa(ip[12:16]), sport, socket.inet_ntoa(ip[16:20]), dport)
        if payload and key not in self.first:
            self.first[key] = payload[:8]


#: libvirtd's TLS port, and the ports QEMU's migration stream and its NBD disk copy use.
LIBVIRT_TLS_PORT, QEMU_PORTS = 16514, range(49152, 49216)


def test_migration_is_encrypted_and_the_hosts_refuse_it_in_clear(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
    nodes: tuple[str, str],
) -> None:
    """An eavesdropper on the migration network sees only TLS: libvirt's control channel (qemu+tls) and
    QEMU's stream of memory and disks (VIR_MIGRATE_TLS) each begin with a TLS handshake. The hosts force
    it: a migration asked for without TLS is refused, and no host listens for plain qemu+tcp."""
    uid, source = running(ground, custom, namespace, vi("sealed"))
    target = other(source)
    address = testground.node_address(target)
    plain = subprocess.run(
        ["virsh", "-c", libvirt_host.uri(ground.layout, source), "migrate", "--live", "--p2p", "--persistent",
         "--undefinesource", uid, libvirt_host.peer_uri(address), f"tcp://{address}"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert plain.returncode != 0 and "TLS" in plain.stderr, plain.stderr
    assert has_domain(ground, source, uid), "the refused migration left the guest where it was"
    clear = subprocess.run(["virsh", "-c", f"qemu+tcp://{address}/system", "version"], capture_output=True)
    assert clear.returncode != 0, "a host answers plain qemu+tcp"

    with FlowWatch(libvirt_host.peer_link(source)) as watch:
        migrate(custom, namespace, "sealed-1", "sealed")
        status = wait_phase(custom, namespace, "sealed-1", "Succeeded", "Failed")["status"]
    assert status["phase"] == "Succeeded", status.get("message")
    assert has_domain(ground, target, uid) and not has_domain(ground, source, uid)
    # Each connection from the source to the target, as its first bytes show it.
    opened = {
        dport: first for (src, _, dst, dport), first in watch.first.items()
        if (src, dst) == (testground.node_address(source), address)
    }  # fmt: skip
    assert LIBVIRT_TLS_PORT in opened, f"no control channel to the target (seen: {sorted(opened)})"
    assert any(port in QEMU_PORTS for port in opened), f"no migration stream (seen: {sorted(opened)})"
    clear_text = {port: first for port, first in opened.items() if first[:2] != b"\x16\x03"}
    assert not clear_text, f"connections that did not begin with a TLS handshake: {clear_text}"
    delete_and_wait(custom, namespace, "sealed")


def attachment(custom: kubernetes.client.CustomObjectsApi, namespace: str, name: str) -> dict[str, Any]:
    return dict(custom.get_namespaced_custom_object(GROUP, VERSION, namespace, VOLUMEATTACHMENTS, name))


def attached_on(custom: kubernetes.client.CustomObjectsApi, namespace: str, name: str, node: str) -> None:
    """The attachment says Attached on ``node``, and is bound there."""
    eventually(
        lambda: (
            ((va := attachment(custom, namespace, name))["metadata"].get("labels") or {}).get(NODE_LABEL)
            == node
            and (va.get("status") or {}).get("node") == node
            and va["status"].get("phase") == "Attached"
        ),
        timeout=60,
        what=f"{name} Attached on {node}",
    )


def test_a_guests_disks_and_volumes_move_with_it_live_then_cold(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
    nodes: tuple[str, str],
) -> None:
    """What the guest wrote to its own disk (vdb, ephemeral), what a store volume holds (vdc, written on
    the node before it was attached) and an image volume (vdd) move live, then cold, and the guest reads
    them back at each new boot."""
    pattern, stored = f"LIVE-{uuid.uuid4().hex[:8]}", f"VOL-{uuid.uuid4().hex[:8]}"
    cmdline = f"{guest.CMDLINE} {guest.write_hook('vdb', pattern)}"
    body = vi(
        "keeper",
        rootDisk={"sizeGiB": 1},
        ephemeralDisks=[{"name": "scratch", "sizeGiB": 1}],
        boot={"kernel": {"image": guest.KERNEL, "initrd": guest.INITRD, "cmdline": cmdline}},
    )
    uid, source = running(ground, custom, namespace, body)
    target = other(source)
    files = {node: ground.volume_store(node) / namespace / "kept" for node in NODES}
    files[source].parent.mkdir(parents=True, exist_ok=True)
    with open(files[source], "xb") as f:
        f.write(stored.encode())
        f.truncate(2**30)
    attach(custom, namespace, "kept", "keeper", volume={"name": "kept"})
    attached_on(custom, namespace, "kept", source)
    assert attachment(custom, namespace, "kept")["status"]["sizeBytes"] == 2**30
    # An image volume: an overlay in the instance's folder, over each node's own copy of the image.
    attach(custom, namespace, "cd", "keeper", image={"name": guest.DISK_IMAGE}, readOnly=True)
    attached_on(custom, namespace, "cd", source)
    eventually(
        lambda: f"{guest.WROTE} vdb {pattern}" in console(ground, uid, source),
        timeout=BOOT,
        what="the guest to write its pattern to its disk",
    )
    lines = [
        f"{guest.DISK} {dev} sectors={2**30 // 512} head={text.encode().ljust(16, bytes(1)).hex()}"
        for dev, text in (("vdb", pattern), ("vdc", stored))
    ] + [f"{guest.DISK} vdd sectors={guest.DISK_IMAGE_MIB * 2**20 // 512} "]

    def read_back(node: str) -> bool:
        text = console(ground, uid, node)
        return all(line in text for line in lines)

    # Live: the volume's bytes travel with the block copy; the attachment follows its instance.
    migrate(custom, namespace, "vol-live", "keeper")
    done = wait_phase(custom, namespace, "vol-live", "Succeeded", "Failed")["status"]
    assert done["phase"] == "Succeeded", done.get("message")
    attached_on(custom, namespace, "kept", target)
    attached_on(custom, namespace, "cd", target)
    assert files[target].read_bytes()[: len(stored)] == stored.encode(), "the bytes are on the target"
    assert not files[source].exists(), "the source's copy goes once the target has it"
    custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        VIRTUALINSTANCES,
        "keeper",
        {"spec": {"actions": {"reboot": {"id": "after-live", "type": "Hard"}}}},
    )
    assert wait_action(custom, namespace, "keeper", "reboot", "after-live")["phase"] == "Succeeded"
    eventually(
        lambda: read_back(target),
        timeout=BOOT,
        what="the guest to read its disk and volumes back on the target at boot",
    )

    # Cold, back: the volume is downloaded with the disks; the source's copy stays until the decision.
    # Reverted first (the copy goes, the original runs on), then confirmed (the original goes).
    for name, decision in (("vol-revert", "Revert"), ("vol-cold", "Confirm")):
        migrate(custom, namespace, name, "keeper", type="Cold", confirmation={"policy": "Manual"})
        waiting = wait_phase(custom, namespace, name, "AwaitingConfirmation", "Failed")["status"]
        assert waiting["phase"] == "AwaitingConfirmation", waiting.get("message")
        attached_on(custom, namespace, "kept", source)
        assert files[source].read_bytes()[: len(stored)] == stored.encode()
        assert files[target].exists(), "kept until the decision"
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, MIGRATIONS, name, {"spec": {"decision": decision}}
        )
        ended = wait_phase(custom, namespace, name, "Succeeded", "Reverted", "Failed")["status"]
        # A revert drops the copy: else the next move here would refuse to overwrite it.
        wanted = {"Revert": "Reverted", "Confirm": "Succeeded"}[decision]
        assert ended["phase"] == wanted, ended.get("message")
    eventually(
        lambda: read_back(source),
        timeout=BOOT,
        what="the guest to read its disk and volumes back after the cold moves",
    )
    attached_on(custom, namespace, "kept", source)
    attached_on(custom, namespace, "cd", source)
    assert not files[target].exists() and files[source].read_bytes()[: len(stored)] == stored.encode()

    # A claim's volume does not move with its instance: the Migration is refused, naming claim and fix.
    kubernetes.client.CoreV1Api(custom.api_client).create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "held"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    )
    attach(custom, namespace, "claimed", "keeper", volume={"persistentVolumeClaim": {"claimName": "held"}})
    migrate(custom, namespace, "vol-claim", "keeper")
    refused = wait_phase(custom, namespace, "vol-claim", "Succeeded", "Failed")["status"]
    assert refused["phase"] == "Failed", refused
    for said in ("'claimed'", "'held'", "ReadWriteOnce", "one node at a time", "attach the claim again"):
        assert said in refused["message"], refused["message"]
    delete_and_wait(custom, namespace, "claimed", VOLUMEATTACHMENTS)
    for name in ("kept", "cd"):
        delete_and_wait(custom, namespace, name, VOLUMEATTACHMENTS)
    delete_and_wait(custom, namespace, "keeper")
    assert files[source].exists(), "a detached volume stays in its node's store"


def slow_transfer_under_way(
    custom: kubernetes.client.CustomObjectsApi, namespace: str, name: str, instance: str, **spec: Any
) -> None:
    """A Live Migration capped at 1 MiB/s (a 128 MiB guest takes minutes), once it reports progress."""
    migrate(custom, namespace, name, instance, bandwidthMiBps=1, **spec)
    eventually(
        lambda: (migration(custom, namespace, name).get("status", {}).get("progress") or {}).get(
            "dataProcessedBytes"
        ),
        timeout=60,
        interval=0.2,
        what="the transfer to report progress",
    )


def stayed_on_the_source(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
    name: str,
    uid: str,
    source: str,
) -> None:
    """After a migration that did not move it: still bound to the source, its one domain there, nothing
    on the target, the same guest going on."""
    target = other(source)
    assert node_of(custom, namespace, name) == source
    assert has_domain(ground, source, uid) and not has_domain(ground, target, uid)
    assert not ground.instance_dir(uid, target).exists(), "nothing is left on the target"
    before = ticks(ground, uid, source)
    eventually(
        lambda: ticks(ground, uid, source) > before, timeout=30, what="the guest to go on at the source"
    )


def test_cancelling_a_live_migration_leaves_the_guest_running_on_the_source(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
    nodes: tuple[str, str],
) -> None:
    uid, source = running(ground, custom, namespace, vi("stay"))
    slow_transfer_under_way(custom, namespace, "slow", "stay")
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, MIGRATIONS, "slow", {"spec": {"cancel": True}}
    )
    status = wait_phase(custom, namespace, "slow", "Cancelled", "Failed", "Succeeded", timeout=60)["status"]
    assert status["phase"] == "Cancelled", status.get("message")
    assert (
        "cancelled during the transfer" in status["message"]
        and f"keeps running on {source}" in status["message"]
    )
    stayed_on_the_source(ground, custom, namespace, "stay", uid, source)
    running_again(custom, namespace, "stay")
    delete_and_wait(custom, namespace, "stay")


def test_deleting_an_instance_mid_transfer_stops_the_migration_and_deletes_it_at_once(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
    nodes: tuple[str, str],
) -> None:
    """A user's delete never waits for a slow transfer: the transfer is aborted, the target rolled back,
    the Migration says Cancelled and why, and the instance is gone within seconds from both nodes."""
    uid, source = running(ground, custom, namespace, vi("doomed"))
    target = other(source)
    # A deadline far beyond the wait below (600 s per GiB of 128 MiB: 75 s), so only the delete can stop it.
    slow_transfer_under_way(custom, namespace, "doomed-1", "doomed", completionTimeoutPerGiB=600)
    deleted = time.monotonic()
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, "doomed")
    eventually(
        lambda: get(custom, namespace, "doomed") is None, timeout=30, interval=0.2, what="the instance gone"
    )
    gone_after = time.monotonic() - deleted
    status = migration(custom, namespace, "doomed-1")["status"]
    assert status["phase"] == "Cancelled" and "being deleted" in status["message"], status
    for node in (source, target):
        assert not has_domain(ground, node, uid), f"a domain is left on {node}"
        assert not ground.instance_dir(uid, node).exists(), f"files are left on {node}"
    print(f"instance deleted mid-transfer: gone in {gone_after:.1f}s")


def test_a_transfer_that_cannot_finish_in_time_fails_at_its_deadline_and_the_guest_stays(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
    nodes: tuple[str, str],
) -> None:
    """1 MiB/s for a 128 MiB guest needs minutes; 1 s per GiB gives it the least deadline, 10 s."""
    uid, source = running(ground, custom, namespace, vi("late"))
    started = time.monotonic()
    migrate(custom, namespace, "late-1", "late", bandwidthMiBps=1, completionTimeoutPerGiB=1)
    status = wait_phase(custom, namespace, "late-1", "Failed", "Succeeded", "Cancelled", timeout=90)["status"]
    took = time.monotonic() - started
    assert status["phase"] == "Failed", status.get("message")
    assert "did not complete within 10 s" in status["message"] and "MiB moved" in status["message"]
    assert f"keeps running on {source}" in status["message"]
    stayed_on_the_source(ground, custom, namespace, "late", uid, source)
    assert console(ground, uid, source).count(guest.BOOT_MARKER) == 1, "no second boot"
    print(f"migration deadline: Failed {took:.1f}s after its creation (deadline 10 s)")
    delete_and_wait(custom, namespace, "late")


#: A guest that pre-copy cannot move: it rewrites 64 MiB of its 256 MiB without end, over a link capped at
#: 8 MiB/s. The first memory pass carries what is not zero (the 64 MiB, the kernel, the initramfs's files:
#: about 90 MiB, some 12 s); every pass after it carries the 64 MiB again (8 s), which the guest has
#: rewritten long before (a dd of 64 MiB takes well under a second even under TCG), so what is left never
#: shrinks to what the 300 ms of downtime allowed could carry (2.4 MiB). A quiet guest of this size moves in
#: about 5 s. The deadline, 120 s per GiB of 256 MiB, is 30 s: six times what the quiet guest needs.
BUSY_MIB, BUSY_MEMORY_MIB, BUSY_BANDWIDTH, BUSY_TIMEOUT_PER_GIB, BUSY_DEADLINE = 64, 256, 8, 120, 30


def busy(
    ground: testground.Ground, custom: kubernetes.client.CustomObjectsApi, namespace: str, name: str
) -> tuple[str, str]:
    """Create a guest that rewrites BUSY_MIB of its memory without end; once it does, (uid, node)."""
    cmdline = f"{guest.CMDLINE} {guest.dirty_hook(BUSY_MIB)}"
    body = vi(
        name,
        flavor={"vcpus": 1, "memoryMiB": BUSY_MEMORY_MIB},
        boot={"kernel": {"image": guest.KERNEL, "initrd": guest.INITRD, "cmdline": cmdline}},
    )
    uid, source = running(ground, custom, namespace, body)
    eventually(
        lambda: f"{guest.DIRTY} {BUSY_MIB}" in console(ground, uid, source),
        timeout=30,
        what="the guest to rewrite its memory",
    )
    return uid, source


def test_a_guest_that_writes_memory_faster_than_the_link_fails_at_its_deadline_and_stays(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
    nodes: tuple[str, str],
) -> None:
    """Without spec.convergence pre-copy goes round until the deadline aborts it (about 40 s in all)."""
    uid, source = busy(ground, custom, namespace, "busy")
    started = time.monotonic()
    migrate(
        custom,
        namespace,
        "busy-1",
        "busy",
        bandwidthMiBps=BUSY_BANDWIDTH,
        completionTimeoutPerGiB=BUSY_TIMEOUT_PER_GIB,
    )
    status = wait_phase(custom, namespace, "busy-1", "Failed", "Succeeded", "Cancelled", timeout=90)["status"]
    took = time.monotonic() - started
    assert status["phase"] == "Failed", status.get("message")
    assert f"did not complete within {BUSY_DEADLINE} s" in status["message"], status["message"]
    assert f"keeps running on {source}" in status["message"]
    assert status["progress"]["mode"] == "PreCopy" and status["progress"]["iteration"] >= 2
    stayed_on_the_source(ground, custom, namespace, "busy", uid, source)
    assert console(ground, uid, source).count(guest.BOOT_MARKER) == 1, "no second boot"
    print(
        f"busy guest without convergence: Failed {took:.1f}s after its creation (deadline {BUSY_DEADLINE} s)"
    )
    delete_and_wait(custom, namespace, "busy")


def test_post_copy_moves_a_guest_that_pre_copy_cannot_and_it_goes_on_counting(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
    nodes: tuple[str, str],
) -> None:
    """The same guest, cap and deadline as above, with spec.convergence.postCopy. The third pass begins with
    as much left as the second (the 64 MiB), so the transfer switches to post-copy then (about 20 to 25 s
    in; at the deadline, 30 s, at the latest), and ends once the rest has followed, each page once, at the
    same 8 MiB/s: at most about 100 MiB more, some 12 s. About 40 s in all; 90 s allowed."""
    uid, source = busy(ground, custom, namespace, "busier")
    target = other(source)
    started = time.monotonic()
    migrate(
        custom,
        namespace,
        "busier-1",
        "busier",
        bandwidthMiBps=BUSY_BANDWIDTH,
        completionTimeoutPerGiB=BUSY_TIMEOUT_PER_GIB,
        convergence={"postCopy": True},
    )
    status = wait_phase(custom, namespace, "busier-1", "Succeeded", "Failed", "Cancelled", timeout=90)[
        "status"
    ]
    took = time.monotonic() - started
    assert status["phase"] == "Succeeded", status.get("message")
    assert status["progress"]["mode"] == "PostCopy" and "converged with post-copy after" in status["message"]
    assert status["progress"]["postCopyAfterMs"] <= (BUSY_DEADLINE + 5) * 1000, "switched by the deadline"
    assert node_of(custom, namespace, "busier") == target
    assert has_domain(ground, target, uid) and not has_domain(ground, source, uid)
    # The same guest goes on counting on the target: no new boot.
    first = eventually(
        lambda: ticks(ground, uid, target) >= 0 and ticks(ground, uid, target),
        timeout=30,
        what="the counter on the target",
    )
    eventually(lambda: ticks(ground, uid, target) > first, timeout=30, what="the counter to go on")
    assert guest.BOOT_MARKER not in console(ground, uid, target)
    print(
        f"busy guest with post-copy: Succeeded {took:.1f}s after its creation, switched after "
        f"{status['progress']['postCopyAfterMs'] / 1000:.1f}s"
    )
    delete_and_wait(custom, namespace, "busier")


def test_a_migration_to_a_dead_target_fails_clearly_and_leaves_the_guest_alone(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
    nodes: tuple[str, str],
) -> None:
    uid, source = running(ground, custom, namespace, vi("alone"))
    target = other(source)
    libvirt_host.stop(ground.layout, target)  # kill -9 of the target's libvirtd and its QEMUs
    try:
        migrate(custom, namespace, "doomed", "alone", targetNode=target)
        status = wait_phase(custom, namespace, "doomed", "Failed", "Succeeded", timeout=120)["status"]
        assert status["phase"] == "Failed"
        message = status["message"]
        # Refused before it starts once the target's agent said libvirt is gone (Ready=False), or by the
        # target's preparation if the planner was quicker than that report.
        assert f"{target}: not ready" in message or (
            f"{target} could not prepare" in message and f"running on {source}" in message
        ), message
        assert node_of(custom, namespace, "alone") == source and has_domain(ground, source, uid)
        before = ticks(ground, uid, source)
        eventually(lambda: ticks(ground, uid, source) > before, timeout=30, what="the guest to go on")
    finally:
        libvirt_host.start(ground.layout, target, testground.node_address(target))
    assert not has_domain(ground, target, uid)
    assert wait_ready(custom, namespace, "alone")["status"]["node"] == source
    delete_and_wait(custom, namespace, "alone")
    # The next test finds the target as this one found it: Ready, once its agent has looked at libvirt again
    # (the next test's migration to it failed "not ready" once destroys stopped taking 1.4 s each).
    computenode = (GROUP, VERSION, COMPUTENODES, target)
    eventually(
        lambda: cond(custom.get_cluster_custom_object(*computenode), "Ready").get("status") == "True",
        timeout=60,
        what=f"{target} Ready again",
    )


def size_line(ground: testground.Ground, uid: str, node: str) -> tuple[int, int] | None:
    found = re.findall(rf"{guest.SIZE} cpus=(\d+) memtotal-kib=(\d+)", console(ground, uid, node))
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def test_cold_resize_confirm_revert_and_auto_confirm(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
    nodes: tuple[str, str],
) -> None:
    uid, first = running(ground, custom, namespace, vi("grow"))
    second = other(first)
    cpus, small = eventually(
        lambda: size_line(ground, uid, first), timeout=BOOT, what="the guest's size line"
    )
    assert cpus == 1
    bigger = {"vcpus": 2, "memoryMiB": 256}
    # Resize, confirmed by hand: the guest boots on the other node with more memory; the source copy goes.
    migrate(
        custom, namespace, "resize", "grow", type="Cold", flavor=bigger, confirmation={"policy": "Manual"}
    )
    waiting = wait_phase(custom, namespace, "resize", "AwaitingConfirmation", "Failed")["status"]
    assert waiting["phase"] == "AwaitingConfirmation", waiting.get("message")
    assert node_of(custom, namespace, "grow") == second
    grown = eventually(
        lambda: size_line(ground, uid, second), timeout=BOOT, what="the resized guest's size line"
    )
    assert grown[0] == 2 and grown[1] > small
    assert has_domain(ground, first, uid), "the source keeps its copy until the resize is confirmed"
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, MIGRATIONS, "resize", {"spec": {"decision": "Confirm"}}
    )
    assert wait_phase(custom, namespace, "resize", "Succeeded", "Failed")["status"]["phase"] == "Succeeded"
    assert not has_domain(ground, first, uid) and not ground.instance_dir(uid, first).exists()
    obj = wait_ready(custom, namespace, "grow")
    assert obj["status"]["flavor"] == bigger and obj["spec"]["flavor"]["vcpus"] == 1, (
        "spec is never rewritten"
    )
    assert obj["status"]["info"]["vcpus"] == 2
    # A second resize, reverted: the instance runs where it was, with the flavor it had.
    migrate(
        custom,
        namespace,
        "shrink",
        "grow",
        type="Cold",
        flavor=obj["spec"]["flavor"],
        confirmation={"policy": "Manual"},
    )
    assert (
        wait_phase(custom, namespace, "shrink", "AwaitingConfirmation", "Failed")["status"]["phase"]
        == "AwaitingConfirmation"
    )
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, MIGRATIONS, "shrink", {"spec": {"decision": "Revert"}}
    )
    reverted = wait_phase(custom, namespace, "shrink", "Reverted", "Failed")["status"]
    assert reverted["phase"] == "Reverted", reverted.get("message")
    assert node_of(custom, namespace, "grow") == second
    assert has_domain(ground, second, uid) and not has_domain(ground, first, uid)
    try:
        obj = eventually(
            lambda: (o := wait_ready(custom, namespace, "grow")) and o["status"]["info"]["vcpus"] == 2 and o,
            timeout=60,
            what="the original flavor back",
        )
    except AssertionError as exc:
        status = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, "grow")
        said = {key: status["status"].get(key) for key in ("info", "flavor", "phase")}
        raise AssertionError(f"{exc}; status {said}") from None
    assert obj["status"]["flavor"] == bigger
    # Auto confirmation once the window passes (Nova's resize_confirm_window).
    migrate(
        custom,
        namespace,
        "auto",
        "grow",
        type="Cold",
        confirmation={"policy": "Auto", "autoConfirmSeconds": 3},
    )
    auto = wait_phase(custom, namespace, "auto", "Succeeded", "Failed")["status"]
    assert auto["phase"] == "Succeeded" and "confirmed automatically" in auto["message"]
    assert node_of(custom, namespace, "grow") == first and not has_domain(ground, second, uid)
    delete_and_wait(custom, namespace, "grow")


def evacuations(
    custom: kubernetes.client.CustomObjectsApi, node: str, namespace: str
) -> list[dict[str, Any]]:
    return list(
        custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, MIGRATIONS, label_selector=f"{EVACUATION_LABEL}={node}"
        )["items"]
    )


def maintenance(custom: kubernetes.client.CustomObjectsApi, node: str, on: bool) -> None:
    custom.patch_cluster_custom_object(GROUP, VERSION, COMPUTENODES, node, {"spec": {"maintenance": on}})


def node_status(custom: kubernetes.client.CustomObjectsApi, node: str) -> dict[str, Any]:
    return dict(custom.get_cluster_custom_object(GROUP, VERSION, COMPUTENODES, node).get("status") or {})


def test_maintenance_empties_a_node_and_turning_it_off_cancels_what_has_not_started(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
    nodes: tuple[str, str],
) -> None:
    first, second = nodes
    custom.patch_cluster_custom_object(GROUP, VERSION, COMPUTENODES, second, {"spec": {"enabled": False}})
    try:
        names = [f"busy-{i}" for i in range(3)]
        for name in names:  # NICs without a MAC: the most common VM must not block a drain
            assert running(ground, custom, namespace, vi(name, interfaces=NIC))[1] == first
    finally:
        custom.patch_cluster_custom_object(GROUP, VERSION, COMPUTENODES, second, {"spec": {"enabled": True}})
    maintenance(custom, first, True)
    try:
        drained = eventually(
            lambda: (
                (m := node_status(custom, first).get("maintenance") or {}).get("state") == "Drained" and m
            ),
            timeout=300,
            interval=0.5,
            what=f"{first} drained",
        )
    finally:
        maintenance(custom, first, False)
    moves = [e for e in drained["migrations"] if e["instance"].startswith(f"{namespace}/")]
    # each instance moved once; a move that failed was made again (EVACUATION_ATTEMPTS)
    assert sorted(e["instance"] for e in moves if e["phase"] == "Succeeded") == [
        f"{namespace}/{name}" for name in names
    ]
    assert {e["phase"] for e in moves} <= {"Succeeded", "Failed"}, moves
    assert all(node_of(custom, namespace, name) == second for name in names)
    eventually(
        lambda: "maintenance" not in node_status(custom, first),
        timeout=30,
        what="the maintenance status to go once it is off",
    )
    # Now the other way, stopped after the first move: what has not started is cancelled.
    maintenance(custom, second, True)
    try:
        eventually(
            lambda: any(
                m.get("status", {}).get("phase") == "Succeeded"
                for m in evacuations(custom, second, namespace)
            ),
            timeout=120,
            interval=0.2,
            what="the first evacuation to finish",
        )
    finally:
        maintenance(custom, second, False)
    final = eventually(
        lambda: (
            (ms := evacuations(custom, second, namespace))
            and all(m.get("status", {}).get("step") == "Done" for m in ms)
            and ms
        ),
        timeout=120,
        what="every evacuation to end",
    )
    phases = sorted(m["status"]["phase"] for m in final)
    assert "Cancelled" in phases and "Failed" not in phases, phases
    stayed = [m["spec"]["instanceRef"]["name"] for m in final if m["status"]["phase"] == "Cancelled"]
    for name in stayed:
        assert node_of(custom, namespace, name) == second
        running_again(custom, namespace, name)
    state = eventually(
        lambda: (node_status(custom, second).get("maintenance") or {}).get("state"),
        timeout=30,
        what="the maintenance state",
    )
    assert state == "Stopped"
    for name in names:
        delete_and_wait(custom, namespace, name)


def test_the_longest_names_the_api_accepts_run_snapshot_migrate_and_go(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    core: kubernetes.client.CoreV1Api,
    nodes: tuple[str, str],
) -> None:
    # 63 characters of namespace, 253 of name: "<namespace>_<name>" would pass libvirt's 255-byte file names.
    namespace = f"t-{uuid.uuid4().hex}".ljust(63, "n")
    name = f"long-{uuid.uuid4().hex[:8]}.".ljust(252, "x") + "z"
    assert (len(namespace), len(name)) == (63, 253)
    core.create_namespace({"metadata": {"name": namespace}})
    snapshot_name = f"snap-{uuid.uuid4().hex}".ljust(247, "s") + ".qcow2"  # 253 too
    snapshot = pathlib.Path("/nonexistent")
    try:
        uid, source = running(
            ground, custom, namespace, vi(name, rootDisk={"sizeGiB": 1}, vnc={"enabled": True})
        )
        snapshot = ground.snapshots(namespace, source) / snapshot_name  # in the store of the node it runs on
        conn = libvirt.open(libvirt_host.uri(ground.layout, source))
        try:
            dom = conn.lookupByUUIDString(uid)
            assert len(dom.name()) <= 200 and dom.name().startswith(f"{namespace}_long-"), dom.name()
            assert dom.metadata(libvirt.VIR_DOMAIN_METADATA_TITLE, None) == f"{namespace}/{name}"
        finally:
            conn.close()
        status = eventually(
            lambda: (o := get(custom, namespace, name)) and o["status"].get("vnc") and o["status"],
            timeout=60,
            what="the VNC endpoint in status",
        )
        secret = status["vnc"]["passwordSecretRef"]["name"]
        assert len(secret) <= 253 and secret.endswith("-vnc")
        assert core.read_namespaced_secret(secret, namespace).data["password"]
        custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            VIRTUALINSTANCES,
            name,
            {"spec": {"actions": {"snapshot": {"id": "long", "imageName": snapshot.name}}}},
        )
        done = wait_action(custom, namespace, name, "snapshot", "long")
        assert done["phase"] == "Succeeded", done
        assert snapshot.exists()
        migrate(custom, namespace, "move", name)
        moved = wait_phase(custom, namespace, "move", "Succeeded", "Failed")["status"]
        assert moved["phase"] == "Succeeded", moved.get("message")
        target = other(source)
        assert has_domain(ground, target, uid) and not has_domain(ground, source, uid)
        eventually(lambda: ticks(ground, uid, target) >= 0, timeout=30, what="the guest on the target")
        delete_and_wait(custom, namespace, name)
        assert not has_domain(ground, target, uid) and not ground.instance_dir(uid, target).exists()
    finally:
        empty_namespace(custom, namespace)
        snapshot.unlink(missing_ok=True)


def test_an_instance_of_an_imported_image_moves_and_the_target_imports_it_first(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    served: Served,
    namespace: str,
    nodes: tuple[str, str],
) -> None:
    name, checksum = serve(served, served.root / guest.DISK_IMAGE)  # no node has these bytes yet
    image = {"url": served.url(name), "checksum": checksum}
    uid, source = running(
        ground, custom, namespace, vi("imported", boot={"image": image}, rootDisk={"sizeGiB": 1})
    )
    migrate(custom, namespace, "move", "imported")
    done = wait_phase(custom, namespace, "move", "Succeeded", "Failed")
    assert done["status"]["phase"] == "Succeeded", done["status"]
    target = other(source)
    assert node_of(custom, namespace, "imported") == target and has_domain(ground, target, uid)
    before = ticks(ground, uid, target)
    eventually(lambda: ticks(ground, uid, target) > before, timeout=30, what="the guest going on counting")
    assert len([r for r in served.requests(name) if r["status"] == 200]) == 2, "once per node"


def test_a_snapshot_pushed_to_the_registry_boots_on_another_node_both_ways(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    core: kubernetes.client.CoreV1Api,
    served: Served,
    namespace: str,
    nodes: tuple[str, str],
) -> None:
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "registry"},
            "stringData": {"username": served.username, "password": served.password, "ca.crt": served.ca_pem},
        },
    )
    pull = {"secretRef": {"name": "registry"}}
    for here, there in ((nodes[0], ground.node), (ground.node, nodes[1])):
        source = f"snap-{here}"
        body = make(
            source, nodeName=here, boot={"image": {"name": guest.DISK_IMAGE}}, rootDisk={"sizeGiB": 1}
        )
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, body)
        wait_ready(custom, namespace, source)
        tag = f"{served.registry}/{namespace}/{source}:s1"
        request = {"id": "s1", "imageName": f"{source}.qcow2", "imageRef": tag, **pull}
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, VIRTUALINSTANCES, source, {"spec": {"actions": {"snapshot": request}}}
        )
        snapshot = wait_action(custom, namespace, source, "snapshot", "s1")
        assert snapshot["phase"] == "Succeeded" and snapshot["imageRef"].startswith(
            tag.rsplit(":", 1)[0] + "@sha256:"
        )
        assert (ground.snapshots(namespace, here) / f"{source}.qcow2").is_file()
        assert not (ground.snapshots(namespace, there) / f"{source}.qcow2").exists(), (
            "each node its own store"
        )

        booted = f"from-{here}"
        body = make(booted, nodeName=there, boot={"image": {"registry": snapshot["imageRef"], **pull}})
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, body)
        uid = wait_ready(custom, namespace, booted, timeout=180)["metadata"]["uid"]
        eventually(lambda u=uid, n=there: ticks(ground, u, n) >= 1, timeout=BOOT, what=f"{booted} on {there}")
