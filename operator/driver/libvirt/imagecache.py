"""Base images shared by instances, and each instance's copy-on-write overlays.

A base is the image-store file, checked against its checksum once and hard-linked into
the cache under its sha256, so instances never depend on a store file a person may
replace or delete, and a base is stored once however many instances use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import threading
import time
from collections.abc import Collection

from kubenova.driver.base import DriverError, ImageChecksumMismatch, ImageRef
from kubenova.driver.images import ImageStore


def qemu_img(*args: str) -> str:
    """Run qemu-img; its message becomes a DriverError."""
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DriverError(f"qemu-img {args[0]} failed: {proc.stderr.strip()}")
    return proc.stdout


class ImageCache:
    def __init__(self, store: ImageStore, cache_dir: str | os.PathLike[str]) -> None:
        self.store = store
        self.dir = pathlib.Path(cache_dir)
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
        source = self.store.resolve(field, image.name)
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
        info = json.loads(qemu_img("info", "--output=json", str(base)))
        args = ["create", "-q", "-f", "qcow2", "-b", str(base), "-F", info["format"], str(path)]
        if size_gib:
            args.append(str(max(int(info["virtual-size"]), size_gib * 2**30)))
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
