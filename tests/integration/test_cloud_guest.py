"""A real cloud guest: Debian 12 with systemd, cloud-init (NoCloud), qemu-guest-agent and sshd, imported by
URL from the test ground's file server, consumes what kubenova gives it: userData, networkConfig, injected
files, the admin password; the guest agent reports into status, resets the password and freezes the
filesystems around a snapshot. Slow under TCG (a full systemd boot), so one guest does it all."""

from __future__ import annotations

import base64
import contextlib
import os
import pathlib
import subprocess
from collections.abc import Iterator
from typing import Any

import kubernetes

from kubenova.handlers.shared import GROUP, VERSION, VIRTUALINSTANCES
from testground import cloud_image, libvirt_host
from testground import ground as testground
from testground.served import Served
from tests.helpers import eventually
from tests.integration.test_agent import console_text, patch_spec, wait_action, wait_ready
from tests.integration.test_image_imports import sha256
from tests.integration.test_virtualinstance import get, make

MARKER = "KUBENOVA-CLOUD-USERDATA-RAN"
HOST, GUEST = "192.168.231.1", "192.168.231.10"  # on the node's test network, which routes nowhere
INJECTED = ("/etc/kubenova-injected", b"put there by kubenova\n")
BOOT_TIMEOUT = 420  # a full systemd and cloud-init boot under TCG on a busy 2-core machine


def ssh(
    key: pathlib.Path | None, command: str, password: str | None = None
) -> subprocess.CompletedProcess[str]:
    """ssh to the guest's default user, with the key or (through SSH_ASKPASS) with a password only."""
    argv = [
        "ssh",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "ConnectTimeout=5",
    ]
    env = dict(os.environ)
    if key is not None:
        argv += ["-i", str(key), "-o", "BatchMode=yes"]
    else:
        askpass = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"askpass-{os.getpid()}"
        askpass.write_text(f"#!/bin/sh\necho '{password}'\n")
        askpass.chmod(0o700)
        env.update(SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force", DISPLAY=":0")
        argv += ["-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password"]
    target = f"{cloud_image.DEFAULT_USER}@{GUEST}"
    return subprocess.run([*argv, target, command], capture_output=True, text=True, timeout=60, env=env)


@contextlib.contextmanager
def host_address(ground: testground.Ground) -> Iterator[None]:
    """The node's side of the test network gets an address, as a node admin's host route would."""
    link = libvirt_host.bridge(ground.node)
    subprocess.run(["ip", "addr", "add", f"{HOST}/24", "dev", link], check=True)
    try:
        yield
    finally:
        subprocess.run(["ip", "addr", "del", f"{HOST}/24", "dev", link], check=False)


def test_the_debian_cloud_guest_takes_what_kubenova_gives_it(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    core: kubernetes.client.CoreV1Api,
    served: Served,
    namespace: str,
    tmp_path: pathlib.Path,
) -> None:
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "admin"}, "stringData": {"password": "first-Pa55"}}
    )
    image = served.root / served.cloud_image
    body = make(
        "cloud",
        flavor={"vcpus": 2, "memoryMiB": 1024},
        boot={"image": {"url": served.url(served.cloud_image), "checksum": f"sha256:{sha256(image)}"}},
        rootDisk={"sizeGiB": 2},
        interfaces=[{"name": "eth0", "network": libvirt_host.NETWORK, "macAddress": "52:54:00:6b:6e:10"}],
        userData=(
            "#cloud-config\n"
            f"ssh_authorized_keys: [{key.with_suffix('.pub').read_text().strip()}]\n"
            f'runcmd:\n  - echo "{MARKER} $(hostname)" >/dev/console\n'
        ),
        networkConfig=f"version: 2\nethernets:\n  eth0:\n    addresses: [{GUEST}/24]\n",
        injectedFiles=[{"path": INJECTED[0], "content": base64.b64encode(INJECTED[1]).decode()}],
        adminPasswordSecretRef={"name": "admin"},
        firewall={"ingress": [{"protocol": "TCP", "port": 22}]},  # ssh only (and answers, and DHCP)
    )
    uid = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, body)[
        "metadata"
    ]["uid"]
    wait_ready(custom, namespace, "cloud", timeout=180)
    eventually(
        lambda: MARKER in console_text(ground, uid), timeout=BOOT_TIMEOUT, interval=2, what="userData ran"
    )
    done = eventually(
        lambda: next(
            (li for li in console_text(ground, uid).splitlines() if cloud_image.CLOUD_INIT_DONE in li), None
        ),
        timeout=BOOT_TIMEOUT,
        interval=2,
        what="cloud-init finished",
    )
    assert " ok " in f"{done} " and "NoCloud" in done, done

    # The agent answers: the guest's own view in status.
    def addresses(agent: dict[str, Any]) -> set[str]:
        return {a["address"] for i in agent.get("interfaces", []) for a in i.get("ipAddresses", [])}

    agent = eventually(  # its address from networkConfig, as the guest itself sees it
        lambda: (
            GUEST in addresses(a := get(custom, namespace, "cloud")["status"].get("guestAgent") or {}) and a
        ),
        timeout=180,
        interval=2,
        what="status.guestAgent with the guest's address",
    )
    assert agent["connected"] and "Debian" in agent["prettyName"] and agent["osVersion"].startswith("12"), (
        agent
    )
    assert agent["hostname"] == "cloud", agent

    # ssh in with the key from userData, through spec.firewall's one rule, over an address on the node's side.
    with host_address(ground):
        answer = eventually(
            lambda: (r := ssh(key, f"cat {INJECTED[0]}; hostname")).returncode == 0 and r,
            timeout=120,
            interval=3,
            what="ssh with the key",
        )
        assert answer.stdout.splitlines() == [INJECTED[1].decode().strip(), "cloud"], answer.stdout
        assert ssh(None, "true", password="first-Pa55").returncode == 0, "the admin password from the Secret"

        # passwordReset through the guest agent: the new password logs in, the old one no longer.
        core.patch_namespaced_secret("admin", namespace, {"stringData": {"password": "second-Pa55"}})
        patch_spec(
            custom,
            namespace,
            "cloud",
            {"actions": {"passwordReset": {"id": "1", "user": cloud_image.DEFAULT_USER}}},
        )
        reset = wait_action(custom, namespace, "cloud", "passwordReset", "1")
        assert reset["phase"] == "Succeeded", reset
        assert ssh(None, "true", password="second-Pa55").returncode == 0
        assert ssh(None, "true", password="first-Pa55").returncode != 0

    # A snapshot with the filesystems frozen by the guest agent says it is consistent.
    patch_spec(
        custom, namespace, "cloud", {"actions": {"snapshot": {"id": "s1", "imageName": "cloud-s1.qcow2"}}}
    )
    snapshot = wait_action(custom, namespace, "cloud", "snapshot", "s1", timeout=300)
    assert snapshot["phase"] == "Succeeded" and snapshot.get("consistent") is True, snapshot
    (ground.snapshots(namespace) / "cloud-s1.qcow2").unlink()
