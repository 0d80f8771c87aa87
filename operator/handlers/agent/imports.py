"""Boot images imported by URL or from a registry, seen from the agent's work queue.

An import may take minutes, and a worker of the queue must never wait that long (the liveness probe
counts a stalled queue as a hung agent): each image is imported on a thread of its own, once per node
however many instances wait for it, and every waiting instance is looked at again at most every
``interval`` seconds to write the progress into its status, and once more when the import ends.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import typing
from collections.abc import Callable, Mapping
from typing import Any

from kubenova import api
from kubenova.driver.base import ComputeDriver, Credentials, DriverError, ImageRef, InstanceSpec
from kubenova.driver.errors import ImageDigestMismatch, ImageImportError, ImageInvalid, ImageSourceUnavailable
from kubenova.handlers.agent.secret_reader import WaitFor
from kubenova.handlers.agent.translate import boot_image
from kubenova.handlers.shared import set_condition

log = logging.getLogger(__name__)

#: Seconds between two progress writes of one instance (the issue's "at most every 2 s").
INTERVAL = 2.0


#: A merge patch that clears the figures of an import once it is over (they said how it went meanwhile).
_NO_FIGURES = {"bytes": None, "totalBytes": None, "percent": None, "bytesPerSecond": None}


class ImportRunning(Exception):
    """The instance waits for its image; the import's end (or its next progress) brings it back."""


@dataclasses.dataclass
class _Job:
    """One image's import, shared by every instance waiting for it."""

    started: float
    waiters: set[str] = dataclasses.field(default_factory=set)
    received: int = 0
    total: int | None = None
    moving: bool = False  # a progress report came: the import holds one of the node's slots
    digest: str | None = None
    error: DriverError | None = None
    #: waiters not yet told of ``error``; each is told once, then a later look starts a new try
    untold: set[str] = dataclasses.field(default_factory=set)
    poked: float = 0.0

    @property
    def done(self) -> bool:
        return self.digest is not None or self.error is not None


class Imports:
    """The node's running imports, by image; safe to call from any worker thread."""

    def __init__(
        self,
        driver: ComputeDriver,
        look: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        interval: float = INTERVAL,
    ) -> None:
        """``look(uid)`` puts an instance back on the work queue (the cache's ``look``)."""
        self.driver = driver
        self.look = look
        self.clock = clock
        self.interval = interval
        self._lock = threading.Lock()
        self._jobs: dict[ImageRef, _Job] = {}
        self._waited: set[str] = set()  # instances that waited for a download (not a cache hit)

    @staticmethod
    def _key(image: ImageRef) -> ImageRef:
        """Instances of different namespaces share an import of the same bytes; the name plays no part."""
        return ImageRef("", image.checksum, "", image.url, image.registry)

    def wait(
        self, uid: str, image: ImageRef, credentials: Callable[[], Credentials | None]
    ) -> dict[str, Any]:
        """The ``status.image`` of an instance whose image is in the node's cache; ImportRunning (after
        ``progress`` is written by the caller) while it is not.

        Raises the import's ImageImportError once per waiting instance; the next look tries again.
        ``credentials`` is read only when an import starts (it may raise the agent's WaitFor).
        """
        digest = self.driver.cached_image(image)
        key = self._key(image)
        with self._lock:
            job = self._jobs.get(key)
            if digest is not None:
                waited = uid in self._waited
                self._waited.discard(uid)
                if job is not None and job.done:
                    job.waiters.discard(uid)
                    if not job.waiters:
                        del self._jobs[key]
                return {"phase": "Ready", "cached": not waited, "digest": f"sha256:{digest}", **_NO_FIGURES}
            if job is not None and job.error is not None:
                if uid in job.untold:
                    job.untold.discard(uid)
                    job.waiters.discard(uid)
                    raise job.error
                job = None  # told already: this look is the next try
            if job is None or job.digest is not None:  # a finished job whose file went meanwhile: anew
                job = _Job(self.clock())
                self._jobs[key] = job
                start = True
            else:
                start = False
            job.waiters.add(uid)
            self._waited.add(uid)
        if start:
            try:
                secrets = credentials()
            except BaseException:
                with self._lock:
                    self._jobs.pop(key, None)
                raise
            threading.Thread(
                target=self._run, args=(job, image, secrets), name=f"import-{image.source[-40:]}", daemon=True
            ).start()
        raise ImportRunning()

    def ensure(
        self,
        body: dict[str, Any],
        write: Callable[[dict[str, Any], dict[str, Any]], None],
        credentials: Callable[[Mapping[str, Any]], Credentials | None],
        node: str,
    ) -> dict[str, Any] | None:
        """Before a spawn: the ``status.image`` of an instance whose boot image is imported, once it is in
        the node's cache (None for an image of the store).

        While the import runs, its progress is written and ImportRunning raised. A failed import says its
        cause in Ready: WaitFor (retried with backoff) when it may pass with the spec unchanged (a server
        down, a Secret or the file to fix, a node limit to raise), the error itself (Failed) when only the
        spec can fix it: a wrong checksum, a file that is no disk image.
        """
        meta = body["metadata"]
        spec_image = ((body.get("spec") or {}).get("boot") or {}).get("image") or {}
        image = boot_image(typing.cast(api.BootImage, spec_image), meta["namespace"])
        if not image.imported:
            return None
        uid = meta["uid"]
        try:
            return self.wait(uid, image, lambda: credentials(body))
        except ImportRunning:
            status = body.get("status") or {}
            progress = self.progress(uid, image)
            if (status.get("image") or {}).get("phase") == "Failed" and progress["phase"] == "Queued":
                raise  # another try of a failed import: its cause stays said until bytes flow again
            patch: dict[str, Any] = {"phase": "Importing", "node": node, "image": progress}
            message = f"importing the boot image from {image.source}"
            set_condition(patch, status, "Ready", False, "Importing", message, meta.get("generation"))
            write(body, patch)
            raise
        except ImageImportError as exc:
            write(body, {"image": {**self.progress(uid, image), "phase": "Failed"}})
            if isinstance(exc, (ImageDigestMismatch, ImageInvalid)):
                raise
            raise WaitFor(exc.reason, str(exc)) from exc

    def progress(self, uid: str, image: ImageRef) -> dict[str, Any]:
        """What ``status.image`` says while the instance waits."""
        with self._lock:
            job = self._jobs.get(self._key(image))
            if job is None:
                return {"phase": "Queued"}
            elapsed = max(self.clock() - job.started, 1e-3)
            status: dict[str, Any] = {
                "phase": "Importing" if job.moving else "Queued",
                "bytes": job.received,
                "bytesPerSecond": int(job.received / elapsed),
            }
            if job.total:
                status["totalBytes"] = job.total
                status["percent"] = min(100, job.received * 100 // job.total)
            return status

    def forget(self, uid: str) -> None:
        """The instance is gone from this node: nothing pokes it any more."""
        with self._lock:
            self._waited.discard(uid)
            for job in self._jobs.values():
                job.waiters.discard(uid)
                job.untold.discard(uid)
            for key in [k for k, job in self._jobs.items() if job.done and not job.waiters]:
                del self._jobs[key]  # nobody will ask for its outcome

    # --- the import thread -----------------------------------------------------------------------

    def _run(self, job: _Job, image: ImageRef, credentials: Credentials | None) -> None:
        try:
            digest = self.driver.import_image(image, credentials, lambda got, of: self._moved(job, got, of))
        except DriverError as exc:
            log.warning("importing %s failed: %s", image.source, exc)
            with self._lock:
                job.error, job.untold = exc, set(job.waiters)
        except Exception as exc:  # a bug must still end the wait with a message
            log.exception("importing %s failed", image.source)
            with self._lock:
                job.error = ImageSourceUnavailable("spec.boot.image", f"the import failed: {exc}")
                job.untold = set(job.waiters)
        else:
            log.info("imported %s as sha256:%s", image.source, digest)
            with self._lock:
                job.digest = digest
        self._poke(job)

    def _moved(self, job: _Job, received: int, total: int | None) -> None:
        with self._lock:
            job.received, job.total, job.moving = received, total, True
            if self.clock() - job.poked < self.interval:
                return
        self._poke(job)

    def _poke(self, job: _Job) -> None:
        with self._lock:
            job.poked = self.clock()
            waiters = list(job.waiters)
        for uid in waiters:
            self.look(uid)


def importing_first(
    spec_for: Callable[[Mapping[str, Any], Mapping[str, Any]], InstanceSpec],
    driver: ComputeDriver,
    credentials: Callable[[Mapping[str, Any]], Credentials | None],
) -> Callable[[Mapping[str, Any], Mapping[str, Any]], InstanceSpec]:
    """``spec_for`` for a migration's target, which needs the instance's imported image in its own cache
    before it can make the root disk's overlay: imported there first, on the migration's step (the
    source still runs the guest meanwhile)."""

    def spec(instance: Mapping[str, Any], flavor: Mapping[str, Any]) -> InstanceSpec:
        made = spec_for(instance, flavor)
        if made.image and made.image.imported and driver.cached_image(made.image) is None:
            driver.import_image(made.image, credentials(instance), lambda done, total: None)
        return made

    return spec
