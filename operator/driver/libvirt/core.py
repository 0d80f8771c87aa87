"""What every part of the libvirt driver shares: the host, the instance folders, the image cache, and the
steps from a spec to a defined domain (checks, disks, definition) that spawn, redefinition and both
migrations take.

Each instance is a persistent domain whose UUID is the Kubernetes object's UID, with a folder of its own
(``<instances>/<uuid>``) holding every file spawn creates: root overlay, ephemeral and swap disks, config
drive, console log, rescue state. destroy removes that folder and nothing else: volumes and images live in
their stores and are never deleted by an instance. A root disk in a PersistentVolumeClaim lives in the
claim's volume; the folder keeps only a link to it, so it outlives the instance too.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import stat
import threading
from collections.abc import Callable, Collection, Iterable
from typing import Any

from kubenova import faults
from kubenova.driver import cloudinit
from kubenova.driver.base import (
    ComputeDriver,
    DriverError,
    ImageRef,
    InstanceExists,
    InstanceNotRunning,
    InstanceSpec,
    Interface,
    MovingVolume,
    NodeNetwork,
    VolumeSpec,
    check_cpu_model,
    check_instance,
    check_macs,
)
from kubenova.driver.images import ImageStore
from kubenova.driver.imports import DEFAULT_MAX_BYTES, Importer
from kubenova.driver.libvirt import configdrive, imagecache
from kubenova.driver.libvirt.config import GuestConfig, GuestDisk, GuestGraphics, GuestInterface, domain_name
from kubenova.driver.libvirt.disks import (
    CONFIG_DRIVE,
    EPHEMERAL,
    ROOT,
    SWAP,
    VOLUME,
    bounded,
    next_target,
    own_disk,
)
from kubenova.driver.libvirt.guest import Guest
from kubenova.driver.libvirt.host import Host
from kubenova.driver.libvirt.imagecache import ImageCache
from kubenova.driver.libvirt.transport import MigrationTransport


def filter_name(uuid: str) -> str:
    """The instance's nwfilter."""
    return f"kubenova-{uuid}"


def _empty(path: pathlib.Path, size: str) -> tuple[pathlib.Path, dict[str, Any]]:
    """An empty disk of the instance's, made unless it is there already (a migrated instance brings its
    disks along)."""
    if not path.exists():
        imagecache.create_empty(path, size)
    return path, {}


class LibvirtCore(ComputeDriver):
    def __init__(
        self,
        uri: str,
        domain_type: str,
        instances_dir: str | os.PathLike[str],
        images: ImageStore,
        volumes_dir: str | os.PathLike[str],
        transport: MigrationTransport | None = None,
        import_max_bytes: int = DEFAULT_MAX_BYTES,
        import_concurrency: int = 2,
        dnsmasq_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.host = Host(uri)
        self.transport = transport or MigrationTransport()  # encrypted, with libvirt's own certificates
        self.domain_type = domain_type
        self.instances_dir = pathlib.Path(instances_dir)
        self.images = images
        self.volumes = ImageStore(volumes_dir)
        cache_dir = self.instances_dir / "_base"
        self.cache = ImageCache(images, cache_dir, Importer(cache_dir, import_max_bytes, import_concurrency))
        self._rebooting: dict[str, float] = {}
        #: guests a snapshot holds frozen now, and guests whose thaw failed (thawed again at the next look)
        self._frozen: set[str] = set()
        self._thaw_due: set[str] = set()
        self._lock = threading.Lock()
        #: the node's default network once ensure_node_network made it; its reservations under _net_lock
        self.node_network: NodeNetwork | None = None
        self._net_lock = threading.Lock()
        #: libvirtd's dnsmasq folder as the agent sees it, and the node network's reservation folder in it
        #: once ensure_node_network found that its dnsmasq reads there (Network)
        self.dnsmasq_dir = pathlib.Path(dnsmasq_dir) if dnsmasq_dir else None
        self._hosts_dir: pathlib.Path | None = None
        #: DHCP reservations being made behind a spawn or a live migration's transfer (Network)
        self._reserving: dict[str, threading.Thread] = {}
        #: The lease watch's own connection, polled every half second from one thread: libvirt 9.0's
        #: client crashes when keepalive closes a connection that several threads wait on, so the poll never
        #: shares the main one.
        self.lease_host = Host(uri, events=False)

    def _dir(self, uuid: str) -> pathlib.Path:
        return self.instances_dir / uuid

    def console_path(self, uuid: str) -> pathlib.Path:
        return self._dir(uuid) / "console.log"

    def _guest(self, uuid: str) -> Guest:
        return self.host.get_guest(uuid)

    def _running(self, uuid: str, operation: str) -> Guest:
        guest = self._guest(uuid)
        if not guest.active:
            raise InstanceNotRunning(f"{operation}: the instance is not running")
        return guest

    def _check_fits(self, instance: InstanceSpec) -> None:
        other = self.host.find_guest_by_name(domain_name(instance.namespace, instance.name))
        if other is not None and other.uuid != instance.uuid:
            raise InstanceExists(f"a domain named {other.name} already exists with UUID {other.uuid}")
        self._check_instance(instance)
        if instance.interfaces:
            check_macs(instance, self._macs_in_use(instance.uuid))

    def _check_instance(self, instance: InstanceSpec) -> None:
        """What this host refuses of any definition: more memory than it has, a CPU model it cannot give."""
        check_instance(instance, self.host.memory_mib())
        if instance.cpu_model:
            check_cpu_model(instance, self.host.domain_capabilities(self.domain_type).cpu_models)

    def _macs_in_use(self, uuid: str) -> dict[str, str]:
        """MAC -> "namespace/name" of every other domain on this host that has it (running or defined)."""
        used = {}
        for guest in self.host.list_guests():
            if guest.uuid == uuid:
                continue
            try:
                config = guest.live_config()
                owner = (
                    f"{config.namespace}/{config.instance_name}"
                    if config.namespace or config.instance_name
                    else f"domain {config.name}"
                )
            except DriverError:
                continue  # gone meanwhile
            for iface in config.interfaces:
                if iface.mac is not None:
                    used[iface.mac.lower()] = owner
        return used

    def _volume_file(self, uuid: str, volume: VolumeSpec) -> tuple[pathlib.Path, str]:
        """Where a volume's bytes are on this host, and their format: a store volume in its namespace's
        folder of the store, an image volume as an overlay in the instance's folder, a claim's where its
        holder pod has it."""
        if volume.from_image:
            return self._dir(uuid) / bounded(f"{VOLUME}{volume.name}"), "qcow2"
        if volume.path:  # a claim's disk image, where the kubelet mounted the claim
            return pathlib.Path(volume.path), "raw"
        return self._store_file(volume), "raw"

    def _store_file(self, volume: VolumeSpec) -> pathlib.Path:
        """A store volume's file: its namespace's own, never another's."""
        return self.volumes.namespace(volume.namespace).path("spec.volume.name", volume.name)

    def _volume_disk(self, uuid: str, moving: MovingVolume) -> GuestDisk:
        path, fmt = self._volume_file(uuid, moving.volume)
        return GuestDisk(
            source=str(path),
            target=moving.device,
            driver_type=fmt,
            bus=moving.volume.bus,
            read_only=moving.volume.read_only,
            serial=moving.volume.name[:20],
            block=bool(moving.volume.path) and stat.S_ISBLK(path.stat().st_mode),  # a Block-mode claim's
        )

    def _image_volume(self, uuid: str, volume: VolumeSpec) -> pathlib.Path:
        """An image volume's overlay in the instance's folder, made over this host's copy of the image
        unless it is there."""
        path, _ = self._volume_file(uuid, volume)
        if not path.exists():
            base = self.cache.base(ImageRef(volume.name, namespace=volume.namespace), "spec.image.name")
            self.cache.overlay(base, path)
        return path

    def _store_files(self, disks: Iterable[GuestDisk]) -> list[pathlib.Path]:
        """The store volumes among a guest's disks: what leaves with a migrated instance."""
        root = self.volumes.root
        return [
            pathlib.Path(d.source) for d in disks if d.source and pathlib.Path(d.source).is_relative_to(root)
        ]

    def _guest_config(
        self, instance: InstanceSpec, folder: pathlib.Path, current: GuestConfig | None = None
    ) -> GuestConfig:
        """Create the instance's disks in its folder and describe the domain that uses them.

        With the ``current`` definition (a spec change), attached volumes stay as they are, and the config
        drive is rewritten only when its files changed; without it, the volumes a migration brings
        (``instance.volumes``) are named at the devices they had.
        """
        own: list[tuple[pathlib.Path, dict[str, Any]]] = []
        if instance.root_claim:
            own.append((self._claim_root(instance, folder), {"driver_type": "raw"}))
        elif instance.image is not None:
            if not (folder / ROOT).exists():
                base = self.cache.base(instance.image, "spec.boot.image.name")
                self.cache.overlay(base, folder / ROOT, instance.root_gib)
            own.append((folder / ROOT, {}))
        elif instance.root_gib:
            own.append(_empty(folder / ROOT, f"{instance.root_gib}G"))
        for name, size in instance.ephemeral_gib:
            own.append(_empty(folder / f"{EPHEMERAL}{name}", f"{size}G"))
        if instance.swap_mib:
            own.append(_empty(folder / SWAP, f"{instance.swap_mib}M"))
        drive: dict[str, str] = {}
        if cloudinit.needed(instance):
            files = cloudinit.files(instance)
            drive = {name: hashlib.sha256(data).hexdigest()[:16] for name, data in files.items()}
            if current is None or current.drive != drive or not (folder / CONFIG_DRIVE).exists():
                configdrive.write(files, folder / CONFIG_DRIVE)
            own.append((folder / CONFIG_DRIVE, {"driver_type": "raw", "read_only": True}))
        volumes = (
            [d for d in current.disks if not own_disk(d.source, folder)]
            if current
            else [self._volume_disk(instance.uuid, v) for v in instance.volumes]
        )
        used = {v.target for v in volumes}
        disks = []
        for path, kw in own:  # in guest order, around the names attached volumes hold
            target = next_target(used)
            used.add(target)
            disks.append(GuestDisk(source=str(path), target=target, **kw))
        boot = instance.boot
        return GuestConfig(
            uuid=instance.uuid,
            name=domain_name(instance.namespace, instance.name),
            namespace=instance.namespace,
            instance_name=instance.name,
            vcpus=instance.vcpus,
            memory_mib=instance.memory_mib,
            console_path=str(folder / "console.log"),
            domain_type=self.domain_type,
            kernel=boot.kernel if boot else None,
            initrd=boot.initrd if boot else None,
            cmdline=boot.cmdline if boot else None,
            disks=disks + volumes,
            interfaces=[
                GuestInterface(
                    network=i.network, mac=mac, model=i.model, filter=filter_name(instance.uuid), name=i.name
                )
                for i, mac in zip(instance.interfaces, instance.macs(), strict=True)
            ],
            graphics=GuestGraphics(password=instance.vnc_password) if instance.vnc_password else None,
            drive=drive,
            revision=instance.revision,
            cpu_model=instance.cpu_model,
        )

    def _claim_root(self, instance: InstanceSpec, folder: pathlib.Path) -> pathlib.Path:
        """A root disk in a claim: disk.img in the claim's volume, made from the image (or empty) unless it is
        there (a new instance of the same claim boots what the last one left), and the folder's root disk a
        link to it, so rescue, snapshots and the disk listings find it where every root disk is."""
        assert instance.root_claim is not None
        path, size = instance.root_claim
        disk = pathlib.Path(path)
        if not disk.exists():
            base = self.cache.base(instance.image, "spec.boot.image.name") if instance.image else None
            imagecache.make_raw(disk, size, base)
        link = folder / ROOT
        if not link.is_symlink() or os.readlink(link) != path:  # the holder pod, and its mount, may be new
            part = folder / f".{ROOT}.link"
            part.unlink(missing_ok=True)
            part.symlink_to(path)
            os.replace(part, link)
        return link

    def check_vifs(self, uuid: str, interfaces: Collection[Interface]) -> None:
        """Networks started and room for the addresses (Network's)."""
        raise NotImplementedError

    def plug_vifs_behind(self, uuid: str, interfaces: Collection[Interface]) -> None:
        """The DHCP reservations on a thread (Network's)."""
        raise NotImplementedError

    def _create(
        self, instance: InstanceSpec, power_on: bool, fill: Callable[[pathlib.Path], None] | None = None
    ) -> None:
        """Define and start an instance whose folder ``fill`` may have stocked; on failure nothing is left."""
        if self.instance_exists(instance.uuid):  # a retry: the same object, never a second domain
            if power_on:
                self.power_on(instance.uuid)
            return
        self._check_fits(instance)
        self.check_vifs(instance.uuid, instance.interfaces)
        folder = self._dir(instance.uuid)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            if fill:
                fill(folder)
            if instance.interfaces:  # in place before the first packet: no rules yet means nothing gets in
                self.ensure_filtering_rules_for_instance(instance.uuid, instance.firewall)
            config = self._guest_config(instance, folder)
            guest = self.host.define(config.to_xml(), instance.uuid)
            faults.point("spawn.defined")
            if power_on:
                guest.launch()
        except BaseException:
            self.destroy(instance.uuid)  # a failed spawn leaves nothing behind
            raise
        # The DHCP reservation after the start: made during it, it held the start up for as long (~0.6 s).
        self.plug_vifs_behind(instance.uuid, instance.interfaces)
