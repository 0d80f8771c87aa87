"""The test guest: Debian's cloud kernel with a busybox initramfs of our own.

Its /init reports on the serial console what a driver did to the VM (disks, config drive,
network, hot-plugged volumes, pause), so conformance tests can check real effects inside a
real guest. The same kernel and initramfs also come as BIOS-bootable disk images (a normal
one and a rescue one) for image-backed boots and rescue.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable

from testground import procs
from testground.procs import Layout, TestGroundError

BOOT_MARKER = "KUBENOVA-GUEST-BOOTED"
RESCUE_MARKER = "KUBENOVA-RESCUE-BOOTED"
TICK = "kubenova-guest-tick"
DISK = "kubenova-disk"
CD_FILE = "kubenova-cd-file"
NET = "kubenova-net"
#: "kubenova-mac eth0 <address>": the MAC the guest's eth0 has, before tick 0 and every tenth tick after it,
#: so a guest that moved (live migration: no new boot) still says which address it sees.
MAC = "kubenova-mac"
MAC_EVERY = 10
WROTE = "kubenova-wrote"
#: "kubenova-filled <dev> <MiB>": the fill hook (kubenova.fill=<dev>) has written that many MiB of <dev>.
FILLED = "kubenova-filled"
#: "kubenova-spoofing eth0 <address>": the guest (kubenova.spoof=<address>) now sends with a MAC that is not
#: its own, as a hostile guest would; "kubenova-spoofed eth0" once it has sent for a while.
SPOOFING = "kubenova-spoofing"
SPOOFED = "kubenova-spoofed"
#: "kubenova-size cpus=N memtotal-kib=M": what the guest's kernel sees (a resize shows here).
SIZE = "kubenova-size"
#: "kubenova-dirty <MiB>": the guest (kubenova.dirty=<MiB>) has filled that much memory and now rewrites it
#: without end, as a busy database would.
DIRTY = "kubenova-dirty"
KERNEL = "kubenova-test-vmlinuz"
INITRD = "kubenova-test-initrd.img"
DISK_IMAGE = "kubenova-test-disk.qcow2"
RESCUE_IMAGE = "kubenova-rescue-disk.qcow2"
CMDLINE = "console=ttyS0 quiet panic=-1"
RESCUE_CMDLINE = f"{CMDLINE} kubenova.role=rescue"
GUEST_ADDRESS = "169.254.10.2/16"
PEER_ADDRESS = "169.254.10.1"
# virtio for disks and NICs, SCSI and IDE so sd*/sr* disks and CD-ROM config drives show
# up too, isofs for config drives; their dependencies are resolved from modules.dep.
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "virtio_scsi", "sd_mod", "ata_piix", "sr_mod", "isofs")
DISK_IMAGE_MIB = 48
APT_LISTS = pathlib.Path("/var/lib/apt/lists")
BUSYBOX = pathlib.Path("/bin/busybox")

INIT = f"""#!/bin/busybox sh
# The kubenova test guest. Every line on stdout goes to the serial console (ttyS0).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for module in $(cat /lib/modules/order); do
  insmod "/lib/modules/$module.ko"
done

role=guest
write_dev=
write_pattern=
fill_dev=
spoof_mac=
dirty_mib=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    kubenova.role=rescue) role=rescue ;;
    kubenova.spoof=*) spoof_mac=${{arg#kubenova.spoof=}} ;;
    kubenova.dirty=*) dirty_mib=${{arg#kubenova.dirty=}} ;;
    kubenova.fill=*) fill_dev=${{arg#kubenova.fill=}} ;;
    kubenova.write=*:*)
      spec=${{arg#kubenova.write=}}
      write_dev=${{spec%%:*}}
      write_pattern=${{spec#*:}} ;;
  esac
done
case "$write_dev" in ''|*[!a-z0-9]*) write_dev= ;; esac
case "$write_pattern" in ''|*[!A-Za-z0-9-]*) write_dev= ;; esac
case "$spoof_mac" in ''|*[!0-9a-f:]*) spoof_mac= ;; esac
case "$dirty_mib" in ''|*[!0-9]*) dirty_mib= ;; esac
case "$fill_dev" in ''|*[!a-z0-9]*) fill_dev= ;; esac

if [ "$role" = rescue ]; then
  echo "{RESCUE_MARKER} kernel=$(uname -r)"
else
  echo "{BOOT_MARKER} kernel=$(uname -r)"
fi
memtotal=$(awk '/^MemTotal/ {{print $2}}' /proc/meminfo)
echo "{SIZE} cpus=$(grep -c ^processor /proc/cpuinfo) memtotal-kib=$memtotal"

for dev in $(ls /sys/block | grep -E '^(vd|sd)' | sort); do
  head=$(od -A n -t x1 -N 16 -v "/dev/$dev" | tr -d ' \\n')
  echo "{DISK} $dev sectors=$(cat "/sys/block/$dev/size") head=$head"
done

# The config drive: an ISO9660 filesystem labelled cidata (NoCloud) or config-2 (OpenStack).
for dev in $(ls /sys/block | grep -E '^(vd|sd|sr)' | sort); do
  [ "$(dd if="/dev/$dev" bs=1 skip=32769 count=5 2>/dev/null)" = CD001 ] || continue
  label=$(dd if="/dev/$dev" bs=1 skip=32808 count=32 2>/dev/null | tr -d ' ')
  case "$label" in cidata|CIDATA|config-2|CONFIG-2) ;; *) continue ;; esac
  mkdir -p /mnt/config
  mount -t iso9660 -o ro "/dev/$dev" /mnt/config || continue
  cd /mnt/config
  find . -type f | sort | while read -r file; do
    echo "{CD_FILE} ${{file#./}} $(base64 -w 0 "$file")"
  done
  cd /
  umount /mnt/config
  break
done

ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
  ip link set eth0 up
  ip addr add {GUEST_ADDRESS} dev eth0
  echo "{NET} eth0 up"
  if [ -n "$spoof_mac" ]; then
    ping -c 3 -W 1 {PEER_ADDRESS} >/dev/null 2>&1
    ip link set eth0 down
    ip link set eth0 address "$spoof_mac"
    ip link set eth0 up
    echo "{SPOOFING} eth0 $spoof_mac"
    ping -c 5 -W 1 {PEER_ADDRESS} >/dev/null 2>&1
    echo "{SPOOFED} eth0"
  else
    ping -c 5 -W 1 {PEER_ADDRESS} >/dev/null 2>&1 &
  fi
fi

# Memory that never settles: a file on the initramfs's RAM filesystem, read and written back in place
# without end, so a live migration's pre-copy finds its pages dirty again at every pass. Random bytes, not
# zeros: QEMU sends a zero page as a few bytes however often it is written.
if [ -n "$dirty_mib" ]; then
  dd if=/dev/urandom of=/dirty-seed bs=1048576 count=1 2>/dev/null
  n=0
  while [ "$n" -lt "$dirty_mib" ]; do
    dd if=/dirty-seed of=/dirty bs=1048576 seek="$n" conv=notrunc 2>/dev/null
    n=$((n + 1))
  done
  rm -f /dirty-seed
  echo "{DIRTY} $dirty_mib"
  while true; do dd if=/dirty of=/dirty bs=1048576 conv=notrunc 2>/dev/null; done &
fi

# Hot-plugged disks appear later (PCI hotplug, devtmpfs makes the node): poll every tick.
written=
filled=0
i=0
while true; do
  # The fill hook: one more MiB of the disk every tick, straight to it (no page cache), until a write fails
  # at its end. A full host file system pauses the guest inside the write, which goes on once it runs again.
  if [ -n "$fill_dev" ] && [ -b "/dev/$fill_dev" ]; then
    if tr '\\000' K </dev/zero \\
        | dd of="/dev/$fill_dev" bs=1M count=1 seek=$filled iflag=fullblock oflag=direct 2>/dev/null; then
      filled=$((filled + 1))
      echo "{FILLED} $fill_dev $filled"
    else
      fill_dev=
    fi
  fi
  if [ -n "$write_dev" ] && [ -z "$written" ] && [ -b "/dev/$write_dev" ]; then
    printf '%s' "$write_pattern" | dd of="/dev/$write_dev" bs=512 conv=notrunc,fsync 2>/dev/null \\
      && sync && echo "{WROTE} $write_dev $write_pattern"
    written=1
  fi
  if [ -e /sys/class/net/eth0 ] && [ $((i % {MAC_EVERY})) = 0 ]; then
    echo "{MAC} eth0 $(cat /sys/class/net/eth0/address)"
  fi
  echo "{TICK} $i"
  i=$((i + 1))
  sleep 1
done
"""

_DEV = re.compile(r"[a-z0-9]+")
_PATTERN = re.compile(r"[A-Za-z0-9-]+")


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


def dirty_hook(mib: int) -> str:
    """The cmdline argument that makes the guest fill ``mib`` MiB of its memory and rewrite them without
    end (it prints ``DIRTY`` once it has begun). It must fit the guest's RAM filesystem, half its memory."""
    if not 1 <= mib <= 4096:
        raise ValueError(f"kubenova.dirty needs 1 to 4096 MiB, not {mib}")
    return f"kubenova.dirty={mib}"


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
        (root / "init").write_text(INIT)
        (root / "init").chmod(0o755)
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
    package, the module list, /init, busybox or the boot loader config builds afresh.
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
    initrd_key = _digest(kernel_dir.name, INIT, BUSYBOX.read_bytes())
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
