"""Base images from a URL or an OCI registry into the node's image cache, each verified and fetched once.

The result is ``<cache_dir>/<sha256 of the disk image>``, the name ImageCache gives its bases, so an
instance boots from an imported image exactly as from one in the image store. Everything under way is
a dot-file (``.<digest>.part``, ``.<digest>.lock``), which the cache's cleaner ignores; the small
index from a manifest digest to its disk (``.oci-<digest>``) tolerates deletion (it only saves a pull)
and the loss of the disk it names (checked on every use).

Once per image: threads of one process asking for the same image share one download (the first one
downloads, the others wait and see its progress); processes sharing the cache directory take an
``fcntl`` lock on the image's lock file, and one that finds it held waits, then finds the file made.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import pathlib
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from kubenova.driver import containerdisk, oci
from kubenova.driver.download import Part, download
from kubenova.driver.errors import DriverError, ImageImportRefused, ImageInvalid, ImageSourceUnavailable
from kubenova.driver.transfer import Credentials, Http, Policy, Progress
from kubenova.driver.types import ImageRef

__all__ = ["Credentials", "Importer", "Progress"]

log = logging.getLogger(__name__)

#: The largest image a node imports unless told otherwise (the chart's agent.imports.maxSizeGiB).
DEFAULT_MAX_BYTES = 50 << 30

_SHA256 = re.compile(r"sha256:([0-9a-f]{64})")


@dataclasses.dataclass
class _Flight:
    """One image being fetched in this process: who asked, who listens, and how it ended."""

    source: object
    listeners: list[Progress] = dataclasses.field(default_factory=list)
    last: tuple[int, int | None] | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: pathlib.Path | None = None
    error: BaseException | None = None

    def report(self, done: int, total: int | None) -> None:
        """Tell every caller waiting for this image; a listener's failure never stops the download."""
        self.last = (done, total)
        for listener in tuple(self.listeners):
            try:
                listener(done, total)
            except Exception:
                log.exception("an image import's progress callback failed")


class Importer:
    """Fetches images into ``cache_dir``; one per process (its semaphore bounds the process's downloads).

    Every method blocks: the agent calls it from its worker threads, never from an event loop.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        max_bytes: int,
        concurrency: int = 2,
        retries: int = 4,
        backoff: float = 1.0,
        timeout: float = 60.0,
    ) -> None:
        self.dir = pathlib.Path(cache_dir)
        self.max_bytes = max_bytes
        policy = Policy(retries=retries, backoff=backoff, read_timeout=timeout)
        self.http = Http(policy, pool_size=2 * concurrency)
        self._slots = threading.BoundedSemaphore(concurrency)
        self._flights: dict[str, _Flight] = {}
        self._lock = threading.Lock()

    def fetch_url(
        self,
        url: str,
        checksum: str,
        auth: Credentials | None = None,
        progress: Progress | None = None,
        field: str = "spec.boot.image",
    ) -> pathlib.Path:
        """The cached file of the image at ``url`` whose sha256 is ``checksum`` (``sha256:<hex>``)."""
        match = _SHA256.fullmatch(checksum)
        if not match:
            raise ImageImportRefused(f"{field}.checksum", f"{checksum!r} is not sha256:<64 hex digits>")
        if not url.startswith(("http://", "https://")):
            raise ImageImportRefused(f"{field}.url", f"{url!r} is not an http or https URL")
        digest = match[1]
        final = self.dir / digest

        def work(report: Progress) -> pathlib.Path:
            part = Part(self.dir / f".{digest}.part")
            try:
                download(self.http, url, part, digest, self.max_bytes, auth, field, report)
                inspect(part.path, f"{field}.url")
            except ImageSourceUnavailable:
                raise  # the partial file stays: the next attempt resumes it
            except BaseException:
                part.path.unlink(missing_ok=True)
                raise
            os.replace(part.path, final)
            return final

        def cached() -> pathlib.Path | None:
            return final if final.exists() else None

        return self._once(digest, (url, auth), cached, work, progress)

    def fetch_oci(
        self,
        reference: str,
        auth: Credentials | None = None,
        progress: Progress | None = None,
        field: str = "spec.boot.image",
    ) -> pathlib.Path:
        """The cached disk of the containerDisk image ``host[:port]/repo@sha256:<manifest digest>``."""
        ref = oci.Reference.parse(reference, f"{field}.registry", pull=True)
        key = f"oci-{ref.digest_hex}"
        index = self.dir / f".{key}"

        def cached() -> pathlib.Path | None:
            return self._indexed(index)

        def work(report: Progress) -> pathlib.Path:
            part = self.dir / f".{key}.part"
            try:
                registry = oci.Registry(self.http, ref, auth, f"{field}.registry")
                digest = containerdisk.pull(registry, ref, part, self.max_bytes, report)
                inspect(part, f"{field}.registry")
                final = self.dir / digest
                if not final.exists():  # another manifest may hold the same disk: the file is the same
                    os.replace(part, final)
            finally:
                part.unlink(missing_ok=True)  # a layer cannot resume mid-way: every attempt starts over
            _write_atomically(index, digest)
            return final

        return self._once(key, (reference, auth), cached, work, progress)

    def fetch(
        self, image: ImageRef, auth: Credentials | None, progress: Progress | None = None
    ) -> pathlib.Path:
        """The cached file of an image the spec imports (``image.url`` or ``image.registry``)."""
        if image.registry:
            return self.fetch_oci(image.registry, auth, progress)
        if image.url and image.checksum:
            return self.fetch_url(image.url, image.checksum, auth, progress)
        raise ImageImportRefused(
            "spec.boot.image", f"{image.source!r} is neither a url with a checksum nor a registry"
        )

    def cached(self, image: ImageRef) -> pathlib.Path | None:
        """The cached file of an image the spec imports, when this node has it already: no network."""
        if image.registry:
            ref = oci.Reference.parse(image.registry, "spec.boot.image.registry", pull=True)
            return self._indexed(self.dir / f".oci-{ref.digest_hex}")
        match = _SHA256.fullmatch(image.checksum or "")
        if image.url and match and (self.dir / match[1]).exists():
            return self.dir / match[1]
        return None

    def _indexed(self, index: pathlib.Path) -> pathlib.Path | None:
        """The disk a manifest's index file names, if both are there."""
        try:
            disk = self.dir / index.read_text().strip()
        except (FileNotFoundError, ValueError):
            return None
        return disk if _SHA256.fullmatch(f"sha256:{disk.name}") and disk.exists() else None

    def push_oci(
        self,
        path: str | os.PathLike[str],
        reference: str,
        auth: Credentials | None = None,
        progress: Progress | None = None,
        field: str = "spec.actions",
    ) -> str:
        """Upload a disk as a containerDisk image to ``host[:port]/repo[:tag]``; returns its manifest
        digest (``sha256:<hex>``), by which any node (or KubeVirt) can pull exactly these bytes."""
        ref = oci.Reference.parse(reference, field, pull=False)
        registry = oci.Registry(self.http, ref, auth, field)
        with self._slots:
            return containerdisk.push(registry, ref, pathlib.Path(path), progress or _ignore)

    def _once(
        self,
        key: str,
        source: object,
        cached: Callable[[], pathlib.Path | None],
        work: Callable[[Progress], pathlib.Path],
        progress: Progress | None,
    ) -> pathlib.Path:
        """``work`` run by one caller at a time per ``key``; the others share its result.

        A waiting caller whose source differs (another URL for the same digest) tries its own when the
        first one failed; one with the same source takes the same error.
        """
        while True:
            if (hit := cached()) is not None:
                os.utime(hit)  # last use, for the cache's cleaner
                return hit
            with self._lock:
                flight = self._flights.get(key)
                lead = flight is None
                if flight is None:
                    flight = self._flights[key] = _Flight(source)
                if progress:
                    flight.listeners.append(progress)
                last = flight.last
            if lead:
                return self._lead(key, flight, cached, work)
            if progress and last:
                progress(*last)
            flight.done.wait()
            if flight.result is not None:
                return flight.result
            if flight.source == source and flight.error is not None:
                raise flight.error

    def _lead(
        self,
        key: str,
        flight: _Flight,
        cached: Callable[[], pathlib.Path | None],
        work: Callable[[Progress], pathlib.Path],
    ) -> pathlib.Path:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with self._file_lock(key, flight.report):
                # Another process may have made it while this one waited for the lock.
                if (hit := cached()) is None:
                    with self._slots:
                        hit = work(flight.report)
                os.utime(hit)
                flight.result = hit
                return hit
        except OSError as exc:  # the cache's file system: full, read-only, gone
            flight.error = DriverError(f"the image cache {self.dir} cannot take the image: {exc}")
            raise flight.error from exc
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()

    @contextmanager
    def _file_lock(self, key: str, report: Progress) -> Iterator[None]:
        """Hold ``.<key>.lock`` exclusively; while another process holds it, report its partial file's size.

        The holder removes the file when it is done, so a waiter checks that the file it locked is
        still the one at that name, else it locks the new one.
        """
        path, part = self.dir / f".{key}.lock", self.dir / f".{key}.part"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                while not _try_lock(fd):
                    if part.exists():
                        report(part.stat().st_size, None)
                    time.sleep(0.2)
                if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            os.close(fd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _write_atomically(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _ignore(done: int, total: int | None) -> None:
    """No one listens."""


def inspect(path: pathlib.Path, field: str) -> None:
    """Refuse a disk QEMU should not open as a base: another format than qcow2 or raw, or a qcow2 that
    reads another file (a backing file or an external data file could name any file on the node)."""
    try:
        proc = subprocess.run(
            ["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True, check=False
        )
    except FileNotFoundError as exc:
        raise DriverError("qemu-img is not installed on this node; install qemu-utils") from exc
    if proc.returncode != 0:
        raise ImageInvalid(field, f"the image cannot be read as a disk: {proc.stderr.strip()}")
    info = json.loads(proc.stdout)
    fmt = info.get("format")
    if fmt not in ("qcow2", "raw"):
        raise ImageInvalid(field, f"the image is {fmt}; kubenova boots qcow2 or raw images: convert it")
    data_file = ((info.get("format-specific") or {}).get("data") or {}).get("data-file")
    if info.get("backing-filename") or data_file:
        raise ImageInvalid(
            field,
            f"the qcow2 image reads another file ({info.get('backing-filename') or data_file}); "
            "flatten it (qemu-img convert -O qcow2) and import that",
        )
