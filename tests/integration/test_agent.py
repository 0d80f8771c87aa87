"""Every agent verb through the Kubernetes API only, each checked in libvirt and in the guest."""

from __future__ import annotations

import base64
import os
import re
import signal
import time
import urllib.request
import uuid
from typing import Any

import kubernetes
import libvirt
import yaml

from kubenova.handlers.shared import GROUP, VERSION, VIRTUALINSTANCES, VOLUMEATTACHMENTS
from testground import ground as testground
from testground import guest, libvirt_host, procs
from tests.helpers import eventually
from tests.integration.test_virtualinstance import cond, domain, get, make


def patch_spec(
    custom: kubernetes.client.CustomObjectsApi, namespace: str, name: str, spec: dict[str, Any]
) -> None:
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, name, {"spec": spec})


def wait_ready(
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
    name: str,
    power: str = "Running",
    timeout: float = 120,
) -> dict[str, Any]:
    return eventually(
        lambda: (
            (o := get(custom, namespace, name))
            and o.get("status", {}).get("powerState") == power
            and cond(o, "Ready").get("status") == "True"
            and o["status"].get("observedGeneration") == o["metadata"]["generation"]
            and o
        ),
        timeout=timeout,
        what=f"{name} Ready and {power}",
    )


def wait_action(
    custom: kubernetes.client.CustomObjectsApi,
    namespace: str,
    name: str,
    kind: str,
    action_id: str,
    timeout: float = 120,
) -> dict[str, Any]:
    return eventually(
        lambda: (
            (a := (((get(custom, namespace, name) or {}).get("status") or {}).get("actions") or {}).get(kind))
            and a.get("id") == action_id
            and a.get("phase") in ("Succeeded", "Failed")
            and a
        ),
        timeout=timeout,
        what=f"{kind} {action_id} acknowledged",
    )


def console_text(ground: testground.Ground, uid: str) -> str:
    path = ground.console_log(uid)
    return path.read_text(errors="replace") if path.exists() else ""


def ticks(ground: testground.Ground, uid: str) -> int:
    found = re.findall(rf"{guest.TICK} (\d+)", console_text(ground, uid))
    return int(found[-1]) if found else -1


def boots(ground: testground.Ground, uid: str) -> int:
    return console_text(ground, uid).count(guest.BOOT_MARKER)


def restart_agent(ground: testground.Ground) -> None:
    """kill -9 of the agent, then the test ground starts it again."""
    name = f"agent-{ground.node}"
    pid = procs.running_pid(ground.layout, name)
    assert pid, "the agent runs"
    os.kill(pid, signal.SIGKILL)
    eventually(lambda: not procs.pid_alive(pid), timeout=10, what="the killed agent to be gone")
    testground.start_kubenova(ground)


def attach(
    custom: kubernetes.client.CustomObjectsApi, namespace: str, name: str, instance: str, **spec: Any
) -> None:
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        VOLUMEATTACHMENTS,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "VolumeAttachment",
            "metadata": {"name": name},
            "spec": {"instanceRef": {"name": instance}, **spec},
        },
    )


def delete_and_wait(
    custom: kubernetes.client.CustomObjectsApi, namespace: str, name: str, plural: str = VIRTUALINSTANCES
) -> None:
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
    eventually(
        lambda: (
            not custom.list_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, field_selector=f"metadata.name={name}"
            )["items"]
        ),
        timeout=90,
        what=f"{plural}/{name} to be gone",
    )


def test_power_states_actions_and_adoption(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    hypervisor: libvirt.virConnect,
    namespace: str,
) -> None:
    uid = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, make("verbs"))[
        "metadata"
    ]["uid"]
    wait_ready(custom, namespace, "verbs")
    eventually(lambda: ticks(ground, uid) >= 1, timeout=120, what="the guest's counter")

    # Paused: the vCPUs stop, so the counter stops; unpaused, it goes on from where it was.
    patch_spec(custom, namespace, "verbs", {"powerState": "Paused"})
    obj = wait_ready(custom, namespace, "verbs", "Paused")
    assert obj["status"]["phase"] == "Paused"
    assert domain(hypervisor, uid).state()[0] == libvirt.VIR_DOMAIN_PAUSED
    frozen = ticks(ground, uid)
    time.sleep(3)  # the guest prints a tick every second when it runs
    assert ticks(ground, uid) == frozen, "the counter moved while paused"
    patch_spec(custom, namespace, "verbs", {"powerState": "Running"})
    wait_ready(custom, namespace, "verbs")
    eventually(lambda: ticks(ground, uid) > frozen, timeout=30, what="the counter to go on after unpause")

    # Suspended: memory saved to disk, the domain is not active; resumed, the guest did not reboot.
    patch_spec(custom, namespace, "verbs", {"powerState": "Suspended"})
    wait_ready(custom, namespace, "verbs", "Suspended", timeout=180)
    dom = domain(hypervisor, uid)
    assert not dom.isActive() and dom.hasManagedSaveImage()
    before = ticks(ground, uid)
    patch_spec(custom, namespace, "verbs", {"powerState": "Running"})
    wait_ready(custom, namespace, "verbs", timeout=180)
    eventually(lambda: ticks(ground, uid) > before, timeout=60, what="the counter after resume")
    assert boots(ground, uid) == 1, "resume continues the same boot"

    # A hard reboot, acknowledged once in status, and a second boot in the guest.
    patch_spec(custom, namespace, "verbs", {"actions": {"reboot": {"id": "r1", "type": "Hard"}}})
    ack = wait_action(custom, namespace, "verbs", "reboot", "r1")
    assert ack["phase"] == "Succeeded", ack
    eventually(lambda: boots(ground, uid) == 2, timeout=120, what="the second boot marker")

    # A soft reboot: the test guest ignores ACPI, so the agent says it fell back to hard.
    patch_spec(custom, namespace, "verbs", {"actions": {"reboot": {"id": "r2", "type": "Soft"}}})
    ack = wait_action(custom, namespace, "verbs", "reboot", "r2")
    assert ack["phase"] == "Succeeded" and "rebooted hard" in ack["message"], ack
    eventually(lambda: boots(ground, uid) == 3, timeout=120, what="the third boot marker")

    # A crashed agent comes back, adopts the running domain (same QEMU, same domain id) and does
    # not repeat the reboot r2 that its status already acknowledges.
    domain_id = domain(hypervisor, uid).ID()
    restart_agent(ground)
    marker = make("after-restart")
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, marker)
    wait_ready(custom, namespace, "after-restart")  # the new agent has listed and handled everything
    assert domain(hypervisor, uid).ID() == domain_id, "the agent restarted the domain it should adopt"
    assert boots(ground, uid) == 3, "a reboot was repeated after the agent restarted"
    assert len([d for d in hypervisor.listAllDomains() if d.name() == f"{namespace}_verbs"]) == 1
    obj = get(custom, namespace, "verbs")
    assert obj["status"]["actions"]["reboot"]["id"] == "r2" and obj["status"]["phase"] == "Running"

    # Out of band: virsh destroy shows in status at once; the spec still says Running, so the
    # agent starts it again after its restart delay.
    domain(hypervisor, uid).destroy()
    obj = eventually(
        lambda: (o := get(custom, namespace, "verbs")) and o["status"]["powerState"] == "Stopped" and o,
        timeout=10,
        interval=0.05,
        what="the out-of-band stop in status",
    )
    assert cond(obj, "Ready")["reason"] == "StoppedOutsideKubernetes"
    wait_ready(custom, namespace, "verbs")
    eventually(lambda: boots(ground, uid) == 4, timeout=120, what="the guest booted again by the agent")

    # A password reset needs a guest agent the test guest lacks: acknowledged as Failed, once.
    core = kubernetes.client.CoreV1Api(custom.api_client)
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "admin"}, "stringData": {"password": "s3cret"}}
    )
    patch_spec(
        custom,
        namespace,
        "verbs",
        {"adminPasswordSecretRef": {"name": "admin"}, "actions": {"passwordReset": {"id": "p1"}}},
    )
    ack = wait_action(custom, namespace, "verbs", "passwordReset", "p1")
    assert ack["phase"] == "Failed" and "guest agent" in ack["message"], ack

    delete_and_wait(custom, namespace, "verbs")
    delete_and_wait(custom, namespace, "after-restart")
    assert domain(hypervisor, uid) is None
    assert not ground.instance_dir(uid).exists()


def test_image_boot_with_disks_config_drive_rescue_and_snapshot(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    core: kubernetes.client.CoreV1Api,
    hypervisor: libvirt.virConnect,
    namespace: str,
) -> None:
    core.create_namespaced_secret(namespace, {"metadata": {"name": "pw"}, "stringData": {"pass": "hunter2"}})
    body = make(
        "full",
        boot={"image": {"name": guest.DISK_IMAGE}},
        rootDisk={"sizeGiB": 1},
        ephemeralDisks=[{"name": "scratch", "sizeGiB": 1}],
        swap={"sizeMiB": 64},
        interfaces=[{"name": "eth0", "network": libvirt_host.NETWORK, "macAddress": "52:54:00:aa:bb:01"}],
        userData="#cloud-config\nhostname: full\n",
        injectedFiles=[{"path": "/etc/motd", "content": base64.b64encode(b"hello from kubenova").decode()}],
        adminPasswordSecretRef={"name": "pw", "key": "pass"},
    )
    uid = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, body)[
        "metadata"
    ]["uid"]
    obj = wait_ready(custom, namespace, "full")
    assert obj["status"]["console"] == {"node": ground.node, "logFile": f"{uid}/console.log"}
    eventually(
        lambda: f"{guest.NET} eth0 up" in console_text(ground, uid), timeout=120, what="the guest's NIC"
    )
    text = console_text(ground, uid)
    disks = re.findall(rf"{guest.DISK} (\w+) sectors=(\d+)", text)
    sizes = dict(disks)
    assert int(sizes["vda"]) == 2 * 1024 * 1024, "the root disk grew to spec.rootDisk.sizeGiB"
    assert int(sizes["vdb"]) == 2 * 1024 * 1024 and int(sizes["vdc"]) == 64 * 2048, sizes
    files = {name: base64.b64decode(data) for name, data in re.findall(rf"{guest.CD_FILE} (\S+) (\S+)", text)}
    assert any(b"hostname: full" in data for data in files.values()), files.keys()
    vendor = yaml.safe_load(files["vendor-data"].split(b"\n", 1)[1])  # after the #cloud-config line
    assert [(f["path"], base64.b64decode(f["content"])) for f in vendor["write_files"]] == [
        ("/etc/motd", b"hello from kubenova")
    ]
    assert vendor["password"] == "hunter2", "the admin password reaches the config drive"
    assert "hunter2" not in str(get(custom, namespace, "full")), "the password never shows in the object"
    assert "<mac address='52:54:00:aa:bb:01'/>" in domain(hypervisor, uid).XMLDesc()

    # Snapshot: a new image among the namespace's own in the node's image store.
    image = f"snap-{namespace}.qcow2"
    patch_spec(custom, namespace, "full", {"actions": {"snapshot": {"id": "s1", "imageName": image}}})
    ack = wait_action(custom, namespace, "full", "snapshot", "s1", timeout=180)
    assert ack["phase"] == "Succeeded", ack
    assert (ground.snapshots(namespace) / image).stat().st_size > 0
    assert not (ground.image_store / image).exists(), "the public tier is the node admin's"
    (ground.snapshots(namespace) / image).unlink()

    # Rescue boots the rescue image with the original disk behind it; leaving it boots normally.
    patch_spec(custom, namespace, "full", {"rescue": {"enabled": True, "image": guest.RESCUE_IMAGE}})
    eventually(
        lambda: (
            (o := get(custom, namespace, "full"))["status"].get("phase") == "Rescued"
            and cond(o, "Ready").get("status") == "True"
        ),
        timeout=120,
        what="phase Rescued",
    )
    eventually(
        lambda: guest.RESCUE_MARKER in console_text(ground, uid), timeout=120, what="the rescue marker"
    )
    patch_spec(custom, namespace, "full", {"rescue": {"enabled": False}})
    eventually(
        lambda: get(custom, namespace, "full")["status"].get("phase") == "Running",
        timeout=120,
        what="phase Running after unrescue",
    )
    eventually(
        lambda: console_text(ground, uid).rsplit(guest.RESCUE_MARKER, 1)[-1].count(guest.BOOT_MARKER),
        timeout=120,
        what="a normal boot after unrescue",
    )

    delete_and_wait(custom, namespace, "full")
    assert domain(hypervisor, uid) is None and not ground.instance_dir(uid).exists()


def test_volume_hot_attach_and_detach(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    hypervisor: libvirt.virConnect,
    namespace: str,
) -> None:
    pattern = f"KNVOL-{uuid.uuid4().hex[:10]}"
    body = make("withvol")
    body["spec"]["boot"]["kernel"]["cmdline"] = f"{guest.CMDLINE} {guest.write_hook('vda', pattern)}"
    uid = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, body)[
        "metadata"
    ]["uid"]
    volume = f"vol-{namespace}"
    # Created before the instance is even placed: the attachment waits for it, then follows it.
    attach(custom, namespace, "data", "withvol", volume={"name": volume, "sizeGiB": 1})
    wait_ready(custom, namespace, "withvol")
    va = eventually(
        lambda: (
            (v := custom.get_namespaced_custom_object(GROUP, VERSION, namespace, VOLUMEATTACHMENTS, "data"))
            .get("status", {})
            .get("phase")
            == "Attached"
            and v
        ),
        timeout=120,
        what="Attached",
    )
    assert va["status"]["device"] == "vda" and va["status"]["node"] == ground.node
    assert va["status"]["connector"]["host"] and va["status"]["connector"]["ip"]
    assert cond(va, "Ready")["status"] == "True"
    assert str(ground.volume_store() / namespace / volume) in domain(hypervisor, uid).XMLDesc()
    eventually(
        lambda: f"{guest.WROTE} vda {pattern}" in console_text(ground, uid),
        timeout=120,
        what="the guest writing to the hot-plugged volume",
    )
    with open(ground.volume_store() / namespace / volume, "rb") as f:
        assert f.read(len(pattern)) == pattern.encode(), "the volume holds the bytes the guest wrote"

    delete_and_wait(custom, namespace, "data", VOLUMEATTACHMENTS)
    assert str(ground.volume_store() / namespace / volume) not in domain(hypervisor, uid).XMLDesc(), (
        "detached"
    )
    assert (ground.volume_store() / namespace / volume).exists(), "detaching never deletes the volume"
    delete_and_wait(custom, namespace, "withvol")
    assert (ground.volume_store() / namespace / volume).read_bytes()[: len(pattern)] == pattern.encode()
    (ground.volume_store() / namespace / volume).unlink()


def test_diagnostics_in_status_and_on_metrics(
    ground: testground.Ground, custom: kubernetes.client.CustomObjectsApi, namespace: str
) -> None:
    uid = custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        VIRTUALINSTANCES,
        make("diag", ephemeralDisks=[{"name": "scratch", "sizeGiB": 1}]),
    )["metadata"]["uid"]
    wait_ready(custom, namespace, "diag")
    eventually(lambda: ticks(ground, uid) >= 1, timeout=120, what="the guest running")
    obj = eventually(
        lambda: (
            (o := get(custom, namespace, "diag"))
            and any(
                d["name"] == "vda" and d["rdBytes"] > 0
                for d in o["status"].get("diagnostics", {}).get("disks", [])
            )
            and o
        ),
        timeout=60,
        what="disk counters in status.diagnostics",
    )
    assert obj["status"]["info"]["cpuTimeNs"] > 0 and obj["status"]["info"]["memKiB"] > 0
    metrics = (
        urllib.request.urlopen(f"http://127.0.0.1:{testground.METRICS_PORT}/metrics", timeout=5)
        .read()
        .decode()
    )
    assert re.search(r'kubenova_instance_cpu_seconds\{[^}]*name="diag"[^}]*\} [0-9.e+]+', metrics), metrics[
        :2000
    ]
    assert 'device="vda",direction="read"' in metrics and f'uid="{uid}"' in metrics

    # Stopped: the counters no longer move, so the agent stops writing them.
    patch_spec(custom, namespace, "diag", {"powerState": "Stopped"})
    wait_ready(custom, namespace, "diag", "Stopped")
    eventually(
        lambda: (
            f'uid="{uid}"'
            not in urllib.request.urlopen(f"http://127.0.0.1:{testground.METRICS_PORT}/metrics", timeout=5)
            .read()
            .decode()
        ),
        timeout=30,
        what="the stopped instance's series to go",
    )
    version = get(custom, namespace, "diag")["metadata"]["resourceVersion"]
    time.sleep(11)  # two diagnostics rounds of the test ground's agent (every 5 s)
    assert get(custom, namespace, "diag")["metadata"]["resourceVersion"] == version, (
        "no write without a change"
    )
    delete_and_wait(custom, namespace, "diag")


def test_metrics_listen_on_loopback_only(ground: testground.Ground) -> None:
    ss = procs.run(["ss", "-Hltn", f"sport = :{testground.METRICS_PORT}"], "listing sockets", "").stdout
    local = [line.split()[3] for line in ss.splitlines()]  # State Recv-Q Send-Q Local Peer
    assert local == [f"127.0.0.1:{testground.METRICS_PORT}"], ss


def size_line(ground: testground.Ground, uid: str) -> tuple[int, int] | None:
    """(cpus, MemTotal KiB) from the guest's last kubenova-size line: what its kernel sees."""
    found = re.findall(rf"{guest.SIZE} cpus=(\d+) memtotal-kib=(\d+)", console_text(ground, uid))
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def kubectl_columns(ground: testground.Ground, namespace: str, name: str) -> dict[str, str]:
    """`kubectl get vi -o wide`, as a user reads it: header -> value."""
    header, row = procs.run(
        [ground.kubectl, "get", "vi", name, "-n", namespace, "-o", "wide"],
        "kubectl get",
        "",
        env=ground.env(),
    ).stdout.splitlines()[:2]
    starts = [m.start() for m in re.finditer(r"\S+", header)]  # a column may be empty (IP): cut by position
    return {header[a:b].strip(): row[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)}


def test_a_flavor_change_waits_for_a_boot_and_status_says_so(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    hypervisor: libvirt.virConnect,
    namespace: str,
) -> None:
    uid = custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, VIRTUALINSTANCES, make("size", flavor={"vcpus": 1, "memoryMiB": 128})
    )["metadata"]["uid"]
    assert wait_ready(custom, namespace, "size")["status"]["flavor"] == {"vcpus": 1, "memoryMiB": 128}
    cpus, memory = eventually(lambda: size_line(ground, uid), timeout=120, what="the guest's size line")
    assert cpus == 1

    patch_spec(custom, namespace, "size", {"flavor": {"vcpus": 2, "memoryMiB": 256}})
    obj = eventually(
        lambda: (
            (o := get(custom, namespace, "size"))
            and cond(o, "RestartRequired").get("status") == "True"
            and o["status"]["observedGeneration"] == o["metadata"]["generation"]
            and o
        ),
        timeout=60,
        what="RestartRequired",
    )
    message = cond(obj, "RestartRequired")["message"]
    assert "spec.flavor.vcpus" in message and "spec.flavor.memoryMiB" in message, message
    assert obj["status"]["flavor"] == {"vcpus": 1, "memoryMiB": 128}, "status shows what runs, not the spec"
    assert cond(obj, "Ready")["status"] == "True" and domain(hypervisor, uid).info()[3] == 1
    columns = kubectl_columns(ground, namespace, "size")
    assert (columns["FLAVOR-VCPUS"], columns["MEMORY-MIB"]) == ("1", "128"), columns

    patch_spec(custom, namespace, "size", {"actions": {"reboot": {"id": "apply-size", "type": "Hard"}}})
    assert wait_action(custom, namespace, "size", "reboot", "apply-size")["phase"] == "Succeeded"
    obj = eventually(
        lambda: (
            (o := get(custom, namespace, "size"))
            and not cond(o, "RestartRequired")
            and o["status"]["flavor"] == {"vcpus": 2, "memoryMiB": 256}
            and o
        ),
        timeout=30,
        what="the condition gone and the new flavor in status after the hard reboot",
    )
    eventually(
        lambda: (s := size_line(ground, uid)) and s[0] == 2 and s[1] > memory,
        timeout=120,
        what="the guest to see 2 vCPUs and more memory",
    )
    columns = kubectl_columns(ground, namespace, "size")
    assert (columns["FLAVOR-VCPUS"], columns["MEMORY-MIB"]) == ("2", "256"), columns
    delete_and_wait(custom, namespace, "size")


def test_an_instance_whose_password_secret_is_gone_still_follows_its_power_state(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    core: kubernetes.client.CoreV1Api,
    hypervisor: libvirt.virConnect,
    namespace: str,
) -> None:
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "pw"}, "stringData": {"password": "s3cret"}}
    )
    uid = custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, VIRTUALINSTANCES, make("nopw", adminPasswordSecretRef={"name": "pw"})
    )["metadata"]["uid"]
    wait_ready(custom, namespace, "nopw")
    core.delete_namespaced_secret("pw", namespace)  # hygiene after the first boot: the drive has the password
    patch_spec(custom, namespace, "nopw", {"powerState": "Stopped"})
    wait_ready(custom, namespace, "nopw", "Stopped")  # a power change needs no Secret
    # A change of the definition does: the power state is still followed, and status names what is missing.
    patch_spec(custom, namespace, "nopw", {"powerState": "Running", "flavor": {"vcpus": 2, "memoryMiB": 96}})
    obj = eventually(
        lambda: (
            (o := get(custom, namespace, "nopw")) and cond(o, "Ready").get("reason") == "SecretMissing" and o
        ),
        timeout=60,
        what="SecretMissing",
    )
    assert "spec.adminPasswordSecretRef" in cond(obj, "Ready")["message"]
    eventually(lambda: domain(hypervisor, uid).isActive(), timeout=30, what="the domain running again")
    delete_and_wait(custom, namespace, "nopw")
