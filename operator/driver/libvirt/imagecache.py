"""Base images shared by instances, each instance's copy-on-write overlays, and all qemu-img work on disks.

A base is the image-store file, checked against its checksum once and hard-linked into
the cache under its sha256, so instances never depend on a store file a person may
replace or delete, and a base is stored once however many instances use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

from kubenova.driver.base import (
    DriverError,
    ImageChecksumMismatch,
    ImageNotFound,
    ImageRef,
    InvalidInstanceSpec,
)
from kubenova.driver.images import ImageStore
from kubenova.driver.imports import DEFAULT_MAX_BYTES, Importer


def qemu_img(*args: str) -> str:
    """Run qemu-img; its message becomes a DriverError."""
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DriverError(f"qemu-img {args[0]} failed: {proc.stderr.strip()}")
    return proc.stdout


def info(path: str | os.PathLike[str], force_share: bool = False) -> dict[str, Any]:
    """qemu-img info as JSON (format, virtual-size, backing-filename...); ``force_share`` reads an image a
    running guest holds open."""
    args = ["info", *(["-U"] if force_share else []), "--output=json", str(path)]
    result: dict[str, Any] = json.loads(qemu_img(*args))
    return result


def virtual_size(path: str | os.PathLike[str], force_share: bool = False) -> int:
    """The size the guest sees, in bytes."""
    return int(info(path, force_share)["virtual-size"])


def backing_file(path: str | os.PathLike[str]) -> str | None:
    """The base an overlay reads through, None for none (or an unreadable file)."""
    try:
        return info(path, force_share=True).get("backing-filename") or None
    except DriverError:
        return None


def create_empty(path: str | os.PathLike[str], size: str) -> None:
    """An empty qcow2 disk of ``size`` (qemu-img's notation: "10G", "64M", bytes)."""
    qemu_img("create", "-q", "-f", "qcow2", str(path), size)


def make_raw(dest: pathlib.Path, size: int, base: pathlib.Path | None) -> None:
    """A raw disk of ``size`` bytes at ``dest``, complete or absent (written under another name, then
    renamed): the image's bytes when ``base`` is given, grown to ``size``, else empty; sparse either way.
    Refused, naming the field, when the image needs more than ``size``."""
    part = dest.with_name(f".{dest.name}.part")
    part.unlink(missing_ok=True)
    if base is not None:
        needed = virtual_size(base)
        if needed > size:
            raise InvalidInstanceSpec(
                "spec.rootDisk.persistentVolumeClaim",
                f"image {base.name} needs a disk of {-(-needed // 2**20)} MiB, and the claim gives "
                f"{size // 2**20} MiB (its capacity less what its file system keeps); use a larger claim",
            )
        qemu_img("convert", "-q", "-O", "raw", str(base), str(part))
    with open(part, "ab") as f:
        f.truncate(size)
        os.fsync(f.fileno())
    os.rename(part, dest)


def resize(path: str | os.PathLike[str], size: str) -> None:
    """Grow a disk no guest runs on (a running guest's grows through the guest's blockResize)."""
    qemu_img("resize", "-q", str(path), size)


def rebase(overlay: str | os.PathLike[str], base: str | os.PathLike[str]) -> None:
    """Point an overlay at another copy of the same base (an unsafe rebase: no data is read or written)."""
    qemu_img("rebase", "-u", "-b", str(base), "-F", info(base)["format"], str(overlay))


def convert(source: pathlib.Path, dest: pathlib.Path, progress: Callable[[int], None] | None = None) -> None:
    """A standalone qcow2 copy of ``source`` (backing chain flattened), telling its progress in percent."""
    proc = subprocess.Popen(
        ["qemu-img", "convert", "-U", "-p", "-O", "qcow2", str(source), str(dest)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout = proc.stdout
    assert stdout is not None
    for chunk in iter(lambda: stdout.read(32), ""):
        for percent in re.findall(r"\((\d+)\.\d+/100%\)", chunk):
            if progress:
                progress(int(percent))
    if proc.wait() != 0:
        raise DriverError(f"qemu-img convert failed: {proc.stderr.read().strip() if proc.stderr else ''}")


class ImageCache:
    def __init__(
        self, store: ImageStore, cache_dir: str | os.PathLike[str], importer: Importer | None = None
    ) -> None:
        """``importer`` brings images in by url or from a registry into ``cache_dir`` (none: it makes one
        with the default limits)."""
        self.store = store
        self.dir = pathlib.Path(cache_dir)
        self.importer = importer or Importer(self.dir, DEFAULT_MAX_BYTES)
        self._digests: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def _sha256(self, path: str) -> str:
        stat = os.stat(path)
        key = (path, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._digests:
                return self._digests[key]
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        with self._lock:
            self._digests[key] = digest.hexdigest()
        return digest.hexdigest()

    def base(self, image: ImageRef, field: str) -> pathlib.Path:
        """The cached base for an image, verified against its checksum when one is given."""
        if image.imported:
            found = self.importer.cached(image)
            if found is None:
                raise ImageNotFound(field, f"{image.source} is not in the image cache {self.dir} yet")
            return found
        source = self.store.find(field, image)
        digest = self._sha256(source)
        if image.checksum and image.checksum != f"sha256:{digest}":
            raise ImageChecksumMismatch(
                field.rsplit(".", 1)[0] + ".checksum",
                f"image {image.name!r} has sha256:{digest}, the spec expects {image.checksum}",
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        cached = self.dir / digest
        if not cached.exists():
            tmp = self.dir / f".{digest}.{os.getpid()}"
            try:
                os.link(source, tmp)
            except OSError:
                shutil.copyfile(source, tmp)
            os.replace(tmp, cached)
        os.utime(cached)  # last use, for manage()
        return cached

    @staticmethod
    def overlay(base: pathlib.Path, path: pathlib.Path, size_gib: int | None = None) -> None:
        """A qcow2 overlay of ``base``, grown to ``size_gib`` (never shrunk)."""
        base_info = info(base)
        args = ["create", "-q", "-f", "qcow2", "-b", str(base), "-F", base_info["format"], str(path)]
        if size_gib:
            args.append(str(max(int(base_info["virtual-size"]), size_gib * 2**30)))
        qemu_img(*args)

    def manage(self, in_use: Collection[str], grace_seconds: float) -> list[str]:
        """Remove cached bases that no instance uses and that were not used within the grace period."""
        removed = []
        now = time.time()
        for entry in self.dir.glob("*") if self.dir.exists() else []:
            if entry.name.startswith(".") or entry.name in in_use:
                continue
            if now - entry.stat().st_mtime > grace_seconds:
                entry.unlink(missing_ok=True)
                removed.append(entry.name)
        return removed
