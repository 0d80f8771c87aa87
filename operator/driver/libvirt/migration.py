"""Both migrations between two hosts' libvirtds.

Cold: the source stops the instance and keeps its folder; the target fetches each disk as a libvirt
storage-volume download from a transient pool over that folder, then defines and starts. Live:
peer-to-peer, the overlays copied over NBD (the bases are on both hosts already), the definition made
by the target's pre_live_migration.
"""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import threading
import time
from typing import Any

import libvirt

from kubenova.driver.base import (
    Convergence,
    DriverError,
    ImageRef,
    InstanceNotFound,
    InstanceSpec,
    MigrationOutcome,
    MigrationProgress,
    PowerState,
    ProgressCallback,
    VolumeSpec,
    check_handed_disks,
)
from kubenova.driver.libvirt import imagecache, qemu_hook
from kubenova.driver.libvirt.definitions import migration_definition
from kubenova.driver.libvirt.disks import CONFIG_DRIVE, INCOMING_VOLUMES, OUTGOING_VOLUMES, RESCUE_DISK, ROOT
from kubenova.driver.libvirt.errors import translate
from kubenova.driver.libvirt.guest import Guest
from kubenova.driver.libvirt.hostconfig import StoragePool
from kubenova.driver.libvirt.network import Network

#: How long a cold migration's fetch waits for another one to stop reading the same folder of the source.
EXPOSE_WAIT = 300.0


def _migrate(
    guest: Guest, dest_uri: str, params: dict[str, Any], flags: int, outcome: list[BaseException]
) -> None:
    """The migration job, on a thread of its own; what it raises is handed to the caller's thread."""
    try:
        guest.migrate(dest_uri, params, flags)
    except BaseException as exc:
        outcome.append(exc)


def expose(source: libvirt.virConnect, name: str, folder: str, uuid: str) -> libvirt.virStoragePool:
    """A transient dir pool over one of the source's folders, which makes its files downloadable.

    libvirt lets one pool read a folder: another migration's fetch from the same namespace's folder of
    the volume store (two stopped instances evacuated at once) is waited for; a pool of this very fetch
    left by an agent that died mid-copy is dropped first.
    """
    with contextlib.suppress(libvirt.libvirtError):
        source.storagePoolLookupByName(name).destroy()
    deadline = time.monotonic() + EXPOSE_WAIT
    with translate("expose the source's disks", uuid):
        while True:
            try:
                return source.storagePoolCreateXML(StoragePool(name=name, path=folder).to_xml(), 0)
            except libvirt.libvirtError as exc:
                if "conflict" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(0.5)


def _recorded(marker: pathlib.Path) -> list[str]:
    """The paths a migration recorded in one of the instance folder's markers (none if it has none)."""
    return marker.read_text().splitlines() if marker.exists() else []


def _report(guest: Guest, progress: ProgressCallback) -> None:
    stats = guest.job_stats()
    if stats and stats.get("data_total"):  # nothing to report before the job has sized its work
        progress(
            MigrationProgress(
                data_total=int(stats.get("data_total", 0)),
                data_processed=int(stats.get("data_processed", 0)),
                data_remaining=int(stats.get("data_remaining", 0)),
                iteration=int(stats.get("memory_iteration", 0)),
                expected_downtime_ms=int(stats.get("downtime", 0)),
                cpu_throttle_percent=int(stats.get("auto_converge_throttle", 0)),
            )
        )


def transfer_options(max_bandwidth_mib: int | None, convergence: Convergence) -> tuple[int, dict[str, Any]]:
    """The flags and parameters of a transfer's rate and of how it may force its end.

    The cap holds in post-copy too (QEMU's post-copy is unlimited unless told): a user who capped the
    migration's traffic meant all of it.
    """
    flags, params = 0, dict[str, Any]()
    if max_bandwidth_mib:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = max_bandwidth_mib
    if convergence.auto_converge:
        flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
        params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL] = Convergence.THROTTLE_INITIAL
        params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT] = Convergence.THROTTLE_STEP
    if convergence.post_copy:
        flags |= libvirt.VIR_MIGRATE_POSTCOPY
        if max_bandwidth_mib:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH_POSTCOPY] = max_bandwidth_mib
    return flags, params


class Migration(Network):  # a live migration's target plugs its interfaces behind the transfer
    # --- cold ------------------------------------------------------------------------------

    def migrate_disk_and_power_off(self, uuid: str, dest_uri: str) -> list[str]:
        """Stop the instance; its folder and its store volumes stay as they are for the target to fetch
        (the config drive is remade there)."""
        self.power_off(uuid)
        (self._dir(uuid) / INCOMING_VOLUMES).unlink(missing_ok=True)  # the arrival it recorded is over
        own = [p for p in self._dir(uuid).glob("disk*") if p.name not in (CONFIG_DRIVE, RESCUE_DISK)]
        return sorted(str(p) for p in [*own, *self._store_files(self._guest(uuid).config_devices().disks)])

    def finish_migration(
        self, instance: InstanceSpec, disk_info: list[str], source_uri: str, power_on: bool = True
    ) -> None:
        """Fetch each disk (and each store volume) from the source's libvirtd as a storage-volume download,
        then define and start; a failure leaves none of the fetched volumes behind."""
        made: list[pathlib.Path] = []

        def fill(folder: pathlib.Path) -> None:
            self._fetch_disks(instance, disk_info, source_uri, folder, made)
            root = folder / ROOT
            if instance.image is not None and root.exists():  # lean on this host's own copy of the base
                imagecache.rebase(root, self.cache.base(instance.image, "spec.boot.image.name"))
            for moving in instance.volumes:  # an image volume's overlay too
                overlay, _ = self._volume_file(instance.uuid, moving.volume)
                if moving.volume.from_image and overlay.exists():
                    image = ImageRef(moving.volume.name, namespace=moving.volume.namespace)
                    imagecache.rebase(overlay, self.cache.base(image, "spec.image.name"))
            if (
                instance.root_gib
                and root.exists()
                and instance.root_gib * 2**30 > imagecache.virtual_size(root)
            ):
                imagecache.resize(root, f"{instance.root_gib}G")

        try:
            self._create(instance, power_on, fill)
        except BaseException:
            for path in made:
                path.unlink(missing_ok=True)
            raise

    def _fetch_disks(
        self,
        instance: InstanceSpec,
        paths: list[str],
        source_uri: str,
        folder: pathlib.Path,
        made: list[pathlib.Path],
    ) -> None:
        """A transient dir pool over each of the source's folders (the instance's, a namespace's in the
        volume store) makes its files downloadable volumes; ``made`` collects the store files written."""
        volumes = {
            (v.volume.namespace, v.volume.name): v.volume for v in instance.volumes if not v.volume.from_image
        }
        check_handed_disks(instance.uuid, paths, volumes)
        wanted: dict[str, list[tuple[str, pathlib.Path]]] = {}  # source folder -> (file, where it goes)
        for path in map(pathlib.PurePath, paths):
            volume = volumes.get((path.parent.name, path.name))
            if volume is not None:
                dest = self._claim_store_file(folder, volume)
                made.append(dest)
            else:
                dest = folder / path.name
            wanted.setdefault(str(path.parent), []).append((path.name, dest))
        if not wanted:
            return
        try:
            source = libvirt.open(self.transport.client_uri(source_uri))
        except libvirt.libvirtError as exc:
            raise DriverError(f"cannot reach the source host at {source_uri}: {exc}") from exc
        try:
            for index, (source_folder, files) in enumerate(sorted(wanted.items())):
                pool = expose(source, f"kubenova-out-{instance.uuid}-{index}", source_folder, instance.uuid)
                try:
                    for name, dest in files:
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        with translate(f"fetch {name}", instance.uuid), open(dest, "wb") as out:
                            stream = source.newStream(0)
                            pool.storageVolLookupByName(name).download(stream, 0, 0, 0)
                            stream.recvAll(lambda _s, data, f: f.write(data), out)
                            stream.finish()
                finally:
                    with contextlib.suppress(libvirt.libvirtError):
                        pool.destroy()
        finally:
            source.close()

    def _claim_store_file(self, folder: pathlib.Path, volume: VolumeSpec) -> pathlib.Path:
        """The store file a migration's copy of ``volume`` goes to. One already there is refused (the copy
        would overwrite another volume of that name) unless this instance's own earlier try made it,
        as its folder records: a retry after the agent died mid-copy neither fails nor leaks."""
        dest = self._store_file(volume)
        marker = folder / INCOMING_VOLUMES
        if dest.exists() and str(dest) not in _recorded(marker):
            raise DriverError(
                f"volume {volume.name!r} of namespace {volume.namespace} is in this node's store already; "
                "moving the instance here would overwrite it: choose another node, or delete or rename "
                "the volume here"
            )
        folder.mkdir(parents=True, exist_ok=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with marker.open("a") as f:
            f.write(f"{dest}\n")
        return dest

    def confirm_migration(self, uuid: str) -> None:
        """The instance stays on the target: the store volumes it took along go, then its folder (in that
        order, so that a retry after a crash between the two still finds them in the definition)."""
        try:
            moved = self._store_files(self._guest(uuid).config_devices().disks)
        except InstanceNotFound:
            moved = []
        for path in moved:
            path.unlink(missing_ok=True)
        self.destroy(uuid)

    def drop_volume_copies(self, uuid: str) -> None:
        folder = self._dir(uuid)
        for marker in (folder / INCOMING_VOLUMES, folder / OUTGOING_VOLUMES):
            for path in _recorded(marker):
                pathlib.Path(path).unlink(missing_ok=True)
            marker.unlink(missing_ok=True)

    def finish_revert_migration(self, uuid: str, power_on: bool = True) -> None:
        self._guest(uuid)
        if power_on:
            self.power_on(uuid)

    # --- live ------------------------------------------------------------------------------

    def pre_live_migration(self, instance: InstanceSpec) -> str:
        """Make the instance's files here as spawn would (empty overlays the copy fills) and describe the
        domain."""
        if self.instance_exists(instance.uuid):
            raise DriverError(f"instance {instance.uuid} already has a domain on this host")
        self._check_fits(instance)
        self.check_vifs(instance.uuid, instance.interfaces)
        self.plug_vifs_behind(instance.uuid, instance.interfaces)  # the transfer does not wait for DHCP
        folder = self._dir(instance.uuid)
        folder.mkdir(parents=True, exist_ok=True)
        made: list[pathlib.Path] = []
        try:
            self._receive_volumes(instance, folder, made)
            if instance.interfaces:
                self.ensure_filtering_rules_for_instance(instance.uuid, instance.firewall)
            definition = self._guest_config(instance, folder).to_xml()
            # What the qemu hook lets in: the source sends the definition, this host decides what runs.
            (folder / qemu_hook.INCOMING).write_text(definition)
            return definition
        except BaseException:
            self.rollback_live_migration_at_destination(instance.uuid)
            for path in made:
                path.unlink(missing_ok=True)
            raise

    def _receive_volumes(
        self, instance: InstanceSpec, folder: pathlib.Path, made: list[pathlib.Path]
    ) -> None:
        """The files the block copy of the instance's volumes fills: an empty one of the source's size per
        store volume (collected in ``made``), an overlay of this host's copy of the image per image volume."""
        for moving in instance.volumes:
            if moving.volume.from_image:
                self._image_volume(instance.uuid, moving.volume)
                continue
            if moving.volume.read_only:
                raise DriverError(
                    f"volume {moving.volume.name!r} is attached read-only, and a live block copy moves only "
                    "what the guest can write; stop the instance and use a Cold migration"
                )
            path = self._claim_store_file(folder, moving.volume)
            made.append(path)
            with open(path, "wb") as f:
                f.truncate(moving.size_bytes)

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
        guest = self._running(uuid, "live_migration")
        host = self.transport.check(dest_uri).hostname
        flags, params = transfer_options(max_bandwidth_mib, convergence or Convergence())
        flags |= (
            libvirt.VIR_MIGRATE_LIVE
            | libvirt.VIR_MIGRATE_PEER2PEER
            | libvirt.VIR_MIGRATE_PERSIST_DEST
            | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
            | self.transport.flags()
        )
        params |= {
            libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{host}",
            # the guest's CPU and devices as it runs them; the target's own definition for its next boot
            libvirt.VIR_MIGRATE_PARAM_DEST_XML: migration_definition(dest_definition, guest.migratable_xml()),
            libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: dest_definition,
        }
        disks = guest.devices().disks
        if block_migration:  # overlays travel over NBD; the bases are already on the target
            flags |= libvirt.VIR_MIGRATE_NON_SHARED_INC
            params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = [d.target for d in disks if not d.read_only]
        moved = self._store_files(disks)
        folder = self._dir(uuid)
        (folder / INCOMING_VOLUMES).unlink(missing_ok=True)  # the arrival it recorded is over
        # What goes once the guest is gone, for an agent that dies before it sees the transfer end.
        (folder / OUTGOING_VOLUMES).write_text("".join(f"{p}\n" for p in moved))
        outcome: list[BaseException] = []
        worker = threading.Thread(
            target=_migrate,
            args=(guest, dest_uri, params, flags, outcome),
            name=f"migrate-{uuid}",
            daemon=True,
        )
        worker.start()
        while worker.is_alive():
            worker.join(0.5)
            if progress and worker.is_alive():
                _report(guest, progress)
        if outcome:  # the marker stays: the job may have ended on the target all the same (the agent looks)
            raise outcome[0]  # the instance still runs here
        self.unfilter_instance(uuid)
        shutil.rmtree(self._dir(uuid), ignore_errors=True)
        for path in moved:  # their bytes are the target's now
            path.unlink(missing_ok=True)

    def abort_live_migration(self, uuid: str) -> None:
        self._running(uuid, "abort_live_migration").abort_job()

    def live_migration_force_complete(self, uuid: str) -> None:
        self._running(uuid, "live_migration_force_complete").start_post_copy()

    def post_live_migration_at_destination(self, uuid: str) -> MigrationOutcome:
        self.plugged(uuid)
        guest = self._guest(uuid)
        (self._dir(uuid) / qemu_hook.INCOMING).unlink(missing_ok=True)
        (self._dir(uuid) / INCOMING_VOLUMES).unlink(missing_ok=True)  # the copies are the volumes now
        if guest.state() is not PowerState.RUNNING:
            raise DriverError(f"instance {uuid} arrived but is not running")
        stats = guest.job_stats(completed=True)  # the incoming job's figures stay here until the next job
        if stats is None:
            return MigrationOutcome()

        def figure(key: str) -> int | None:
            return int(stats[key]) if key in stats else None

        return MigrationOutcome(elapsed_ms=figure("time_elapsed"), downtime_ms=figure("downtime"))

    def rollback_live_migration_at_destination(self, uuid: str) -> None:
        """Remove what pre_live_migration made; a domain that did arrive is removed too."""
        self.plugged(uuid)
        self.destroy(uuid)
