"""spec.runStrategy on a real guest: what comes back after a crash (QEMU killed) and after a stop from outside
(virsh destroy), and how a user starts a guest kubenova left stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import kubernetes
import libvirt

from kubenova.handlers.shared import GROUP, VERSION, VIRTUALINSTANCES
from testground import ground as testground
from testground import guest
from tests.helpers import eventually
from tests.integration.test_agent import delete_and_wait, patch_spec, wait_ready
from tests.integration.test_virtualinstance import cond, get, make

#: The test ground's agents wait 3 s (--restart-delay) before starting a guest stopped outside Kubernetes.
RESTART_DELAY = 3.0


def boots(ground: testground.Ground, uid: str) -> int:
    path = ground.console_log(uid)
    return path.read_text(errors="replace").count(guest.BOOT_MARKER) if path.exists() else 0


def kill_qemu(uid: str) -> None:
    """QEMU dies as in a crash (libvirt: shut off, reason crashed)."""
    found = subprocess.run(["pgrep", "-f", f"qemu.*{uid}"], capture_output=True, text=True).stdout.split()
    assert len(found) == 1, found
    os.kill(int(found[0]), signal.SIGKILL)


def stays_stopped(custom: kubernetes.client.CustomObjectsApi, namespace: str, name: str) -> dict[str, str]:
    """Still stopped well after the restart delay; returns the Ready condition."""
    eventually(
        lambda: (
            (get(custom, namespace, name) or {}).get("status", {}).get("powerState") in ("Stopped", "Crashed")
        ),
        timeout=30,
        what=f"{name} seen stopped",
    )
    time.sleep(RESTART_DELAY + 5)
    obj = get(custom, namespace, name)
    assert obj and obj["status"]["powerState"] in ("Stopped", "Crashed"), obj and obj["status"]
    return cond(obj, "Ready")


def test_rerun_on_failure_restarts_a_crash_but_not_a_stop_and_manual_restarts_nothing(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    hypervisor: libvirt.virConnect,
    namespace: str,
) -> None:
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, VIRTUALINSTANCES, make("rerun", runStrategy="RerunOnFailure")
    )
    uid = wait_ready(custom, namespace, "rerun")["metadata"]["uid"]
    eventually(lambda: boots(ground, uid) == 1, timeout=120, what="the first boot")

    kill_qemu(uid)  # a failure: started again after the delay, a new boot
    eventually(lambda: boots(ground, uid) == 2, timeout=60, what="a new boot after the crash")
    wait_ready(custom, namespace, "rerun")

    hypervisor.lookupByUUIDString(uid).destroy()  # a stop from outside, not a failure: it stays stopped
    ready = stays_stopped(custom, namespace, "rerun")
    assert ready["reason"] == "StoppedOutsideKubernetes" and "RerunOnFailure" in ready["message"], ready
    assert boots(ground, uid) == 2

    patch_spec(custom, namespace, "rerun", {"powerState": "Stopped"})  # what the condition says to do
    wait_ready(custom, namespace, "rerun", "Stopped")
    patch_spec(custom, namespace, "rerun", {"powerState": "Running"})
    wait_ready(custom, namespace, "rerun")
    eventually(lambda: boots(ground, uid) == 3, timeout=60, what="the boot the user asked for")

    patch_spec(custom, namespace, "rerun", {"runStrategy": "Manual"})  # not even a crash comes back
    eventually(
        lambda: (
            (get(custom, namespace, "rerun") or {})["status"].get("observedGeneration")
            == (get(custom, namespace, "rerun") or {})["metadata"]["generation"]
        ),
        timeout=30,
        what="the strategy change seen",
    )
    kill_qemu(uid)
    ready = stays_stopped(custom, namespace, "rerun")
    assert "Manual" in ready["message"] and boots(ground, uid) == 3, ready

    patch_spec(custom, namespace, "rerun", {"runStrategy": "Halted"})  # stopped is what it asks: Ready
    eventually(
        lambda: cond(get(custom, namespace, "rerun"), "Ready").get("status") == "True",
        timeout=30,
        what="Halted and Ready, the crashed domain left as it is",
    )
    delete_and_wait(custom, namespace, "rerun")
