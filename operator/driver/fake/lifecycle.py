"""The fake host's instance life cycle: existence and state, spawn to destroy, power, rescue, snapshot."""

from __future__ import annotations

from collections.abc import Callable

from kubenova.driver.base import (
    GuestAgentUnavailable,
    ImageRef,
    InstanceDetail,
    InstanceInfo,
    InstanceSpec,
    InvalidInstanceSpec,
    PowerState,
    RebootType,
    SnapshotResult,
    Unsupported,
)
from kubenova.driver.checks import not_running_reason
from kubenova.driver.fake.access import answering_agent
from kubenova.driver.fake.disks import (
    GIB,
    MIB,
    RESCUE_DISK,
    ROOT,
    SWAP,
    Device,
    bases_of,
    plain_name,
    snapshot_key,
)
from kubenova.driver.fake.instance import ACTIVE, Instance, changed_fields
from kubenova.driver.fake.instances import FakeInstances

#: How often the real driver looks whether a soft-rebooted guest has gone down.
SOFT_REBOOT_POLL = 1.0


def quiesce(inst: Instance) -> tuple[bool, str]:
    """Freeze the guest's file systems as the libvirt driver's snapshot does: whether they are frozen, and
    why not, in its words."""
    if inst.state is not PowerState.RUNNING:
        return False, not_running_reason(inst.state)
    try:
        agent = answering_agent(inst, "freeze the guest's file systems")
    except GuestAgentUnavailable as exc:
        return False, f"no QEMU guest agent answered ({exc})"
    if agent.refuses_freeze:
        return False, "the guest agent could not freeze the guest's file systems: its fsfreeze hook failed"
    agent.frozen = True
    agent.freezes += 1
    return True, ""


class FakeLifecycle(FakeInstances):
    """The contract's life-cycle verbs."""

    # --- instances: existence and state -----------------------------------------------------------

    def list_instances(self) -> list[str]:
        with self._lock:
            return list(self._instances)

    def list_instances_detail(self) -> list[InstanceDetail]:
        with self._lock:
            return [
                InstanceDetail(
                    uuid=i.spec.uuid,
                    namespace=i.spec.namespace,
                    name=i.spec.name,
                    state=i.state,
                    vcpus=i.spec.vcpus,
                    memory_mib=i.spec.memory_mib,
                )
                for i in self._instances.values()
            ]

    def instance_exists(self, uuid: str) -> bool:
        with self._lock:
            return uuid in self._instances

    def get_info(self, uuid: str) -> InstanceInfo:
        with self._lock:
            inst = self._get(uuid)
            memory_kib = inst.spec.memory_mib * 1024
            return InstanceInfo(
                inst.state,
                memory_kib,
                memory_kib,
                inst.spec.vcpus,
                self._cpu_time_ns(inst, self._clock()),
                io_error=inst.state is PowerState.PAUSED and inst.io_error,
            )

    # --- instances: life cycle --------------------------------------------------------------------

    def spawn(self, instance: InstanceSpec, power_on: bool = True) -> None:
        with self._lock:
            now = self._clock()
            existing = self._instances.get(instance.uuid)
            if existing is not None:  # a retry: the same object, never a second instance
                if power_on:
                    self._power_on(existing, now)
                return
            folder = self._instance_dirs.get(instance.uuid, {})
            self._validate(instance, folder)
            inst = self._create(instance, folder, now)
            self._instance_dirs.pop(instance.uuid, None)
            self._admit(inst)
            self.plug_vifs(instance.uuid, instance.interfaces)
            if power_on:
                self._boot(inst, now)

    def redefine(self, instance: InstanceSpec) -> None:
        """Disks grow at once; the rest waits for the next boot, as libvirt's persistent definition does."""
        with self._lock:
            now = self._clock()
            inst = self._get(instance.uuid)
            self._validate(instance, inst.files)
            self.plug_vifs(instance.uuid, instance.interfaces)
            sizes = {f"disk.eph.{name}": gib * GIB for name, gib in instance.ephemeral_gib}
            sizes.update({ROOT: (instance.root_gib or 0) * GIB, SWAP: (instance.swap_mib or 0) * MIB})
            for name, size in sizes.items():
                if name in inst.files:
                    inst.files[name].size = max(inst.files[name].size, size)
            inst.defined = instance
            if inst.state in (PowerState.SHUTOFF, PowerState.CRASHED, PowerState.NOSTATE):
                self._apply_definition(inst, now)

    def defined_revision(self, uuid: str) -> str:
        with self._lock:
            inst = self._get(uuid)
            return (inst.defined or inst.spec).revision

    def pending_changes(self, uuid: str) -> list[str]:
        with self._lock:
            inst = self._get(uuid)
            if inst.defined is None or inst.rescue is not None or inst.state not in ACTIVE:
                return []
            return changed_fields(inst.spec, inst.defined)

    def destroy(self, uuid: str, destroy_disks: bool = True) -> None:
        """Also unplugs and unfilters, as Nova's libvirt driver does: a stopped domain has no taps."""
        with self._lock:
            now = self._clock()
            self._aborts.discard(uuid)
            self._prepared.pop(uuid, None)  # its folder, made by pre_live_migration, goes below
            self._vifs.pop(uuid, None)
            self._rules.pop(uuid, None)
            inst = self._instances.get(uuid)
            if inst is not None:
                inst.guest.stop(now)
                self._release(inst, now)
                if not destroy_disks:
                    self._instance_dirs[uuid] = inst.files
            if destroy_disks:
                self._instance_dirs.pop(uuid, None)

    def reboot(self, uuid: str, reboot_type: RebootType, soft_timeout: float = 60.0) -> RebootType:
        """The guest ignores ACPI, like the real test guest, so a soft reboot ends as a hard one."""
        with self._lock:
            inst = self._get(uuid)
            self._require(inst, *ACTIVE)
            start = inst.rebooting_since = self._clock()
        if reboot_type is RebootType.SOFT:
            self._let_soft_timeout_pass(start, soft_timeout)
        with self._lock:
            inst = self._get(uuid)
            inst.rebooting_since = None
            self._boot(inst, self._clock())
        return RebootType.HARD

    def power_off(self, uuid: str) -> None:
        """A suspended instance loses its saved memory: stopped means stopped."""
        with self._lock:
            inst = self._get(uuid)
            inst.guest.stop(self._clock())
            inst.state = PowerState.SHUTOFF

    def power_on(self, uuid: str) -> None:
        """Also lets a paused instance run on, as the libvirt driver does."""
        with self._lock:
            self._power_on(self._get(uuid), self._clock())

    def pause(self, uuid: str) -> None:
        with self._lock:
            inst = self._get(uuid)
            self._require(inst, *ACTIVE)
            inst.guest.stop(self._clock())
            inst.state = PowerState.PAUSED

    def unpause(self, uuid: str) -> None:
        with self._lock:
            inst = self._get(uuid)
            if inst.state is PowerState.PAUSED:
                self._continue(inst, self._clock())

    def suspend(self, uuid: str) -> None:
        with self._lock:
            inst = self._get(uuid)
            self._require(inst, *ACTIVE)
            inst.guest.stop(self._clock())
            inst.state = PowerState.SUSPENDED

    def resume(self, uuid: str) -> None:
        with self._lock:
            inst = self._get(uuid)
            if inst.state is PowerState.SUSPENDED:
                self._continue(inst, self._clock())

    def rescue(self, uuid: str, rescue_image: ImageRef) -> None:
        """Any power state: rescue is for instances that do not come up, which are often stopped."""
        with self._lock:
            now = self._clock()
            inst = self._get(uuid)
            if inst.rescue is not None:
                return
            inst.files[RESCUE_DISK] = self._overlay(rescue_image, "spec.rescue.image", now)
            inst.rescue = Device(inst.files[RESCUE_DISK])
            inst.rescued_since = now
            self._boot(inst, now)

    def unrescue(self, uuid: str) -> None:
        with self._lock:
            now = self._clock()
            inst = self._get(uuid)
            if inst.rescue is None:
                return
            self._touch(bases_of(inst.files.values()), now)
            del inst.files[RESCUE_DISK]
            inst.rescue = inst.rescued_since = None
            self._boot(inst, now)

    def snapshot(
        self, uuid: str, image: ImageRef, progress: Callable[[int], None] | None = None
    ) -> SnapshotResult:
        """Frozen and thawed around the copy as the libvirt driver does, when the guest's agent answers;
        the copy itself is instantaneous here."""
        with self._lock:
            inst = self._get(uuid)
            root = inst.files.get(ROOT)
            if root is None:
                raise Unsupported(
                    "snapshot", "the instance has no root disk (direct kernel boot without spec.rootDisk)"
                )
            field = "spec.actions.snapshot.imageName"
            plain_name(field, image.name)
            plain_name("metadata.namespace", image.namespace)
            if image.name in self._images or snapshot_key(image) in self._images:
                raise InvalidInstanceSpec(field, f"image {image.name!r} already exists in the image store")
            consistent, reason = quiesce(inst)
            self.add_image(snapshot_key(image), bytes(root.data))
            if inst.agent is not None:
                inst.agent.frozen = False
        if progress is not None:
            progress(100)
        return SnapshotResult(image.name, consistent, reason)

    # --- pollers ----------------------------------------------------------------------------------

    def poll_rebooting_instances(self, timeout: float) -> list[str]:
        with self._lock:
            now = self._clock()
            return [
                uuid
                for uuid, inst in self._instances.items()
                if inst.rebooting_since is not None and now - inst.rebooting_since > timeout
            ]

    def poll_rescued_instances(self, timeout: float) -> list[str]:
        with self._lock:
            now = self._clock()
            return [
                uuid
                for uuid, inst in self._instances.items()
                if inst.rescued_since is not None and now - inst.rescued_since > timeout
            ]

    # --- internals --------------------------------------------------------------------------------

    def _let_soft_timeout_pass(self, start: float, timeout: float) -> None:
        """Wait out ``timeout`` on the clock, outside the lock, so pollers see the reboot pending.

        The real driver sleeps a poll interval between looks at the guest; the fake never
        sleeps. It re-reads the clock instead, and a clock that has not moved a whole interval
        since the last look will not move while this thread spins (a test clock stands still,
        the real one moves by nanoseconds), so the timeout then counts as elapsed.
        """
        last = start
        while (now := self._clock()) - start < timeout and now - last >= SOFT_REBOOT_POLL:
            last = now
