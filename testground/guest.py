"""The test guest: Debian's cloud kernel with a busybox initramfs of our own.

Its /init (testground.guest_init) reports on the serial console what a driver did to the VM (disks,
config drive, network, hot-plugged volumes, pause) and what its own traffic met (DHCP, probes of another
address), so conformance tests can check real effects inside a real guest. The same kernel and initramfs
also come as BIOS-bootable disk images (a normal one and a rescue one) for image-backed boots and rescue.
This module builds them and makes the hooks: kernel command-line arguments that make the guest act.
"""

from __future__ import annotations

import gzip
import hashlib
import ipaddress
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable

from testground import procs
from testground.guest_init import (
    BOOT_MARKER,
    CD_FILE,
    DHCP,
    DHCP_SCRIPT,
    DHCP_SCRIPT_PATH,
    DIRTY,
    DISK,
    FILLED,
    GUEST_ADDRESS,
    HTTP,
    HTTP_PORT,
    INIT,
    MAC,
    MAC_EVERY,
    NET,
    PEER_ADDRESS,
    PROBE,
    RESCUE_MARKER,
    SHELL_ARG,
    SIZE,
    SPOOFED,
    SPOOFING,
    TCP,
    TCP_PORT,
    TICK,
    TIMED,
    WROTE,
)
from testground.procs import Layout, TestGroundError

# The markers and scripts live in guest_init; tests know them as guest.<NAME>.
__all__ = [
    "BOOT_MARKER",
    "CD_FILE",
    "DHCP",
    "DIRTY",
    "DISK",
    "FILLED",
    "GUEST_ADDRESS",
    "HTTP",
    "HTTP_PORT",
    "MAC",
    "MAC_EVERY",
    "NET",
    "PEER_ADDRESS",
    "PROBE",
    "RESCUE_MARKER",
    "SHELL_ARG",
    "SIZE",
    "SPOOFED",
    "SPOOFING",
    "TCP",
    "TCP_PORT",
    "TICK",
    "TIMED",
    "WROTE",
    "dirty_hook",
    "ensure_images",
    "fill_hook",
    "probe_hook",
    "spoof_hook",
    "timed_hook",
    "write_hook",
]

KERNEL = "kubenova-test-vmlinuz"
INITRD = "kubenova-test-initrd.img"
DISK_IMAGE = "kubenova-test-disk.qcow2"
RESCUE_IMAGE = "kubenova-rescue-disk.qcow2"
CMDLINE = "console=ttyS0 quiet panic=-1"
RESCUE_CMDLINE = f"{CMDLINE} kubenova.role=rescue"
# virtio for disks and NICs, SCSI and IDE so sd*/sr* disks and CD-ROM config drives show
# up too, isofs for config drives; their dependencies are resolved from modules.dep.
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "virtio_scsi", "sd_mod", "ata_piix", "sr_mod", "isofs")
DISK_IMAGE_MIB = 48
APT_LISTS = pathlib.Path("/var/lib/apt/lists")
BUSYBOX = pathlib.Path("/bin/busybox")

_DEV = re.compile(r"[a-z0-9]+")
_PATTERN = re.compile(r"[A-Za-z0-9-]+")
_PROBE = re.compile(r"(?:http://)?(?P<ip>[0-9.]+):(?P<port>[1-9][0-9]{0,4})/?")


def fill_hook(dev: str) -> str:
    """The cmdline argument that makes the guest write one more MiB of /dev/`dev` every second, until the
    disk's end: its disk file grows by as much on the host, so a test can fill the host's file system."""
    if not _DEV.fullmatch(dev):
        raise ValueError(f"kubenova.fill needs a device [a-z0-9]+, not {dev!r}")
    return f"kubenova.fill={dev}"


def spoof_hook(mac: str) -> str:
    """The cmdline argument that makes the guest change its eth0 MAC to ``mac`` and send with it."""
    if not re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", mac):
        raise ValueError(f"kubenova.spoof needs a lower-case MAC address, not {mac!r}")
    return f"kubenova.spoof={mac}"


def write_hook(dev: str, pattern: str) -> str:
    """The cmdline argument that makes the guest write `pattern` at offset 0 of /dev/`dev` once it appears.

    The guest ignores malformed hooks, so a typo here would show only as a missing line: refuse it early.
    """
    if not _DEV.fullmatch(dev) or not _PATTERN.fullmatch(pattern):
        raise ValueError(
            f"kubenova.write needs dev [a-z0-9]+ and pattern [A-Za-z0-9-]+, not {dev!r}:{pattern!r}"
        )
    return f"kubenova.write={dev}:{pattern}"


def timed_hook(devices: list[str], mib: int) -> str:
    """The cmdline argument that makes the guest write ``mib`` MiB to each of ``devices`` in turn, once all
    are there, and print TIMED with its uptime before and after each (a write throughput inside the guest)."""
    if not devices or not all(_DEV.fullmatch(d) for d in devices) or not 1 <= mib <= 65536:
        raise ValueError(f"kubenova.timed needs devices [a-z0-9]+ and 1 to 65536 MiB, not {devices}:{mib}")
    return f"kubenova.timed={','.join(devices)}:{mib}"


def dirty_hook(mib: int) -> str:
    """The cmdline argument that makes the guest fill ``mib`` MiB of its memory and rewrite them without
    end (it prints ``DIRTY`` once it has begun). It must fit the guest's RAM filesystem, half its memory."""
    if not 1 <= mib <= 4096:
        raise ValueError(f"kubenova.dirty needs 1 to 4096 MiB, not {mib}")
    return f"kubenova.dirty={mib}"


def probe_hook(url: str) -> str:
    """The cmdline argument that makes the guest, once it has a DHCP lease, GET ``http://<ip>:<port>/`` every
    second and print PROBE's ``ok <first line>`` or ``fail``: one VM reaching another, or a firewall dropping
    it, shown by the guest's own traffic. ``url`` is ``<ip>:<port>`` or ``http://<ip>:<port>/``, IPv4 only.

    The guest ignores a malformed hook, which would read as a firewall dropping everything: refuse it here.
    """
    found = _PROBE.fullmatch(url)
    try:
        ip = ipaddress.IPv4Address(found["ip"]) if found else None
    except ValueError:
        ip = None
    if found is None or ip is None or int(found["port"]) > 65535:
        raise ValueError(f"kubenova.probe needs <IPv4 address>:<port 1-65535>, not {url!r}")
    return f"kubenova.probe={ip}:{found['port']}"


def _kernel_package(cache: pathlib.Path) -> tuple[str, str]:
    """Name and exact version of the package behind Debian's cloud-kernel meta package.

    apt-cache takes over a second where apt keeps no binary cache (Docker-style images), so the
    answer is remembered until apt's package lists change (after 'apt-get update').
    """
    lists = sorted(APT_LISTS.glob("*_Packages*"))
    stamp = cache / f"kernel-package-{_digest(*(f'{p.name} {p.stat().st_mtime_ns}' for p in lists))}"

    def resolve(dest: pathlib.Path) -> None:
        out = procs.run(
            ["apt-cache", "show", "--no-all-versions", "linux-image-cloud-amd64"],
            "finding Debian's cloud kernel",
            "run 'apt-get update' first",
        ).stdout
        found = re.search(r"^Depends:.*?\b(linux-image-\S+-cloud-amd64) \(= (\S+)\)", out, re.MULTILINE)
        if not found:
            raise TestGroundError(
                "linux-image-cloud-amd64 names no linux-image-*-cloud-amd64 package; run 'apt-get update'"
            )
        dest.write_text(f"{found[1]} {found[2]}\n")

    name, version = _cached(stamp, resolve).read_text().split()
    return name, version


def _load_order(moddir: pathlib.Path) -> list[tuple[str, str]]:
    """(name, path in moddir) of MODULES and their dependencies, each after what it needs; built-ins left
    out."""
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, needs = line.partition(":")
        deps[_module_name(path)] = (path, [_module_name(p) for p in needs.split()])
    builtin = {_module_name(p) for p in (moddir / "modules.builtin").read_text().split()}
    order: list[tuple[str, str]] = []

    def visit(name: str) -> None:
        if name in builtin or any(name == done for done, _ in order):
            return
        if name not in deps:
            raise TestGroundError(
                f"kernel module {name} is neither built in nor in {moddir.name}'s modules.dep"
            )
        path, needs = deps[name]
        if not path.endswith(".ko"):
            raise TestGroundError(f"{path} is compressed; busybox insmod needs plain .ko files")
        for need in needs:
            visit(need)
        order.append((name, path))

    for name in MODULES:
        visit(name)
    return order


def _module_name(path: str) -> str:
    return pathlib.PurePath(path).name.split(".ko")[0].replace("-", "_")


def _build_kernel(dest: pathlib.Path, package: str, version: str) -> None:
    """Fill `dest` with the kernel image and the modules the guest loads, all from one package."""
    with tempfile.TemporaryDirectory() as tmp:
        procs.run(
            ["apt-get", "download", f"{package}={version}"],
            f"downloading {package} {version}",
            "check that Debian's package mirror is reachable",
            cwd=tmp,
        )
        deb = next(pathlib.Path(tmp).glob("*.deb"))
        root = pathlib.Path(tmp, "root")
        procs.run(["dpkg-deb", "-x", str(deb), str(root)], f"unpacking {deb.name}", "check free disk space")
        modules = dest / "modules"
        modules.mkdir(parents=True)
        shutil.copyfile(next((root / "boot").glob("vmlinuz-*")), dest / "vmlinuz")
        moddir = next((root / "lib" / "modules").iterdir())
        # The package ships no modules.dep (its postinst runs depmod); make it here.
        procs.run(
            ["depmod", "-b", str(root), moddir.name],
            f"indexing the modules of {package}",
            "apt-get install kmod",
        )
        order = _load_order(moddir)
        for name, path in order:
            shutil.copyfile(moddir / path, modules / f"{name}.ko")
        (modules / "order").write_text("".join(f"{name}\n" for name, _ in order))


def _build_initrd(dest: pathlib.Path, modules: pathlib.Path) -> None:
    if shutil.which("cpio") is None:
        raise TestGroundError("cpio is missing; apt-get install cpio")
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        for d in ("bin", "proc", "sys", "dev", "mnt", "lib"):
            (root / d).mkdir()
        shutil.copy2(BUSYBOX, root / "bin" / "busybox")
        shutil.copytree(modules, root / "lib" / "modules")
        for path, text in (("init", INIT), (DHCP_SCRIPT_PATH.lstrip("/"), DHCP_SCRIPT)):
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(text)
            (root / path).chmod(0o755)
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        archive = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"],
            cwd=tmp,
            check=True,
            capture_output=True,
            input=("\n".join(files) + "\n").encode(),
        ).stdout
    dest.write_bytes(gzip.compress(archive, mtime=0))


def _syslinux_cfg(cmdline: str) -> str:
    """Boot straight into the kernel; SERIAL makes syslinux itself visible in the console log."""
    return (
        "SERIAL 0 115200\nDEFAULT kubenova\nPROMPT 0\nTIMEOUT 0\n"
        f"LABEL kubenova\n  LINUX /vmlinuz\n  INITRD /initrd.img\n  APPEND {cmdline}\n"
    )


def _build_disk(dest: pathlib.Path, kernel: pathlib.Path, initrd: pathlib.Path, cmdline: str) -> None:
    """A BIOS-bootable qcow2: a FAT superfloppy with syslinux, made without loop devices or mounts."""
    fix = "run hack/install-deps.sh (or: apt-get install dosfstools mtools syslinux qemu-utils)"
    with tempfile.TemporaryDirectory() as tmp:
        raw, cfg = pathlib.Path(tmp, "disk.img"), pathlib.Path(tmp, "syslinux.cfg")
        with raw.open("wb") as f:
            f.truncate(DISK_IMAGE_MIB << 20)
        cfg.write_text(_syslinux_cfg(cmdline))
        procs.run(["mkfs.vfat", "-n", "KUBENOVA", str(raw)], "making the guest disk's FAT filesystem", fix)
        for src, name in ((kernel, "vmlinuz"), (initrd, "initrd.img"), (cfg, "syslinux.cfg")):
            procs.run(
                ["mcopy", "-i", str(raw), str(src), f"::{name}"], f"copying {name} onto the guest disk", fix
            )
        procs.run(["syslinux", "--install", str(raw)], "installing syslinux on the guest disk", fix)
        procs.run(
            ["qemu-img", "convert", "-O", "qcow2", str(raw), str(dest)], "converting the guest disk", fix
        )


def _cached(path: pathlib.Path, build: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Build `path` once: in a private temporary name, then renamed, so concurrent builders never clash."""
    if not path.exists():
        tmp = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
        try:
            build(tmp / path.name)
            os.replace(tmp / path.name, path)
        except OSError:
            if not path.exists():  # another builder's directory may have won the rename
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _digest(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:12]


def ensure_images(layout: Layout, image_store: pathlib.Path) -> None:
    """Build (or take from the cache) kernel, initramfs and disk images, then place them in the image store.

    Every cache entry is named by a digest of what it is built from, so a change to the kernel
    package, the module list, /init, its DHCP script, busybox or the boot loader config builds afresh.
    """
    if not BUSYBOX.exists():
        raise TestGroundError(f"{BUSYBOX} is missing; apt-get install busybox-static")
    cache = layout.cache / "guest"
    cache.mkdir(parents=True, exist_ok=True)
    package, version = _kernel_package(cache)
    kernel_dir = _cached(
        cache / f"kernel-{_digest(package, version, *MODULES)}", lambda d: _build_kernel(d, package, version)
    )
    kernel, modules = kernel_dir / "vmlinuz", kernel_dir / "modules"
    initrd_key = _digest(kernel_dir.name, INIT, DHCP_SCRIPT, BUSYBOX.read_bytes())
    initrd = _cached(cache / f"initrd-{initrd_key}.img", lambda d: _build_initrd(d, modules))
    images = {KERNEL: kernel, INITRD: initrd}
    for name, cmdline in ((DISK_IMAGE, CMDLINE), (RESCUE_IMAGE, RESCUE_CMDLINE)):
        key = _digest(initrd_key, _syslinux_cfg(cmdline), str(DISK_IMAGE_MIB))
        images[name] = _cached(
            cache / f"{name.removesuffix('.qcow2')}-{key}.qcow2",
            lambda d, c=cmdline: _build_disk(d, kernel, initrd, c),
        )
    image_store.mkdir(parents=True, exist_ok=True)
    for name, src in images.items():
        dst = image_store / name
        if dst.exists() and os.path.samefile(src, dst):
            continue
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
