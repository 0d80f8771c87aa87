"""kubenova's libvirt qemu hook: an incoming migration reaches only what the target's agent prepared."""

from __future__ import annotations

import pathlib
import tempfile
from collections.abc import Iterator

import pytest

from kubenova.driver.libvirt import qemu_hook
from kubenova.driver.libvirt.config import GuestConfig, GuestDisk, GuestInterface

UUID = "6f1c3a52-1d7e-4f49-9a57-0c2d2b3f4e10"


@pytest.fixture
def tmp_path() -> Iterator[pathlib.Path]:
    """A short folder: the console socket's path in a definition must fit a unix socket's 107 bytes, and
    pytest's own folders (named after the test) pass that."""
    with tempfile.TemporaryDirectory(prefix="kn-hook-") as folder:
        yield pathlib.Path(folder)


def prepared(instances: pathlib.Path) -> str:
    folder = instances / UUID
    config = GuestConfig(
        uuid=UUID,
        name="t_vm",
        namespace="t",
        instance_name="vm",
        vcpus=1,
        memory_mib=128,
        console_path=str(folder / "console.log"),
        disks=[GuestDisk(str(folder / "disk"), "vda")],
        interfaces=[
            GuestInterface(mac="52:54:00:00:00:01", network="kubenova-test", filter=f"kubenova-{UUID}")
        ],
    )
    folder.mkdir(parents=True)
    xml = config.to_xml()
    (folder / qemu_hook.INCOMING).write_text(xml)
    return xml


def as_libvirt_sends_it(xml: str, instances: pathlib.Path) -> str:
    """What libvirt adds to a running definition: the backing chain in the image cache, controllers."""
    backing = (
        f"<backingStore type='file'><format type='qcow2'/><source file='{instances}/_base/abc'/>"
        "<backingStore/></backingStore>"
    )
    xml = xml.replace('<target dev="vda"', f'{backing}<target dev="vda"')
    xml = xml.replace("<devices>", "<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>")
    return xml.replace("</devices>", "<controller type='usb' index='0' model='piix3-uhci'/></devices>")


def check(xml: str, instances: pathlib.Path) -> str | None:
    return qemu_hook.check_incoming(xml, instances)


def test_the_prepared_definition_as_libvirt_sends_it_is_admitted(tmp_path: pathlib.Path) -> None:
    xml = prepared(tmp_path)
    assert check(xml, tmp_path) is None
    sent = as_libvirt_sends_it(xml, tmp_path)
    assert "_base/abc" in sent and check(sent, tmp_path) is None


@pytest.mark.parametrize(
    ("forge", "named"),
    [
        (lambda x, d: x.replace(f"{d}/{UUID}/disk", f"{d}/other-instance/disk"), "other-instance/disk"),
        (lambda x, d: x.replace(f"{d}/{UUID}/disk", "/dev/sda"), "path:/dev/sda"),
        (lambda x, d: x.replace(f"{d}/_base/abc", "/etc/shadow"), "path:/etc/shadow"),
        (lambda x, d: x.replace("kubenova-test", "host-uplink"), "network:host-uplink"),
        (lambda x, d: x.replace(f"kubenova-{UUID}", "allow-all"), "filter:allow-all"),
        (
            lambda x, d: x.replace(
                "</devices>",
                "<hostdev mode='subsystem' type='pci'><source><address bus='0x01' slot='0'/></source>"
                "</hostdev></devices>",
            ),
            "device:hostdev",
        ),
        (
            lambda x, d: x.replace(
                "</domain>",
                "<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
                "<qemu:arg value='-chardev'/></qemu:commandline></domain>",
            ),
            "qemu-namespace:commandline",
        ),
        (lambda x, d: x.replace("</os>", "<kernel>/root/evil</kernel></os>"), "path:/root/evil"),
        (lambda x, d: x.replace("/usr/bin/qemu-system-x86_64", "/tmp/qemu"), "emulator:/tmp/qemu"),
        (
            lambda x, d: x.replace(
                "</devices>", "<rng model='virtio'><backend model='random'>/dev/sda</backend></rng></devices>"
            ),
            "path:/dev/sda",
        ),
        (
            lambda x, d: x.replace(
                "</devices>",
                "<disk type='network' device='disk'><source protocol='rbd' name='tenant-b/disk'>"
                "<host name='ceph-mon' port='6789'/></source><auth username='admin'>"
                "<secret type='ceph' uuid='1b2c'/></auth><target dev='vdz'/></disk></devices>",
            ),
            "secret:1b2c",
        ),
    ],
)
def test_a_forged_definition_is_refused_naming_what_it_reaches(
    tmp_path: pathlib.Path, forge: object, named: str
) -> None:
    sent = as_libvirt_sends_it(prepared(tmp_path), tmp_path)
    reason = check(forge(sent, tmp_path), tmp_path)  # type: ignore[operator]
    assert reason is not None and named in reason, reason


def test_an_unprepared_or_nameless_migration_is_refused(tmp_path: pathlib.Path) -> None:
    xml = prepared(tmp_path)
    (tmp_path / UUID / qemu_hook.INCOMING).unlink()
    assert "prepared no migration" in (check(xml, tmp_path) or "")
    assert "no usable UUID" in (check(xml.replace(UUID, "../../etc"), tmp_path) or "")


def test_only_an_incoming_migration_is_checked_and_a_refusal_says_why(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "kubenova-hook.json").write_text(f'{{"instancesDir": "{tmp_path / "instances"}"}}')
    xml = prepared(tmp_path / "instances")
    assert qemu_hook.main(["t_vm", "start", "begin", "-"], "", hooks) == 0
    assert qemu_hook.main(["t_vm", "migrate", "begin", "-"], xml, hooks) == 0
    forged = xml.replace("console.log", "../../../etc/passwd")
    assert qemu_hook.main(["t_vm", "migrate", "begin", "-"], forged, hooks) == 1
    assert "kubenova refused the incoming migration of t_vm" in capsys.readouterr().err
