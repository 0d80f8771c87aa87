"""KubeVirt's containerDisk: a container image one of whose layers holds the disk at ``disk/<name>``.

A pull streams the layer through ``tarfile``'s stream mode (gzip or plain, told apart by its first
bytes) straight into the partial file: the layer is never stored, and its digest is checked on the
same bytes as they pass. The disk file gets its name from the sha256 of its own bytes, the cache's
convention. A push writes the same layout (one uncompressed layer with ``disk/disk.qcow2``, readable
by QEMU's user 107 as KubeVirt asks), generated as it is uploaded, so a disk is read once.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tarfile
from collections.abc import Iterator
from typing import Any

import urllib3
from urllib3.exceptions import HTTPError

from kubenova.driver.errors import (
    DriverError,
    ImageDigestMismatch,
    ImageImportError,
    ImageInvalid,
    ImageSourceUnavailable,
)
from kubenova.driver.oci import INDEXES, OCI_MANIFEST, Reference, Registry
from kubenova.driver.transfer import Progress, connection_error, too_large

CHUNK = 1 << 20
#: Room for the tar headers around a disk in an uncompressed layer.
TAR_SLACK = 1 << 20
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
#: QEMU's user and group in KubeVirt's virt-launcher, who must be able to read the disk.
QEMU_ID = 107


def pull(registry: Registry, ref: Reference, part: pathlib.Path, max_bytes: int, progress: Progress) -> str:
    """Write the image's disk to ``part``; returns the disk's sha256 (hex). A failure that may pass is
    retried with the policy's backoff, from the start (a compressed layer cannot resume mid-way)."""
    attempt = 0
    while True:
        try:
            return _pull(registry, ref, part, max_bytes, progress)
        except ImageSourceUnavailable as exc:
            registry.http.policy.pause(attempt, exc)
            attempt += 1


def _pull(registry: Registry, ref: Reference, part: pathlib.Path, max_bytes: int, progress: Progress) -> str:
    assert ref.digest is not None
    media_type, manifest = registry.manifest(ref.digest)
    if media_type in INDEXES:
        media_type, manifest = registry.manifest(_linux_amd64(manifest, registry.field, ref))
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not all(_is_descriptor(layer) for layer in layers):
        raise ImageInvalid(registry.field, f"the manifest of {ref.digest} lists no valid layers")
    for layer in reversed(layers):  # the disk is usually added last
        if "zstd" in str(layer.get("mediaType")):
            raise ImageInvalid(
                registry.field,
                f"layer {layer['digest']} is zstd-compressed; push the image with gzip or plain layers",
            )
        if layer["size"] > max_bytes + TAR_SLACK:
            raise too_large(registry.field, f"layer {layer['digest']} is {layer['size']} bytes", max_bytes)
        found = _extract(registry, layer, part, max_bytes, progress)
        if found:
            return found
    raise ImageInvalid(
        registry.field,
        f"no layer of {ref.host}/{ref.repository}@{ref.digest} holds a file disk/<name>; build it as a "
        "KubeVirt containerDisk (the qcow2 or raw disk added under /disk/)",
    )


def _is_descriptor(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    return isinstance(value.get("digest"), str) and isinstance(value.get("size"), int)


def _linux_amd64(index: dict[str, Any], field: str, ref: Reference) -> str:
    """The digest of the index's linux/amd64 image."""
    entries = [m for m in index.get("manifests") or [] if isinstance(m, dict)]
    for entry in entries:
        platform = entry.get("platform") or {}
        if platform.get("os") == "linux" and platform.get("architecture") == "amd64":
            return str(entry.get("digest"))
    platforms = [m.get("platform") or {} for m in entries]
    listed = sorted(f"{p.get('os')}/{p.get('architecture')}" for p in platforms)
    raise ImageInvalid(field, f"{ref.digest} has no linux/amd64 image (it has {', '.join(listed) or 'none'})")


class _LayerReader:
    """The layer's bytes as ``tarfile`` reads them, hashed and counted against the manifest on the way."""

    def __init__(self, resp: urllib3.BaseHTTPResponse, layer: dict[str, Any], field: str, progress: Progress):
        self.resp, self.layer, self.field, self.progress = resp, layer, field, progress
        self.hash = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.resp.read(size if size > 0 else CHUNK)
        except (HTTPError, OSError) as exc:
            raise connection_error(exc, self.resp.geturl() or "", self.field) from exc
        self.hash.update(data)
        self.count += len(data)
        if self.count > self.layer["size"]:
            raise ImageDigestMismatch(
                self.field, f"layer {self.layer['digest']} is longer than its manifest says"
            )
        if data:
            self.progress(self.count, self.layer["size"])
        return data

    def verify(self) -> None:
        """Read what tarfile left (padding, other files) and check the whole layer against the manifest."""
        while self.read(CHUNK):
            pass
        digest = "sha256:" + self.hash.hexdigest()
        if digest != self.layer["digest"] or self.count != self.layer["size"]:
            raise ImageDigestMismatch(
                self.field,
                f"layer {self.layer['digest']} arrived as {digest} ({self.count} bytes); "
                "the registry (or something between) changed it",
            )


def _extract(
    registry: Registry, layer: dict[str, Any], part: pathlib.Path, max_bytes: int, progress: Progress
) -> str:
    """Stream one layer; write its ``disk/<name>`` to ``part`` and return the disk's sha256, or ""."""
    resp = registry.blob(layer["digest"])
    reader = _LayerReader(resp, layer, registry.field, progress)
    found = ""
    try:
        with tarfile.open(fileobj=reader, mode="r|*", bufsize=CHUNK) as tar:  # type: ignore[call-overload]
            for member in tar:
                if not (member.isreg() and _is_disk(member.name)):
                    continue
                if member.size > max_bytes:
                    raise too_large(
                        registry.field, f"its disk {member.name} is {member.size} bytes", max_bytes
                    )
                found = _copy(tar, member, part)
                break
        reader.verify()
    except ImageImportError:
        raise
    except (tarfile.TarError, EOFError, ValueError) as exc:
        raise ImageInvalid(
            registry.field, f"layer {layer['digest']} is not a tar archive (gzip or plain): {exc}"
        ) from exc
    finally:
        resp.release_conn()
    return found


def _is_disk(name: str) -> bool:
    while name.startswith("./"):
        name = name[2:]
    folder, _, file = name.partition("/")
    whiteout = file.startswith(".wh.")  # a lower layer's file deleted
    return folder == "disk" and file not in ("", ".", "..") and "/" not in file and not whiteout


def _copy(tar: tarfile.TarFile, member: tarfile.TarInfo, part: pathlib.Path) -> str:
    source = tar.extractfile(member)
    assert source is not None  # a regular file
    digest = hashlib.sha256()
    with open(part, "wb") as out:
        for block in iter(lambda: source.read(CHUNK), b""):
            digest.update(block)
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def push(registry: Registry, ref: Reference, path: pathlib.Path, progress: Progress) -> str:
    """Upload ``path`` as a containerDisk image; returns the manifest's digest. A failure that may pass
    is retried with the policy's backoff, from the start."""
    attempt = 0
    while True:
        try:
            return _push(registry, path, progress)
        except ImageSourceUnavailable as exc:
            registry.http.policy.pause(attempt, exc)
            attempt += 1


def _push(registry: Registry, path: pathlib.Path, progress: Progress) -> str:
    layer = _Layer(path, progress)
    layer_digest = registry.upload(layer, layer.total, layer.digest)
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [layer_digest]}},
        sort_keys=True,
    ).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    registry.upload(config, len(config), lambda: config_digest)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": LAYER_TAR, "digest": layer_digest, "size": layer.total}],
    }
    return registry.put_manifest(json.dumps(manifest, sort_keys=True).encode(), OCI_MANIFEST)


class _Layer:
    """The uncompressed layer tar of one disk, made piece by piece as it is sent and hashed on the way."""

    def __init__(self, path: pathlib.Path, progress: Progress) -> None:
        self.path, self.progress = path, progress
        self.size = path.stat().st_size
        info = tarfile.TarInfo("disk/disk.qcow2")
        info.size, info.mode, info.uid, info.gid, info.mtime = self.size, 0o440, QEMU_ID, QEMU_ID, 0
        self.header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        # The file's last block padded, then the end of the archive: two empty blocks.
        self.trailer = b"\0" * (-self.size % tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE)
        self.total = len(self.header) + self.size + len(self.trailer)
        self.hash = hashlib.sha256()
        self.sent = 0

    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()

    def __iter__(self) -> Iterator[bytes]:
        yield self._emit(self.header)
        with open(self.path, "rb") as f:
            left = self.size
            while left:
                block = f.read(min(CHUNK, left))
                if not block:
                    raise DriverError(f"{self.path} shrank while pushed; push it when nothing writes it")
                left -= len(block)
                yield self._emit(block)
        yield self._emit(self.trailer)

    def _emit(self, chunk: bytes) -> bytes:
        self.hash.update(chunk)
        self.sent += len(chunk)
        self.progress(self.sent, self.total)
        return chunk
