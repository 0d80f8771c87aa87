"""Cold and live migration between two fake hosts of one process (the registry finds the other)."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping

from kubenova.driver.base import (
    Convergence,
    DriverError,
    InstanceSpec,
    MigrationOutcome,
    MigrationProgress,
    PowerState,
    ProgressCallback,
    check_handed_disks,
)
from kubenova.driver.fake.disks import CONFIG_DRIVE, MIB, Disk, bases_of, store_volume_name
from kubenova.driver.fake.guest import parse_dirty_hook
from kubenova.driver.fake.instance import ACTIVE, Instance
from kubenova.driver.fake.instances import FakeInstances

LIVE_MIGRATION_ITERATIONS = 3
EXPECTED_DOWNTIME_MS = 30
#: What the switch-over may leave to copy with the guest paused, and auto-converge's strongest throttle
#: (QEMU's max-cpu-throttle).
SWITCH_OVER_BYTES, THROTTLE_MAX = MIB, 99
#: A pre-copy that does not converge runs until the agent stops it; the fake gives up after this many
#: passes instead, so a unit test whose agent would not stop it fails rather than loops.
PRECOPY_PASSES_AT_MOST = 30


class FakeMigration(FakeInstances):
    """The contract's migration verbs, both sides."""

    def migrate_disk_and_power_off(self, uuid: str, dest_uri: str) -> list[str]:
        """Returns the paths of the files copied into the destination's instance folder, as this host's
        instances/<uuid>/ holds them.

        The config drive is not among them: finish_migration writes it afresh from the spec.
        """
        with self._lock:
            inst = self._get(uuid)
            self._refuse_rescued(inst)
            dest = self._peer(dest_uri)
            inst.guest.stop(self._clock())
            inst.state = PowerState.SHUTOFF
            copies = {name: disk.copy() for name, disk in inst.files.items() if name != CONFIG_DRIVE}
        with dest._lock:
            dest._instance_dirs[uuid] = copies
        return [f"/{self.hostname}/instances/{uuid}/{name}" for name in sorted(copies)]

    def finish_migration(
        self, instance: InstanceSpec, disk_info: list[str], source_uri: str, power_on: bool = True
    ) -> None:
        """The fake's source already pushed the files; they must be the ones ``disk_info`` names."""
        check_handed_disks(instance.uuid, disk_info)
        self._peer(source_uri)
        with self._lock:
            now = self._clock()
            existing = self._instances.get(instance.uuid)
            if existing is not None:  # a retry
                if power_on:
                    self._power_on(existing, now)
                return
            folder = self._instance_dirs.get(instance.uuid)
            if folder is None:
                raise DriverError(
                    f"no disks of instance {instance.uuid} arrived on {self.hostname}; "
                    "run migrate_disk_and_power_off on the source first"
                )
            if sorted(folder) != sorted(posixpath.basename(d) for d in disk_info):
                raise DriverError(
                    f"the disks that arrived ({sorted(folder)}) are not the ones the source "
                    f"named ({sorted(disk_info)})"
                )
            self._validate(instance, folder)
            inst = self._create(instance, folder, now)
            del self._instance_dirs[instance.uuid]
            self._admit(inst)
            self.plug_vifs(instance.uuid, instance.interfaces)
            if power_on:
                self._boot(inst, now)

    def confirm_migration(self, uuid: str) -> None:
        self.destroy(uuid)

    def finish_revert_migration(self, uuid: str, power_on: bool = True) -> None:
        with self._lock:
            inst = self._get(uuid)
            if power_on:
                self._power_on(inst, self._clock())

    def pre_live_migration(self, instance: InstanceSpec) -> str:
        """The fake's "definition" is the target's own name for the prepared instance."""
        with self._lock:
            if instance.uuid in self._instances:
                raise DriverError(f"instance {instance.uuid} is already defined on {self.hostname}")
            folder = self._instance_dirs.get(instance.uuid, {})
            self._validate(instance, folder)
            self._instance_dirs[instance.uuid] = self._create(instance, folder, self._clock()).files
            self._prepared[instance.uuid] = instance
            self.plug_vifs(instance.uuid, instance.interfaces)
        return f"{self.uri}/{instance.uuid}"

    def live_migration(
        self,
        uuid: str,
        dest_uri: str,
        dest_definition: str,
        progress: ProgressCallback | None = None,
        block_migration: bool = True,
        max_bandwidth_mib: int | None = None,
        convergence: Convergence | None = None,
    ) -> None:
        """Completes synchronously, a memory pass a step; an abort requested before a step stops it there.

        A guest with the dirty hook writes its MiB again during every pass, so the copy ends only when
        auto-converge has slowed it enough or the transfer was switched to post-copy; else it fails after
        PRECOPY_PASSES_AT_MOST passes. The fake's hosts share no storage, so the instance folder and
        attached volumes always travel.
        """
        if dest_definition != f"{dest_uri}/{uuid}":
            raise DriverError(f"{dest_definition!r} is not what pre_live_migration on {dest_uri} returned")
        with self._lock:
            inst = self._get(uuid)
            self._require(inst, *ACTIVE)
            self._refuse_rescued(inst)
            dest = self._peer(dest_uri)
            total = inst.spec.memory_mib * MIB
            if block_migration:
                total += sum(disk.size for disk in inst.files.values())
            dirty = parse_dirty_hook(inst.spec.boot) * MIB
        with dest._lock:
            if uuid not in dest._prepared:
                raise DriverError(
                    f"{dest.hostname} is not prepared for instance {uuid}; run pre_live_migration there first"
                )
        with self._lock:
            self._transfers[uuid] = convergence or Convergence()
        try:
            self._copy(uuid, total, dirty, progress)
        finally:
            with self._lock:
                self._transfers.pop(uuid, None)
                self._post_copy.discard(uuid)
        with self._lock:
            self._check_abort(uuid)
            inst = self._get(uuid)
            now = self._clock()
            inst.guest.stop(now)
            inst.guest.console.clear()  # the serial log is a file of the host the guest left
            self._release(inst, now)
            volumes = {
                device: (name, attached.disk.copy())
                for device, attached in inst.volumes.items()
                if (name := store_volume_name(attached)) is not None
            }
        try:
            dest._arrive(inst, volumes)
        except DriverError:
            with self._lock:
                self._admit(inst)
                if inst.state is PowerState.RUNNING:
                    inst.guest.run(self._clock())
            raise

    def _copy(self, uuid: str, total: int, dirty: int, progress: ProgressCallback | None) -> None:
        """The memory passes, until what is left fits the switch-over or the transfer went to post-copy."""
        convergence, throttle, done, iteration = self._transfers[uuid], 0, 0, 0
        while True:
            iteration += 1
            with self._lock:
                self._check_abort(uuid)
                if uuid in self._post_copy:
                    if uuid in self._post_copy_breaks:
                        self._get(uuid).state = PowerState.PAUSED  # the source's half stays, paused
                        raise DriverError(f"the post-copy migration of instance {uuid} failed: link broken")
                    return  # the rest follows, each page once
            if iteration > PRECOPY_PASSES_AT_MOST:
                raise DriverError(f"pre-copy of instance {uuid} did not converge in {iteration - 1} passes")
            done = max(done, total * iteration // LIVE_MIGRATION_ITERATIONS)
            left = max(total - done, dirty * (100 - throttle) // 100)
            if progress is not None:
                progress(
                    MigrationProgress(
                        data_total=total,
                        data_processed=done,
                        data_remaining=left,
                        iteration=iteration,
                        expected_downtime_ms=EXPECTED_DOWNTIME_MS,
                        cpu_throttle_percent=throttle,
                    )
                )
            if iteration >= LIVE_MIGRATION_ITERATIONS and left <= SWITCH_OVER_BYTES:
                return
            if convergence.auto_converge and left > SWITCH_OVER_BYTES:
                step = Convergence.THROTTLE_STEP if throttle else Convergence.THROTTLE_INITIAL
                throttle = min(THROTTLE_MAX, throttle + step)

    def abort_live_migration(self, uuid: str) -> None:
        """Marks the instance; its migration, running or next, stops at the next step and stays here. Refused
        in post-copy, as libvirt refuses it."""
        with self._lock:
            self._get(uuid)
            if uuid in self._post_copy:
                raise DriverError(
                    f"the live migration of instance {uuid} is in post-copy; it cannot be aborted"
                )
            self._aborts.add(uuid)

    def live_migration_force_complete(self, uuid: str) -> None:
        with self._lock:
            self._get(uuid)
            if uuid not in self._transfers:
                raise DriverError(f"no live migration of instance {uuid} is running on {self.hostname}")
            if not self._transfers[uuid].post_copy:
                raise DriverError(
                    f"the live migration of instance {uuid} was not started with post-copy allowed"
                )
            self._post_copy.add(uuid)

    def break_post_copy(self, uuid: str) -> None:
        """For tests: the link of the instance's transfer breaks once it is in post-copy (it fails there)."""
        with self._lock:
            self._post_copy_breaks.add(uuid)

    def post_live_migration_at_destination(self, uuid: str) -> MigrationOutcome:
        with self._lock:
            self._get(uuid)
            self._prepared.pop(uuid, None)
        return MigrationOutcome()  # the fake's switch-over is instantaneous and unmeasured

    def rollback_live_migration_at_destination(self, uuid: str) -> None:
        with self._lock:
            spec = self._prepared.pop(uuid, None)
            if spec is None or uuid in self._instances:
                return
            self._instance_dirs.pop(uuid, None)
            self.unplug_vifs(uuid, spec.interfaces)

    # --- internals --------------------------------------------------------------------------------

    def _peer(self, dest_uri: str) -> FakeMigration:
        if dest_uri == self.uri:
            raise DriverError(f"{dest_uri} is this host; a migration needs another one")
        dest = self._registry.get(dest_uri)
        if not isinstance(dest, FakeMigration):
            raise DriverError(f"no fake host is registered at {dest_uri}")
        return dest

    def _check_abort(self, uuid: str) -> None:
        if uuid in self._aborts:
            self._aborts.discard(uuid)
            raise DriverError(
                f"the live migration of instance {uuid} was aborted; it stays on {self.hostname}"
            )

    def _arrive(self, inst: Instance, volumes: Mapping[str, tuple[str, Disk]]) -> None:
        """The destination side of a live migration: the instance, its folder and volumes now live here.

        ``volumes`` maps a guest device to the store name and a copy of the volume behind it.
        """
        with self._lock:
            uuid = inst.spec.uuid
            if uuid in self._instances:
                raise DriverError(f"instance {uuid} is already defined on {self.hostname}")
            self._check_name_free(inst.spec)
            for name, _ in volumes.values():
                holder = self._volume_holders.get(name)
                if holder is not None:
                    raise DriverError(
                        f"volume {name!r} is attached to instance {holder[0]} on {self.hostname}"
                    )
            for device, (name, disk) in volumes.items():
                self._volumes[name] = inst.volumes[device].disk = disk
            self._instance_dirs.pop(uuid, None)
            now = self._clock()
            self._touch(bases_of(inst.files.values()), now)
            self._admit(inst)
            if inst.state is PowerState.RUNNING:
                inst.guest.run(now)
