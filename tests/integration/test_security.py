"""What a spec cannot do: reach host files, leak secrets, cross namespaces, or open a port to everyone."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import uuid

import kubernetes
import libvirt

from kubenova.handlers.shared import GROUP, VERSION, VIRTUALINSTANCES, VOLUMEATTACHMENTS
from testground import ground as testground
from testground import guest, libvirt_host, procs
from tests.helpers import PacketWatch, eventually, listeners, on_every_interface
from tests.integration.test_agent import attach, console_text, patch_spec, wait_action, wait_ready
from tests.integration.test_virtualinstance import cond, domain, get, make


def failed_naming(
    custom: kubernetes.client.CustomObjectsApi, namespace: str, name: str, field: str
) -> dict[str, str]:
    obj = eventually(
        lambda: (o := get(custom, namespace, name)) and o.get("status", {}).get("phase") == "Failed" and o,
        timeout=60,
        what=f"{name} Failed",
    )
    ready = cond(obj, "Ready")
    assert field in ready["message"], ready
    return ready


def test_a_spec_reaches_no_file_outside_the_stores(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    hypervisor: libvirt.virConnect,
    namespace: str,
) -> None:
    outside = ground.layout.state / f"outside-{namespace}"
    outside.write_bytes(b"host secret\n")
    links = [
        ground.image_store / f"link-{namespace}",
        ground.volume_store() / namespace / f"link-{namespace}",
        ground.snapshots(namespace) / f".snap-{namespace}.qcow2.partial",
    ]
    (ground.volume_store() / namespace).mkdir(parents=True, exist_ok=True)
    ground.snapshots(namespace).mkdir(parents=True, exist_ok=True)
    for link in links:
        link.symlink_to(outside)
    try:
        # A kernel that is a symlink out of the image store.
        body = make("kernel-link")
        body["spec"]["boot"]["kernel"]["image"] = links[0].name
        uid = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, body)[
            "metadata"
        ]["uid"]
        assert (
            "outside the store"
            in failed_naming(custom, namespace, "kernel-link", "spec.boot.kernel.image")["message"]
        )
        assert domain(hypervisor, uid) is None
        # A volume that is a symlink out of the volume store.
        make_running = make("vm")
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, make_running)
        wait_ready(custom, namespace, "vm")
        attach(custom, namespace, "evil", "vm", volume={"name": links[1].name, "sizeGiB": 1})
        va = eventually(
            lambda: (
                (
                    v := custom.get_namespaced_custom_object(
                        GROUP, VERSION, namespace, VOLUMEATTACHMENTS, "evil"
                    )
                )
                .get("status", {})
                .get("phase")
                == "Failed"
                and v
            ),
            timeout=60,
            what="the attachment Failed",
        )
        assert (
            "spec.volume.name" in cond(va, "Ready")["message"] and "outside" in cond(va, "Ready")["message"]
        )
        # Path traversal never passes admission; the apiserver names the field.
        for field, value in (("image", "../../etc/passwd"), ("initrd", "/etc/shadow")):
            bad = make(f"trav-{field}")
            bad["spec"]["boot"]["kernel"][field] = value
            try:
                custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, bad)
                raise AssertionError(f"{value!r} was accepted")
            except kubernetes.client.ApiException as exc:
                assert exc.status == 422 and f"spec.boot.kernel.{field}" in exc.body
        # A snapshot whose temporary file someone pointed outside the store: the link is replaced, not
        # followed.
        image_vm = make("img", boot={"image": {"name": guest.DISK_IMAGE}}, rootDisk={"sizeGiB": 1})
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, image_vm)
        wait_ready(custom, namespace, "img")
        patch_spec(
            custom,
            namespace,
            "img",
            {"actions": {"snapshot": {"id": "s", "imageName": f"snap-{namespace}.qcow2"}}},
        )
        assert wait_action(custom, namespace, "img", "snapshot", "s", timeout=180)["phase"] == "Succeeded"
        (ground.snapshots(namespace) / f"snap-{namespace}.qcow2").unlink()
        assert outside.read_bytes() == b"host secret\n", "no host file was written through a link"
    finally:
        for link in links:
            link.unlink(missing_ok=True)
        outside.unlink()


def test_secrets_stay_out_of_status_events_and_logs(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    core: kubernetes.client.CoreV1Api,
    namespace: str,
) -> None:
    password, marker = f"pw-{uuid.uuid4().hex}", f"ud-{uuid.uuid4().hex}"
    user_data = f"#cloud-config\n# {marker}\nhostname: secretive\n"
    core.create_namespaced_secret(
        namespace,
        {"metadata": {"name": "creds"}, "stringData": {"password": password, "userData": user_data}},
    )
    logs = {
        name: ground.layout.logfile(name).stat().st_size for name in ("controller", f"agent-{ground.node}")
    }
    body = make(
        "secretive",
        boot={"image": {"name": guest.DISK_IMAGE}},
        rootDisk={"sizeGiB": 1},
        adminPasswordSecretRef={"name": "creds"},
        userDataSecretRef={"name": "creds"},
        vnc={"enabled": True},
    )
    uid = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, body)[
        "metadata"
    ]["uid"]
    wait_ready(custom, namespace, "secretive")
    # The guest got both (through the config drive)...
    eventually(
        lambda: guest.TICK in console_text(ground, uid),
        timeout=120,
        what="the guest past printing its config drive",
    )
    files = dict(re.findall(rf"{guest.CD_FILE} (\S+) (\S+)", console_text(ground, uid)))
    seen = b"".join(base64.b64decode(data) for data in files.values())
    assert marker.encode() in seen and password.encode() in seen
    # ...and a password reset (which this guest cannot do: no guest agent) fails without echoing it.
    patch_spec(custom, namespace, "secretive", {"actions": {"passwordReset": {"id": "p1"}}})
    wait_action(custom, namespace, "secretive", "passwordReset", "p1")
    where = {
        "the object": json.dumps(get(custom, namespace, "secretive")),
        "Events": json.dumps([e.to_dict() for e in core.list_namespaced_event(namespace).items], default=str),
    }
    for name, offset in logs.items():
        with open(ground.layout.logfile(name), errors="replace") as f:
            f.seek(offset)
            where[f"the {name} log"] = f.read()
    for what, text in where.items():
        assert password not in text and marker not in text, f"a secret shows in {what}"


def test_references_never_leave_the_namespace(
    custom: kubernetes.client.CustomObjectsApi, core: kubernetes.client.CoreV1Api, namespace: str
) -> None:
    """A client that skips strict validation loses the namespace field; the reference stays in its own
    namespace."""
    other = f"{namespace}-o"
    core.create_namespace({"metadata": {"name": other}})
    target = make("victim", powerState="Stopped")
    custom.create_namespaced_custom_object(GROUP, VERSION, other, VIRTUALINSTANCES, target)
    wait_ready(custom, other, "victim", "Stopped")
    for plural, kind, extra in (
        (VOLUMEATTACHMENTS, "VolumeAttachment", {"volume": {"name": "v", "sizeGiB": 1}}),
        ("migrations", "Migration", {"type": "Cold"}),
    ):
        created = custom.create_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            plural,
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": kind,
                "metadata": {"name": "cross"},
                "spec": {"instanceRef": {"name": "victim", "namespace": other}, **extra},
            },
            field_validation="Ignore",
        )
        assert "namespace" not in created["spec"]["instanceRef"], "the schema prunes the field"
        answered = eventually(
            lambda p=plural: (
                (o := custom.get_namespaced_custom_object(GROUP, VERSION, namespace, p, "cross"))
                .get("status", {})
                .get("message")
                or cond(o, "Ready").get("message")
            ),
            timeout=60,
            what=f"the {kind} to answer",
        )
        assert namespace in answered or "does not exist" in answered, answered
    victim = get(custom, other, "victim")
    assert victim["status"]["phase"] == "Stopped" and not (
        victim["status"].get("conditions")
        and any("migrat" in c["message"].lower() for c in victim["status"]["conditions"])
    )
    assert not custom.list_namespaced_custom_object(GROUP, VERSION, other, "migrations")["items"]
    custom.delete_namespaced_custom_object(GROUP, VERSION, other, VIRTUALINSTANCES, "victim")


def test_nothing_listens_on_all_interfaces(
    ground: testground.Ground, custom: kubernetes.client.CustomObjectsApi, namespace: str
) -> None:
    """The agent, the controller, libvirtd and every QEMU (with its VNC server) listen on chosen addresses
    only."""
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, VIRTUALINSTANCES, make("listener", vnc={"enabled": True})
    )
    wait_ready(custom, namespace, "listener")
    ours = {procs.running_pid(ground.layout, name) for name in ("controller", f"agent-{ground.node}")}
    ours |= {
        int(p)
        for p in subprocess.run(
            ["pgrep", "-f", "qemu-system|libvirtd"], capture_output=True, text=True
        ).stdout.split()
    }
    found = listeners(ours)
    assert not [line for line in found if on_every_interface(line)], f"listens on every interface: {found}"
    assert len(found) >= 3, f"expected the agent's metrics, libvirtd and a VNC server among:\n{found}"


class BridgeWatch(PacketWatch):
    """The source MACs of every frame that reaches a bridge, while in use."""

    def __init__(self, bridge: str) -> None:
        super().__init__(bridge)
        self.macs: set[str] = set()

    def seen(self, frame: bytes) -> None:
        self.macs.add(":".join(f"{b:02x}" for b in frame[6:12]))


def test_a_guest_sending_with_a_mac_not_its_own_is_dropped(
    ground: testground.Ground, custom: kubernetes.client.CustomObjectsApi, namespace: str
) -> None:
    """The guest changes its MAC and pings, as a guest impersonating another would: the instance's filter
    drops those frames (and ARP naming that MAC) before the bridge; its own frames still arrive."""
    spoofed = "52:54:00:de:ad:01"
    body = make("spoofer", interfaces=[{"name": "eth0", "network": libvirt_host.NETWORK}])
    body["spec"]["boot"]["kernel"]["cmdline"] += f" {guest.spoof_hook(spoofed)}"
    with BridgeWatch(libvirt_host.bridge(ground.node)) as watch:
        uid = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, body)[
            "metadata"
        ]["uid"]
        eventually(
            lambda: f"{guest.SPOOFED} eth0" in console_text(ground, uid),
            timeout=120,
            what="the guest to send with a spoofed MAC",
        )
    own = wait_ready(custom, namespace, "spoofer")["status"]["interfaces"][0]["macAddress"]
    assert f"{guest.SPOOFING} eth0 {spoofed}" in console_text(ground, uid)
    assert own in watch.macs, f"the guest's own frames reach the bridge (seen: {sorted(watch.macs)})"
    assert spoofed not in watch.macs, "a frame from the spoofed MAC reached the bridge"
