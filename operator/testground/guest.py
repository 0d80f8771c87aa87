"""The test guest: Debian's cloud kernel booted directly with a busybox initramfs of our own."""
from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

from kubenova.testground import procs
from kubenova.testground.procs import Layout, TestGroundError

BOOT_MARKER = "KUBENOVA-GUEST-BOOTED"
TICK = "kubenova-guest-tick"
KERNEL = "kubenova-test-vmlinuz"
INITRD = "kubenova-test-initrd.img"
CMDLINE = "console=ttyS0 quiet panic=-1"

INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "{BOOT_MARKER} kernel=$(uname -r)"
i=0
while true; do
  echo "{TICK} $i"
  i=$((i + 1))
  sleep 1
done
"""


def _kernel_package() -> str:
    """The versioned package behind Debian's cloud-kernel meta package."""
    out = procs.run(["apt-cache", "depends", "linux-image-cloud-amd64"], "finding Debian's cloud kernel",
                    "run 'apt-get update' first").stdout
    for line in out.splitlines():
        name = line.strip().removeprefix("Depends: ")
        if name.startswith("linux-image-") and name.endswith("-cloud-amd64") and name != "linux-image-cloud-amd64":
            return name
    raise TestGroundError("apt-cache names no linux-image-*-cloud-amd64 package; run 'apt-get update'")


def _build_kernel(dest: pathlib.Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        package = _kernel_package()
        procs.run(["apt-get", "download", package], f"downloading {package}",
                  "check that Debian's package mirror is reachable", cwd=tmp)
        deb = next(pathlib.Path(tmp).glob("*.deb"))
        procs.run(["dpkg-deb", "-x", str(deb), f"{tmp}/root"], f"unpacking {deb.name}", "check free disk space")
        vmlinuz = next(pathlib.Path(tmp, "root", "boot").glob("vmlinuz-*"))
        shutil.copyfile(vmlinuz, dest)


def _build_initrd(dest: pathlib.Path) -> None:
    busybox = pathlib.Path("/bin/busybox")
    if not busybox.exists():
        raise TestGroundError("/bin/busybox is missing; apt-get install busybox-static")
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        for d in ("bin", "proc", "sys", "dev"):
            (root / d).mkdir()
        shutil.copy2(busybox, root / "bin" / "busybox")
        (root / "init").write_text(INIT)
        (root / "init").chmod(0o755)
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        if shutil.which("cpio") is None:
            raise TestGroundError("cpio is missing; apt-get install cpio")
        archive = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=tmp, check=True,
                                 capture_output=True, input=("\n".join(files) + "\n").encode()).stdout
    dest.write_bytes(gzip.compress(archive, mtime=0))


def ensure_images(layout: Layout, image_store: pathlib.Path) -> None:
    """Build (or take from the cache) the kernel and initramfs, then place them in the image store."""
    key = hashlib.sha256(INIT.encode()).hexdigest()[:12]
    cache = layout.cache / "guest"
    cache.mkdir(parents=True, exist_ok=True)
    kernel, initrd = cache / KERNEL, cache / f"initrd-{key}.img"
    if not kernel.exists():
        _build_kernel(kernel.with_suffix(".tmp"))
        kernel.with_suffix(".tmp").rename(kernel)
    if not initrd.exists():
        _build_initrd(initrd.with_suffix(".tmp"))
        initrd.with_suffix(".tmp").rename(initrd)
    image_store.mkdir(parents=True, exist_ok=True)
    for src, name in ((kernel, KERNEL), (initrd, INITRD)):
        dst = image_store / name
        if dst.exists() and os.path.samefile(src, dst):
            continue
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)

