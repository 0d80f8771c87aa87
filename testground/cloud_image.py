"""A real cloud guest for the test ground: Debian 12 with cloud-init, the QEMU guest agent and sshd.

The busybox guest (guest.py) shows what a driver did to a VM; this image shows that a real distribution
boots from what kubenova gives a VM and acts on it: cloud-init reads the NoCloud config drive, qemu-ga
answers on the org.qemu.guest_agent.0 port, sshd lets the key from user-data in. Built once per digest of
its inputs with mmdebstrap from the host's own apt sources, kept in the cache as a compressed qcow2 that
boots by BIOS on its own: an MBR disk with a FAT partition (syslinux, the cloud kernel and its initramfs)
and an ext4 root, made from plain files (sfdisk, mkfs.vfat --offset, mtools, syslinux --offset,
mkfs.ext4 -d -E offset): no loop devices, no mounts. Under TCG it takes 30 to 45 s to reach ssh: keep it
to the tests that need it. ``python -m testground.cloud_image [--check]`` builds it (and checks it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator

from kubenova.handlers.agent.claims import mount_points
from testground import procs
from testground.guest import APT_LISTS, _cached, _digest, _syslinux_cfg
from testground.procs import Layout, TestGroundError

#: The name the image gets in image stores.
CLOUD_IMAGE = "kubenova-debian-12-cloud.qcow2"
SUITE = "bookworm"
BUILD_STEPS = 1  # part of the cache key: bump it when a build step changes (the key holds only its inputs)
#: cloud-init's default user on Debian (system_info.default_user in /etc/cloud/cloud.cfg).
DEFAULT_USER = "debian"
#: Serial console lines the image's own units print (to /dev/console, which is ttyS0), in the order they come:
#: systemd runs from the mounted root disk ("KUBENOVA-CLOUD-BOOTED kernel=<release>"); qemu-ga holds its
#: port open; cloud-init's last stage has ended ("... ok|errors datasource=<what it used>"; only with a
#: config drive). sshd and the serial getty ("login:") come between the last two.
BOOTED = "KUBENOVA-CLOUD-BOOTED"
AGENT_UP = "KUBENOVA-GUEST-AGENT-UP"
CLOUD_INIT_DONE = "KUBENOVA-CLOUD-INIT-DONE"
# minbase plus: the init system, device events (they start qemu-ga when its port appears), cloud-init and
# what its modules call (growpart, sudo for the default user, ip for the networkd renderer), resolved (so the
# nameservers of a network config are used), sshd, the kernel.
PACKAGES = (
    "systemd-sysv udev cloud-init cloud-guest-utils sudo iproute2 netbase systemd-resolved qemu-guest-agent"
    " openssh-server linux-image-cloud-amd64"
).split()
# What a short-lived test VM never needs at boot (or ever): each costs seconds under TCG or wakes up later.
# getty-static starts gettys on tty2-6 where logind is missing (it is: no D-Bus).
MASKED = (
    "apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer e2scrub_reap.service"
    " fstrim.timer man-db.timer systemd-pstore.service getty-static.service cloud-config.service"
).split()
# The initramfs only has to find the root disk: kubenova's root disk is virtio (or virtio-scsi); ext4 is built
# in. Each module here is loaded at every boot (ata_piix alone probes the IDE ports for a second).
INITRD_MODULES = ("virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod")
EXCLUDED_PATHS = ("/usr/share/man/*", "/usr/share/info/*", "/usr/share/doc/*", "/usr/share/locale/*")
KEPT_PATHS = ("/usr/share/doc/*/copyright", "/usr/share/locale/locale.alias")
DISK_MIB = 1024  # small: kubenova grows a root disk to the spec's size, and cloud-init grows the partition
BOOT_MIB = 48
ROOT_UUID = "6b6e7630-636c-6f75-6400-000000000001"
CMDLINE = f"root=UUID={ROOT_UUID} ro console=ttyS0,115200 net.ifnames=0"
SOURCES = (pathlib.Path("/etc/apt/sources.list"), pathlib.Path("/etc/apt/sources.list.d"))
MBR = pathlib.Path("/usr/lib/syslinux/mbr/mbr.bin")
FIX = "run hack/install-deps.sh (Debian packages mmdebstrap fdisk dosfstools mtools syslinux syslinux-common)"

_CLOUD_CFG = """\
# kubenova's test image: look only for the config drives kubenova attaches (ds-identify wants one line).
datasource_list: [ NoCloud, ConfigDrive, None ]
system_info:
  network:
    # cloud-init 22.4 tries eni (ifupdown) first; systemd-networkd comes with systemd and starts faster.
    renderers: [ networkd ]
# Under TCG an RSA host key takes seconds to make, and printing fingerprints to the console more: skip both.
ssh_genkeytypes: [ ed25519, ecdsa ]
ssh:
  emit_keys_to_console: false
# There is no GRUB (syslinux boots the image).
grub_dpkg:
  enabled: false
"""
# Markers go to /dev/console (ttyS0 here), from a script file: systemd would expand "$" in ExecStart itself.
_HELPER = f"""\
#!/bin/sh
# kubenova test image: one line on the serial console per milestone, for tests that read it.
case "$1" in
  host-keys)
    # Without cloud-init (no config drive) nothing else makes sshd's keys: the image ships none.
    for type in ed25519 ecdsa; do
      key=/etc/ssh/ssh_host_${{type}}_key
      [ -s "$key" ] || ssh-keygen -q -t "$type" -N "" -f "$key"
    done
    exit 0 ;;
  booted) echo "{BOOTED} kernel=$(uname -r)" ;;
  cloud-init-done)
    result=/run/cloud-init/result.json
    if grep -qs '"errors": \\[\\]' "$result"; then status=ok; else status=errors; fi
    ds=$(sed -n 's/.*"datasource": "\\([^"]*\\)".*/\\1/p' "$result")
    echo "{CLOUD_INIT_DONE} $status datasource=$ds" ;;
  agent-up)
    # qemu-ga is Type=simple: say so once it holds the port open (at once, in practice; at most 5 s).
    port=$(readlink -f /dev/virtio-ports/org.qemu.guest_agent.0)
    for _ in $(seq 50); do
      if ls -l "/proc/$2/fd" 2>/dev/null | grep -q -- "$port"; then echo "{AGENT_UP}"; break; fi
      sleep 0.1
    done ;;
esac >/dev/console
"""
_MARK = "/bin/sh /usr/local/lib/kubenova/guest-helper"
_BOOTED_UNIT = f"""\
[Unit]
Description=kubenova: tell the serial console that the system runs from its disk
DefaultDependencies=no
After=local-fs.target

[Service]
Type=oneshot
ExecStart={_MARK} booted

[Install]
WantedBy=sysinit.target
"""
_CLOUD_INIT_DONE_UNIT = f"""\
[Unit]
Description=kubenova: tell the serial console that cloud-init has finished, and how
After=cloud-final.service

[Service]
Type=oneshot
ExecStart={_MARK} cloud-init-done

[Install]
WantedBy=cloud-init.target
"""
# The agent starts as soon as its port appears, not after sysinit.target (which waits for cloud-init's network
# stage): it needs nothing but /run and the port, and the driver may want it while cloud-init still works.
_AGENT_DROPIN = f"""\
[Unit]
DefaultDependencies=no
After=local-fs.target
Conflicts=shutdown.target
Before=shutdown.target

[Service]
ExecStartPost={_MARK} agent-up $MAINPID
"""
# Keys first: Debian's own check (sshd -t) fails without any.
_SSH_DROPIN = f"""\
[Service]
ExecStartPre=
ExecStartPre={_MARK} host-keys
ExecStartPre=/usr/sbin/sshd -t
"""
_SSHD_CONFIG = "HostKey /etc/ssh/ssh_host_ed25519_key\nHostKey /etc/ssh/ssh_host_ecdsa_key\n"
# cloud-init's init stage waits for network-online; one configured link is enough, and never two minutes
# (a DHCP config on a network without a DHCP server, as cloud-init's fallback config, ends there).
_WAIT_ONLINE_DROPIN = """\
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=10
"""
# networkd marks a link with only static addresses "configured" (what wait-online waits for) once IPv6 router
# discovery is done too, which never happens where no router advertises (kubenova's test networks): unless
# the link may be configured without carrier. cloud-init names its files after the interface (net.ifnames=0).
_NETWORK_DROPIN = "[Network]\nConfigureWithoutCarrier=yes\n"
NETWORK_DROPINS = tuple(f"etc/systemd/network/10-cloud-init-eth{i}.network.d/kubenova.conf" for i in range(4))
_CUSTOMIZE = f"""\
#!/bin/sh
# mmdebstrap's customize hook: $1 is the finished root tree.
set -eu
root=$1
chroot "$root" systemctl enable -q systemd-networkd.service kubenova-booted.service \\
  kubenova-cloud-init-done.service
chroot "$root" systemctl mask -q {" ".join(MASKED)}
# Each instance gets its own host keys (cloud-init's ssh module), hostname and resolver, not the host's.
rm -f "$root"/etc/ssh/ssh_host_*
# Each cloud-init stage is a Python start of its own, 3 to 5 s under TCG: the config stage's modules run first
# in the final stage instead (Debian's lists, in their order), and cloud-config.service is masked.
chroot "$root" python3 -c 'import yaml
cfg = yaml.safe_load(open("/etc/cloud/cloud.cfg"))
final = cfg["cloud_config_modules"] + cfg["cloud_final_modules"]
stages = {{"cloud_config_modules": [], "cloud_final_modules": final}}
open("/etc/cloud/cloud.cfg.d/91_kubenova_stages.cfg", "w").write(yaml.safe_dump(stages))'
echo localhost >"$root/etc/hostname" && chmod 644 "$root/etc/hostname"  # mmdebstrap copied the host's
rm -f "$root"/etc/.resolv.conf.*.bak
[ -L "$root/etc/resolv.conf" ] || : >"$root/etc/resolv.conf"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log
"""


def _overlay() -> dict[str, str]:
    """Files laid into the tree before any package is installed, so the kernel's postinst already builds the
    small initramfs and no later step has to redo it."""
    return {
        # No fsck at boot (1 to 2 s under TCG): the journal recovers an image that was stopped hard.
        "etc/fstab": f"UUID={ROOT_UUID} / ext4 defaults,errors=remount-ro 0 0\n",
        "etc/hosts": "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
        # C.UTF-8 needs no locale-gen, so cloud-init's locale module has nothing to do.
        "etc/default/locale": "LANG=C.UTF-8\n",
        "etc/cloud/cloud.cfg.d/90_kubenova.cfg": _CLOUD_CFG,
        "etc/initramfs-tools/conf.d/kubenova.conf": "MODULES=list\n",
        "usr/share/initramfs-tools/modules.d/kubenova": "".join(f"{m}\n" for m in INITRD_MODULES),
        "usr/local/lib/kubenova/guest-helper": _HELPER,
        "etc/ssh/sshd_config.d/kubenova.conf": _SSHD_CONFIG,
        "etc/systemd/system/ssh.service.d/kubenova.conf": _SSH_DROPIN,
        "etc/systemd/system/kubenova-booted.service": _BOOTED_UNIT,
        "etc/systemd/system/kubenova-cloud-init-done.service": _CLOUD_INIT_DONE_UNIT,
        "etc/systemd/system/qemu-guest-agent.service.d/kubenova.conf": _AGENT_DROPIN,
        "etc/systemd/system/systemd-networkd-wait-online.service.d/kubenova.conf": _WAIT_ONLINE_DROPIN,
        **{name: _NETWORK_DROPIN for name in NETWORK_DROPINS},
    }


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The disk's layout in 512-byte sectors: a FAT boot partition at 1 MiB, the ext4 root after it to the end
    (last, so growpart can grow it)."""

    boot_start: int
    boot_sectors: int
    root_start: int
    root_sectors: int

    @classmethod
    def of(cls, disk_mib: int, boot_mib: int) -> Geometry:
        if not 0 < boot_mib < disk_mib - 1:
            raise ValueError(f"a {boot_mib} MiB boot partition does not fit a {disk_mib} MiB disk")
        boot_start, boot_sectors = 2048, boot_mib * 2048
        root_start = boot_start + boot_sectors
        return cls(boot_start, boot_sectors, root_start, disk_mib * 2048 - root_start)

    def sfdisk_script(self) -> str:
        """MBR (SeaBIOS boots it; GPT would need a BIOS boot partition), FAT16 LBA marked active, Linux."""
        return (
            "label: dos\nlabel-id: 0x6b6e7630\nunit: sectors\n\n"
            f"start={self.boot_start}, size={self.boot_sectors}, type=e, bootable\n"
            f"start={self.root_start}, size={self.root_sectors}, type=83\n"
        )


def apt_sources(paths: tuple[pathlib.Path, ...] = SOURCES) -> str:
    """The host's apt sources for SUITE and its -updates/-security, as one deb822 file for mmdebstrap.

    Read from /etc/apt (one-line and deb822 files) so the image comes from the mirror this machine is set
    up for; third-party repositories (other suites) are left out.
    """
    entries: list[dict[str, str]] = []
    for path in _source_files(paths):
        text = path.read_text()
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(
                    (k.strip(), v.strip())
                    for k, _, v in (line.partition(":") for line in stanza.splitlines())
                    if k.strip() and not k.startswith(("#", " ", "\t"))
                )
                if fields.get("Enabled", "yes").lower() != "no" and "deb" in fields.get("Types", "").split():
                    entries.append(fields)
        else:
            for line in text.splitlines():
                found = re.match(r"\s*deb\s+(?:\[([^]]*)\]\s+)?(\S+)\s+(\S+)\s*(.*)", line.split("#")[0])
                if found:
                    opts = dict(o.partition("=")[::2] for o in (found[1] or "").split())
                    fields = {"URIs": found[2], "Suites": found[3], "Components": found[4]}
                    if "signed-by" in opts:
                        fields["Signed-By"] = opts["signed-by"]
                    entries.append(fields)
    stanzas = []
    for fields in entries:
        suites = [s for s in fields.get("Suites", "").split() if s == SUITE or s.startswith(f"{SUITE}-")]
        if suites and fields.get("URIs"):
            stanza = f"Types: deb\nURIs: {fields['URIs']}\nSuites: {' '.join(suites)}\n"
            stanza += f"Components: {fields.get('Components') or 'main'}\n"
            if fields.get("Signed-By"):
                stanza += f"Signed-By: {fields['Signed-By']}\n"
            stanzas.append(stanza)
    if not stanzas:
        raise TestGroundError(f"no apt source for Debian {SUITE} in /etc/apt; add the Debian mirror there")
    return "\n".join(stanzas)


def _source_files(paths: tuple[pathlib.Path, ...]) -> Iterator[pathlib.Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.iterdir() if p.suffix in (".list", ".sources") and p.is_file())
        elif path.is_file():
            yield path


def _inputs() -> list[str]:
    """Everything the image is built from, for its cache key: a change to any of it builds afresh.

    The host's package lists stand for the archive's state (as for guest.py's kernel): after an
    'apt-get update' that brings newer packages, the next run builds with them.
    """
    lists = sorted(APT_LISTS.glob("*_Packages*"))
    mmdebstrap = subprocess.run(["mmdebstrap", "--version"], capture_output=True, text=True).stdout.strip()
    fixed = [
        f"{BUILD_STEPS} {SUITE} {DISK_MIB} {BOOT_MIB}",
        apt_sources(),
        _CUSTOMIZE,
        _syslinux_cfg(CMDLINE),
    ]
    files = [f"{name}\0{text}" for name, text in sorted(_overlay().items())]
    lists_state = [f"{p.name} {p.stat().st_mtime_ns}" for p in lists]
    return [*fixed, *files, *PACKAGES, *MASKED, *EXCLUDED_PATHS, *KEPT_PATHS, mmdebstrap, *lists_state]


def ensure_cloud_image(layout: Layout) -> pathlib.Path:
    """The cached image (built on first use: about a minute); never write to it, boot an overlay of it."""
    for tool in ("mmdebstrap", "sfdisk", "mkfs.vfat", "mcopy", "syslinux", "mkfs.ext4", "qemu-img"):
        if shutil.which(tool) is None:
            raise TestGroundError(f"{tool} is missing; {FIX}")
    cache = layout.cache / "cloud"
    cache.mkdir(parents=True, exist_ok=True)
    image = cache / f"{CLOUD_IMAGE.removesuffix('.qcow2')}-{_digest(*_inputs())}.qcow2"
    if not image.exists() and os.geteuid() != 0:
        raise TestGroundError("building the cloud image needs root (mmdebstrap --mode=root); run as root")
    if not image.exists() and not MBR.exists():
        raise TestGroundError(f"{MBR} is missing; apt-get install syslinux-common")
    return _cached(image, _build)


def cloud_image_digest(layout: Layout) -> str:
    """``sha256:<hex>`` of the image file (what an image store's checksum is), remembered beside the image."""
    image = ensure_cloud_image(layout)

    def compute(dest: pathlib.Path) -> None:
        digest = hashlib.sha256()
        with image.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        dest.write_text(f"sha256:{digest.hexdigest()}\n")

    return _cached(image.with_name(image.name + ".sha256"), compute).read_text().strip()


def _build(dest: pathlib.Path) -> None:
    # Beside _cached's folder, not in it: only _remove may delete the tree mmdebstrap mounted things in.
    work = pathlib.Path(tempfile.mkdtemp(dir=dest.parent.parent, prefix=".build."))
    try:
        rootfs, boot = work / "rootfs", work / "boot"
        _build_rootfs(work, rootfs)
        boot.mkdir()
        # The FAT partition boots the kernel; copies in the root's /boot would only take space.
        for pattern, name in (("vmlinuz-*", "vmlinuz"), ("initrd.img-*", "initrd.img")):
            found = sorted((rootfs / "boot").glob(pattern))
            if len(found) != 1:
                raise TestGroundError(f"expected one {pattern} in the image's /boot, found {len(found)}")
            shutil.move(found[0], boot / name)
        (boot / "syslinux.cfg").write_text(_syslinux_cfg(CMDLINE))
        raw = work / "disk.raw"
        _make_disk(raw, rootfs, boot, Geometry.of(DISK_MIB, BOOT_MIB))
        procs.run(
            ["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", str(raw), str(dest)],
            "converting the cloud image to qcow2",
            FIX,
        )
    finally:
        _remove(work)


def _remove(work: pathlib.Path) -> None:
    """Delete a build folder, unless something is still mounted in it: mmdebstrap binds host /dev nodes,
    /proc and /sys into the tree while it runs, and one that was killed may leave them there."""
    if any(m == str(work) or m.startswith(f"{work}/") for m in mount_points()):
        raise TestGroundError(
            f"{work} still has mounts (a killed mmdebstrap's): umount -R them, then delete it"
        )
    shutil.rmtree(work, ignore_errors=True)


def _build_rootfs(work: pathlib.Path, rootfs: pathlib.Path) -> None:
    """Debian SUITE with PACKAGES (no recommends, no docs, man pages or translations) and our overlay."""
    overlay = work / "overlay"
    for name, text in _overlay().items():
        (overlay / name).parent.mkdir(parents=True, exist_ok=True)
        (overlay / name).write_text(text)
    sources = work / "debian.sources"
    sources.write_text(apt_sources())
    customize = work / "customize.sh"
    customize.write_text(_CUSTOMIZE)
    customize.chmod(customize.stat().st_mode | stat.S_IXUSR)
    argv = [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        # /bin etc. as symlinks from the start: otherwise usrmerge (and all of perl) gets installed to do it.
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        "--include=" + ",".join(PACKAGES),
        *(f"--dpkgopt=path-exclude={p}" for p in EXCLUDED_PATHS),
        *(f"--dpkgopt=path-include={p}" for p in KEPT_PATHS),
        f'--setup-hook=cp -a {overlay}/. "$1"/',
        f"--customize-hook={customize}",
        SUITE,
        str(rootfs),
        str(sources),
    ]
    procs.run(argv, "building the cloud image's root tree with mmdebstrap", "check the apt sources; " + FIX)


def _make_disk(raw: pathlib.Path, rootfs: pathlib.Path, boot: pathlib.Path, geo: Geometry) -> None:
    """Partition a sparse file and fill both partitions in place, each tool told its partition's offset."""
    with raw.open("wb") as f:
        f.truncate(DISK_MIB << 20)
    procs.run(["sfdisk", "-q", str(raw)], "partitioning the cloud image", FIX, input=geo.sfdisk_script())
    boot_offset = geo.boot_start * 512
    procs.run(
        ["mkfs.vfat", "-F", "16", "-n", "KNBOOT", "-h", str(geo.boot_start), "--offset", str(geo.boot_start)]
        + [str(raw), str(geo.boot_sectors // 2)],
        "making the cloud image's boot filesystem",
        FIX,
    )
    files = [str(p) for p in sorted(boot.iterdir())]
    procs.run(["mcopy", "-i", f"{raw}@@{boot_offset}", *files, "::"], "filling the boot partition", FIX)
    procs.run(["syslinux", "--offset", str(boot_offset), "--install", str(raw)], "installing syslinux", FIX)
    with raw.open("r+b") as f:  # boot code only (440 bytes): the partition table after it stays
        f.write(MBR.read_bytes()[:440])
    procs.run(
        ["mkfs.ext4", "-q", "-F", "-L", "root", "-U", ROOT_UUID, "-d", str(rootfs)]
        + ["-E", f"offset={geo.root_start * 512}", str(raw), f"{geo.root_sectors // 2}k"],
        "making the cloud image's root filesystem",
        FIX,
    )


def main(argv: list[str]) -> int:
    """Build (or find) the image and print where it is and its digest; ``--check`` also boots it."""
    layout = Layout.default()
    try:
        image = ensure_cloud_image(layout)
        print(f"{image} {cloud_image_digest(layout)}")
        if "--check" in argv:
            from testground import cloud_check

            cloud_check.main(layout, image)
    except TestGroundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
