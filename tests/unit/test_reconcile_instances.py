"""The instance reconciler (InstanceAgent) against FakeDriver and an in-memory apiserver: every power
state, rescue, the one-shot actions, VNC, and the failure branches the integration tests cover."""

from __future__ import annotations

import pathlib
import time
from typing import Any

import pytest

from kubenova.driver.base import PowerState
from kubenova.handlers.shared import MIGRATIONS, NODE_LABEL, VIRTUALINSTANCES
from tests.unit.agent_harness import FLAVOR, KERNEL, NODE, STORE, Node, make_node
from tests.unit.reconcile_fakes import bound, condition
from tests.unit.test_fake_driver import Clock


@pytest.fixture
def node(tmp_path: pathlib.Path) -> Node:
    return make_node(tmp_path)


def test_a_new_instance_boots_and_status_says_running_and_placed(node: Node) -> None:
    uid = node.create("vm")
    assert node.state(uid) is PowerState.RUNNING
    body = node.get("vm")
    status = body["status"]
    assert (status["phase"], status["powerState"], status["node"]) == ("Running", "Running", NODE)
    assert status["flavor"] == FLAVOR and status["observedGeneration"] == 1
    assert condition(body, "Ready")["reason"] == "PowerStateReached"
    assert condition(body, "Scheduled")["message"] == f"placed on {NODE}"
    assert node.api.reasons("vm") == ["Running"]
    assert ("instance", uid) in node.queue.forgotten  # success resets the backoff

    writes = len(node.status.patches)
    node.look(node.get("vm"))  # a resync: nothing changed, nothing written
    assert len(node.status.patches) == writes


WANTS = {
    "Running": (PowerState.RUNNING, "Running"),
    "Stopped": (PowerState.SHUTOFF, "Stopped"),
    "Paused": (PowerState.PAUSED, "Paused"),
    "Suspended": (PowerState.SUSPENDED, "Suspended"),
}


def test_every_power_state_is_reached_from_every_other(node: Node) -> None:
    uid = node.create("vm")
    # Every ordered pair of power states, each once.
    order = ["Stopped", "Paused", "Running", "Suspended", "Stopped", "Running", "Paused", "Suspended"]
    order += ["Paused", "Stopped", "Suspended", "Running"]
    for want in order:
        body = node.change("vm", powerState=want)
        state, phase = WANTS[want]
        assert node.state(uid) is state, want
        assert (body["status"]["phase"], body["status"]["powerState"]) == (phase, state.value)
        assert condition(body, "Ready")["status"] == "True", want


@pytest.mark.parametrize("want", ["Stopped", "Paused", "Suspended"])
def test_an_instance_created_in_any_power_state_starts_there(node: Node, want: str) -> None:
    uid = node.create("vm", powerState=want)
    assert node.state(uid) is WANTS[want][0]
    assert node.get("vm")["status"]["phase"] == WANTS[want][1]


def test_rescue_boots_the_rescue_image_and_unrescue_boots_normally(node: Node) -> None:
    uid = node.create("vm")
    disks = node.driver.list_disks(uid)
    body = node.change("vm", rescue={"enabled": True, "image": "rescue.img"})
    assert body["status"]["phase"] == "Rescued" and len(node.driver.list_disks(uid)) == len(disks) + 1
    body = node.change("vm", rescue={"enabled": False})
    assert body["status"]["phase"] == "Running" and node.driver.list_disks(uid) == disks


def test_a_stop_outside_kubernetes_is_shown_then_undone_after_the_restart_delay(
    tmp_path: pathlib.Path,
) -> None:
    node = make_node(tmp_path, restart_delay=0.3)
    uid = node.create("vm")
    node.driver.power_off(uid)  # virsh, or the guest shut itself down
    node.agent.observe(uid)  # the lifecycle event
    body = node.get("vm")
    assert body["status"]["powerState"] == "Stopped"
    assert condition(body, "Ready")["reason"] == "StoppedOutsideKubernetes"
    assert node.queue.later and node.queue.later[-1][0] == ("instance", uid)
    node.look(node.get("vm"))  # too early: the stop stays visible
    assert node.state(uid) is PowerState.SHUTOFF
    time.sleep(0.35)
    node.look(node.get("vm"))
    assert node.state(uid) is PowerState.RUNNING
    assert condition(node.get("vm"), "Ready")["reason"] == "PowerStateReached"


def test_a_stop_that_lands_while_a_handle_runs_is_still_one_outside_kubernetes(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen in CI: virsh destroy right after an agent restart, whose first pass was still handling the
    instance; the handle wrote Stopped, and the lifecycle event then found nothing new to say."""
    node = make_node(tmp_path, restart_delay=30.0)
    uid = node.create("vm")
    follow = node.agent._follow

    def follow_then_destroyed(body: dict[str, Any], want: str) -> None:
        follow(body, want)  # it saw the domain run
        node.driver.power_off(uid)  # virsh destroy, before the handle's status write

    monkeypatch.setattr(node.agent, "_follow", follow_then_destroyed)
    node.look(node.get("vm"))
    monkeypatch.undo()
    node.agent.observe(uid)  # the lifecycle event, after the handle's write
    body = node.get("vm")
    assert body["status"]["powerState"] == "Stopped"
    assert condition(body, "Ready")["reason"] == "StoppedOutsideKubernetes"
    node.look(node.get("vm"))  # the restart delay holds: not started again at once
    assert node.state(uid) is PowerState.SHUTOFF


def test_a_guest_paused_on_a_full_disk_is_said_and_let_run_again_only_after_a_growing_delay(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    node = make_node(tmp_path, clock=clock, io_error_delay=30.0, io_error_max_delay=120.0)
    uid = node.create("vm")
    resumes: list[float] = []
    unpause = node.driver.unpause
    monkeypatch.setattr(node.driver, "unpause", lambda u: (resumes.append(clock.now - start), unpause(u)))
    writes, events = len(node.status.patches), len(node.api.events)
    start = clock.now
    node.driver.fill_instances_disk(uid)
    node.agent.observe(uid)  # libvirt's lifecycle event: paused, reason IOERROR
    body = node.get("vm")
    ready = condition(body, "Ready")
    assert (body["status"]["powerState"], ready["status"], ready["reason"]) == ("Paused", "False", "IOError")
    assert NODE in ready["message"] and "instances folder" in ready["message"]
    # Ten minutes in which something looks every second (watch events, resyncs, lifecycle events): the guest
    # is let run again at 30 s, then 60 s and 120 s (the most) after each try, and status stays as it was.
    for _ in range(600):
        node.look(node.get("vm"))
        node.agent.observe(uid)
        clock.advance(1)
    assert resumes == [30, 90, 210, 330, 450, 570]
    assert condition(node.get("vm"), "Ready") == ready
    assert len(node.status.patches) - writes == 1  # the pause; a real guest may add two a try (ran, stopped)
    assert node.api.reasons("vm")[events:] == ["Paused", "IOError"]  # a Warning once, not once per try
    assert ("instance", uid) in [key for key, _ in node.queue.later]  # the try's own look is asked for

    node.driver.free_instances_disk()  # an operator made room
    clock.advance(120)
    node.look(node.get("vm"))
    body = node.get("vm")
    assert node.state(uid) is PowerState.RUNNING and body["status"]["powerState"] == "Running"
    assert condition(body, "Ready")["reason"] == "PowerStateReached"


def test_a_guest_paused_on_a_full_disk_is_stopped_at_once_when_the_spec_says_so(
    tmp_path: pathlib.Path,
) -> None:
    node = make_node(tmp_path, clock=Clock())
    uid = node.create("vm")
    node.driver.fill_instances_disk(uid)
    node.agent.observe(uid)
    body = node.change("vm", powerState="Stopped")
    assert node.state(uid) is PowerState.SHUTOFF and condition(body, "Ready")["status"] == "True"


def test_a_missing_secret_is_waited_for_and_said_once(node: Node) -> None:
    uid = node.create("vm", adminPasswordSecretRef={"name": "pw"})
    assert not node.driver.instance_exists(uid)
    ready = condition(node.get("vm"), "Ready")
    assert ready["reason"] == "SecretMissing" and "spec.adminPasswordSecretRef" in ready["message"]
    node.look(node.get("vm"))
    assert node.queue.retried.count(("instance", uid)) == 2
    assert node.api.reasons("vm").count("SecretMissing") == 1  # one Warning per distinct problem

    node.api.add_secret("ns", "pw", password="s3cret")
    node.look(node.get("vm"))
    assert node.state(uid) is PowerState.RUNNING


def test_a_secret_without_the_key_or_not_text_is_named(node: Node) -> None:
    node.api.add_secret("ns", "data", other="x")
    node.create("vm", userDataSecretRef={"name": "data"})
    assert "has no key 'userData'" in condition(node.get("vm"), "Ready")["message"]
    node.api.secrets[("ns", "bin")] = {"userData": "/w=="}  # 0xff: not UTF-8
    node.change("vm", userDataSecretRef={"name": "bin"})
    assert condition(node.get("vm"), "Ready")["reason"] == "SecretInvalid"


def test_an_instance_whose_secret_is_gone_still_follows_its_power_state(node: Node) -> None:
    node.api.add_secret("ns", "pw", password="s3cret")
    uid = node.create("vm", adminPasswordSecretRef={"name": "pw"})
    del node.api.secrets[("ns", "pw")]  # hygiene after the first boot
    node.change("vm", powerState="Stopped")  # a power change needs no Secret
    assert node.state(uid) is PowerState.SHUTOFF
    assert condition(node.get("vm"), "Ready")["status"] == "True"
    body = node.change("vm", powerState="Running", flavor={"vcpus": 2, "memoryMiB": 96})
    assert condition(body, "Ready")["reason"] == "SecretMissing"
    assert node.state(uid) is PowerState.RUNNING


def test_a_spec_the_node_cannot_run_fails_once_with_the_field_named(node: Node) -> None:
    uid = node.create("vm", boot={"kernel": {"image": "nope"}})
    body = node.get("vm")
    assert body["status"]["phase"] == "Failed" and not node.driver.instance_exists(uid)
    assert condition(body, "Ready")["reason"] == "InvalidSpec"
    assert "spec.boot.kernel.image" in condition(body, "Ready")["message"]
    writes = len(node.status.patches)
    node.look(node.get("vm"))  # said already: waits for a spec change
    assert len(node.status.patches) == writes
    body = node.change("vm", boot=KERNEL)
    assert body["status"]["phase"] == "Running"


def test_bad_injected_file_content_names_its_index(node: Node) -> None:
    node.create("vm", injectedFiles=[{"path": "/etc/motd", "content": "!!"}])
    assert "spec.injectedFiles[0].content" in condition(node.get("vm"), "Ready")["message"]


def test_a_stale_copy_never_starts_a_domain(node: Node) -> None:
    body = node.api.add(VIRTUALINSTANCES, bound("vm", NODE, {"flavor": FLAVOR, "boot": KERNEL}))
    node.api.objects[(VIRTUALINSTANCES, "ns", "vm")]["metadata"]["labels"][NODE_LABEL] = "node-1"  # moved on
    uid = node.look(body)
    assert not node.driver.instance_exists(uid) and uid not in node.cache.objects


def test_an_instance_gone_from_the_apiserver_is_forgotten(node: Node) -> None:
    body = node.api.add(VIRTUALINSTANCES, bound("vm", NODE, {"flavor": FLAVOR, "boot": KERNEL}))
    del node.api.objects[(VIRTUALINSTANCES, "ns", "vm")]
    uid = node.look(body)
    assert not node.driver.instance_exists(uid) and uid not in node.cache.objects


def test_deleting_destroys_the_domain_then_lets_the_object_go(node: Node) -> None:
    uid = node.create("vm")
    stored = node.api.objects[(VIRTUALINSTANCES, "ns", "vm")]
    stored["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    node.look(node.api.touch(stored))
    assert not node.driver.instance_exists(uid)
    assert node.api.get(VIRTUALINSTANCES, "ns", "vm") is None
    assert "Deleted" in node.api.reasons("vm")


def test_an_object_being_deleted_gets_no_domain(node: Node) -> None:
    body = node.api.add(VIRTUALINSTANCES, bound("vm", NODE, {"flavor": FLAVOR, "boot": KERNEL}))
    node.api.objects[(VIRTUALINSTANCES, "ns", "vm")]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    uid = node.look(body)  # the cached copy is not deleted yet; the newest version is
    assert not node.driver.instance_exists(uid) and node.api.get(VIRTUALINSTANCES, "ns", "vm") is None


def test_an_instance_without_the_agent_finalizer_gets_it(node: Node) -> None:
    body = bound("vm", NODE, {"flavor": FLAVOR, "boot": KERNEL})
    body["metadata"]["finalizers"] = []
    node.look(node.api.add(VIRTUALINSTANCES, body))
    assert node.get("vm")["metadata"]["finalizers"] == ["compute.kubenova.io/agent"]


def migration(instance_uid: str, step: str, phase: str, source: str = NODE) -> dict[str, Any]:
    return {
        "metadata": {"name": "m", "namespace": "ns", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"type": "Live", "instanceRef": {"name": "vm"}},
        "status": {"instanceUID": instance_uid, "step": step, "phase": phase, "sourceNode": source},
    }


def test_a_migration_under_way_holds_the_instance(node: Node) -> None:
    uid = node.create("vm")
    node.migrations.seen("ADDED", node.api.add(MIGRATIONS, migration(uid, "Transfer", "Migrating")))
    node.change("vm", powerState="Stopped")
    assert node.state(uid) is PowerState.RUNNING  # its hands off the domain
    assert node.get("vm")["status"]["phase"] == "Migrating"


def test_an_instance_that_left_for_another_node_is_not_started_again(node: Node) -> None:
    uid = node.create("vm")
    node.driver.destroy(uid)  # the live migration took the domain away
    node.migrations.seen("ADDED", node.api.add(MIGRATIONS, migration(uid, "Done", "Succeeded")))
    node.look(node.get("vm"))
    assert not node.driver.instance_exists(uid)


def test_a_resize_source_leaves_its_stopped_copy_alone_while_the_decision_is_awaited(node: Node) -> None:
    """The source's watch may bring the target's status write (resize gone, status.node the target)
    before the label's change: that copy must neither redefine the stopped domain nor start it."""
    uid = node.create("vm")
    node.driver.power_off(uid)  # PowerOffSource stopped it; the target runs the instance now
    awaiting = migration(uid, "AwaitConfirmation", "AwaitingConfirmation")
    awaiting["spec"]["type"] = "Cold"
    awaiting["status"]["targetNode"] = "node-9"
    node.migrations.seen("ADDED", node.api.add(MIGRATIONS, awaiting))
    defined = node.driver.defined_revision(uid)
    body = node.get("vm")
    body["spec"]["flavor"] = {"vcpus": 2, "memoryMiB": 256}  # a flavor the stopped copy does not have
    body["status"]["node"] = "node-9"
    node.look(body)
    assert node.state(uid) is PowerState.SHUTOFF, "a second copy of a guest that runs on the target"
    assert node.driver.defined_revision(uid) == defined


def test_an_instance_whose_status_names_another_node_is_not_started_here(node: Node) -> None:
    """A label moved by hand (an admin: users are refused by admission) does not start a second copy."""
    body = bound("vm", NODE, {"flavor": FLAVOR, "boot": KERNEL})
    body["status"] = {"node": "node-9", "phase": "Running", "powerState": "Running"}
    uid = node.look(node.api.add(VIRTUALINSTANCES, body))
    assert not node.driver.instance_exists(uid)
    ready = condition(node.get("vm"), "Ready")
    assert ready["reason"] == "BoundElsewhere" and "runs on node-9" in ready["message"]
    assert "BoundElsewhere" in node.api.reasons("vm")
    assert node.get("vm")["status"]["node"] == "node-9", "status keeps naming where it may still run"

    moved = migration(uid, "Done", "Succeeded", source="node-9")  # a Migration moved it here
    moved["status"]["targetNode"] = NODE
    node.migrations.seen("ADDED", node.api.add(MIGRATIONS, moved))
    node.look(node.get("vm"))
    assert node.state(uid) is PowerState.RUNNING
    assert node.get("vm")["status"]["node"] == NODE


def test_a_secret_in_a_namespace_that_did_not_opt_in_is_named_with_the_fix(node: Node) -> None:
    node.api.forbidden_secrets = True
    node.create("vm", adminPasswordSecretRef={"name": "pw"})
    ready = condition(node.get("vm"), "Ready")
    assert ready["reason"] == "SecretForbidden"
    assert "spec.adminPasswordSecretRef" in ready["message"] and "kubenova-agent-secrets" in ready["message"]


def test_a_flavor_change_waits_for_a_boot_and_a_hard_reboot_applies_it(node: Node) -> None:
    uid = node.create("vm")
    body = node.change("vm", flavor={"vcpus": 2, "memoryMiB": 256})
    restart = condition(body, "RestartRequired")
    assert restart["status"] == "True"
    assert "spec.flavor.vcpus" in restart["message"] and "spec.flavor.memoryMiB" in restart["message"]
    assert body["status"]["flavor"] == FLAVOR, "status shows what runs, not the spec"
    assert condition(body, "Ready")["status"] == "True"

    body = node.change("vm", actions={"reboot": {"id": "apply", "type": "Hard"}})
    assert body["status"]["actions"]["reboot"]["phase"] == "Succeeded"
    assert not condition(body, "RestartRequired")
    assert body["status"]["flavor"] == {"vcpus": 2, "memoryMiB": 256}
    assert node.driver.get_info(uid).num_cpu == 2


def test_each_action_id_is_acted_on_once(node: Node) -> None:
    node.create("vm", boot={"image": {"name": "disk.img"}})
    body = node.change("vm", actions={"reboot": {"id": "r1", "type": "Soft"}})
    reboot = body["status"]["actions"]["reboot"]
    assert reboot["phase"] == "Succeeded" and "rebooted hard" in reboot["message"]  # the guest ignores ACPI
    node.look(node.get("vm"))
    assert node.get("vm")["status"]["actions"]["reboot"] == reboot

    body = node.change("vm", actions={"snapshot": {"id": "s1", "imageName": "snap.img"}})
    assert body["status"]["actions"]["snapshot"]["phase"] == "Succeeded"
    assert node.driver.read_image("snapshots/ns/snap.img") == STORE["disk.img"]
    body = node.change("vm", actions={"snapshot": {"id": "s2", "imageName": "snap.img"}})
    snapshot = body["status"]["actions"]["snapshot"]
    assert snapshot["phase"] == "Failed" and "already exists" in snapshot["message"]
    assert "SnapshotFailed" in node.api.reasons("vm")


def test_a_password_reset_needs_the_secret_and_a_guest_agent(node: Node) -> None:
    node.create("vm")
    body = node.change("vm", actions={"passwordReset": {"id": "p1"}})
    answer = body["status"]["actions"]["passwordReset"]
    assert answer["phase"] == "Failed" and answer["message"] == "spec.adminPasswordSecretRef is not set"
    node.api.add_secret("ns", "pw", password="new")
    body = node.change("vm", adminPasswordSecretRef={"name": "pw"}, actions={"passwordReset": {"id": "p2"}})
    answer = body["status"]["actions"]["passwordReset"]
    assert answer["phase"] == "Failed" and "guest agent" in answer["message"]  # the fake guest runs none
    assert "PasswordResetFailed" in node.api.reasons("vm")


def test_an_action_interrupted_by_an_agent_restart_is_not_repeated(tmp_path: pathlib.Path) -> None:
    node = make_node(tmp_path)
    uid = node.create("vm", boot={"image": {"name": "disk.img"}})
    (tmp_path / "done.img").write_bytes(b"snapshot")  # the snapshot was written before the restart
    stored = node.api.objects[(VIRTUALINSTANCES, "ns", "vm")]
    stored["spec"]["actions"] = {
        "reboot": {"id": "r1", "type": "Hard"},
        "snapshot": {"id": "s1", "imageName": "done.img"},
    }
    stored["status"]["actions"] = {
        "reboot": {"id": "r1", "phase": "InProgress"},
        "snapshot": {"id": "s1", "phase": "InProgress"},
    }
    restarted = make_node(tmp_path, api=node.api, driver=node.driver)  # it did not act itself
    restarted.look(node.api.touch(stored))
    actions = restarted.get("vm")["status"]["actions"]
    assert actions["reboot"]["phase"] == "Failed" and "agent restarted" in actions["reboot"]["message"]
    assert actions["snapshot"]["phase"] == "Succeeded"
    assert node.state(uid) is PowerState.RUNNING


def test_vnc_gets_a_secret_of_its_own_and_status_says_where(node: Node) -> None:
    node.create("vm", vnc={"enabled": True})
    vnc = node.get("vm")["status"]["vnc"]
    assert vnc["passwordSecretRef"] == {"name": "vm-vnc"}
    password = node.agent.secrets.value("ns", {"name": "vm-vnc"}, "vnc", "password")
    assert password is not None and node.driver.vnc_accepts(vnc["host"], vnc["port"], password)


def test_a_foreign_secret_in_the_vnc_secrets_place_is_a_conflict(node: Node) -> None:
    node.api.add_secret("ns", "vm-vnc", token="not ours")
    node.create("vm", vnc={"enabled": True})
    assert condition(node.get("vm"), "Ready")["reason"] == "SecretConflict"


def test_interfaces_in_status_carry_their_mac(node: Node) -> None:
    node.create("vm", interfaces=[{"name": "eth0", "network": "default"}])
    (iface,) = node.get("vm")["status"]["interfaces"]
    assert iface["name"] == "eth0" and iface["network"] == "default" and iface["macAddress"]


def test_a_network_not_open_to_the_namespace_fails_the_spec_naming_the_field(node: Node) -> None:
    uid = node.create("vm", interfaces=[{"name": "eth0", "network": "host-bridge"}])
    body = node.get("vm")
    assert body["status"]["phase"] == "Failed" and not node.driver.instance_exists(uid)
    assert "spec.interfaces[0].network" in condition(body, "Ready")["message"]


def test_a_domain_removed_behind_the_agents_back_is_said_and_made_again(node: Node) -> None:
    uid = node.create("vm")
    node.driver.destroy(uid)
    node.agent.observe(uid)
    body = node.get("vm")
    assert body["status"]["powerState"] == "NoState"
    node.look(body)
    assert node.state(uid) is PowerState.RUNNING
