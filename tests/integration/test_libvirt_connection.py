"""The libvirt driver survives its libvirtd going away: it reconnects and keeps its event callbacks."""

from __future__ import annotations

import pathlib
import shutil
import threading
import time
import uuid

import libvirt

from kubenova.driver.base import InstanceSpec, KernelBoot
from kubenova.driver.images import ImageStore
from kubenova.driver.libvirt.driver import LibvirtDriver
from kubenova.driver.libvirt.migration import expose
from testground import ground as testground
from testground import guest, libvirt_host
from tests.helpers import eventually

NODE = "reconnect"


def test_reconnects_after_libvirtd_restarts_and_still_gets_events(ground: testground.Ground) -> None:
    layout = ground.layout
    root = layout.state / "nodes" / NODE / "instances"
    shutil.rmtree(root, ignore_errors=True)
    store = ImageStore(ground.image_store)
    driver = LibvirtDriver(libvirt_host.start(layout, NODE), "qemu", root, store, root.parent / "volumes")
    events: list[str] = []
    driver.add_lifecycle_listener(events.append)
    try:
        driver.init_host(NODE)
        assert driver.list_instances() == []
        libvirt_host.stop(layout, NODE)  # kill -9 of libvirtd, virtlogd and their QEMUs
        libvirt_host.start(layout, NODE)
        spec = InstanceSpec(
            uuid=str(uuid.uuid4()),
            name="after-restart",
            namespace="t",
            vcpus=1,
            memory_mib=96,
            boot=KernelBoot(
                store.resolve("k", guest.KERNEL), store.resolve("i", guest.INITRD), guest.CMDLINE
            ),
        )
        driver.spawn(spec)  # the first call after the restart reconnects
        assert spec.uuid in driver.list_instances()
        eventually(
            lambda: spec.uuid in events, timeout=10, what="a lifecycle event through the new connection"
        )
        driver.destroy(spec.uuid)
    finally:
        driver.host.close()
        libvirt_host.stop(layout, NODE)


def test_a_fetch_waits_for_another_migration_reading_the_same_folder(
    ground: testground.Ground, tmp_path: pathlib.Path
) -> None:
    """Two stopped instances of one namespace evacuated at once read the same folder of the volume store,
    and libvirt allows one pool per folder: the second waits for the first instead of failing; a pool an
    earlier try of the same fetch left behind is dropped."""
    conn = libvirt.open(libvirt_host.uri(ground.layout, ground.node))
    try:
        other = expose(conn, "kubenova-out-other-0", str(tmp_path), "other")
        (tmp_path / "x").mkdir()
        expose(conn, "kubenova-out-mine-0", str(tmp_path / "x"), "mine")  # left by a cut-short try
        threading.Timer(1.0, other.destroy).start()
        started = time.monotonic()
        mine = expose(conn, "kubenova-out-mine-0", str(tmp_path), "mine")
        assert time.monotonic() - started >= 1.0, "it waited for the other pool to go"
        assert mine.name() == "kubenova-out-mine-0" and mine.isActive()
        mine.destroy()
    finally:
        conn.close()
