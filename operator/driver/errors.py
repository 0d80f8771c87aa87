"""The errors of the compute contract: what a driver raises, and what the handlers tell the user.

``DriverError`` is a failure retrying may cure; ``InvalidInstanceSpec`` and its kinds name the spec
field to fix; ``Unsupported`` says why the platform cannot do something.
"""

from __future__ import annotations


class DriverError(Exception):
    """A failure of the hypervisor layer that retrying may cure."""


class InstanceNotFound(DriverError):
    """The instance has no domain on this node."""


class InstanceExists(DriverError):
    """Another instance already holds this name on the node."""


class InstanceNotRunning(DriverError):
    """The operation needs a running instance."""


class InvalidInstanceSpec(DriverError):
    """The instance spec cannot work on this node; retrying will not help until it changes.

    ``field`` names the spec field so the user can be told what to fix; ``reason`` is the condition's.
    """

    reason = "InvalidSpec"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ImageNotFound(InvalidInstanceSpec):
    """A named image is not in the node's store."""


class ImageChecksumMismatch(InvalidInstanceSpec):
    """An image's content does not match the checksum the spec gave."""


class InsufficientResources(InvalidInstanceSpec):
    """The host cannot give what the spec asks for (e.g. more memory than it has)."""


class InvalidCPUInfo(DriverError):
    """The CPU description handed to compare_cpu cannot be understood."""


class CPUIncompatible(DriverError):
    """This host cannot run guests made for that CPU (migration would fail)."""


class GuestAgentUnavailable(DriverError):
    """No QEMU guest agent answers in the guest (none runs, it is not connected yet, or it hangs); a call
    through it may work later, once the guest runs one."""


class VolumeNotFound(DriverError):
    """No volume is attached at that device."""


class Unsupported(DriverError):
    """The platform cannot do this; ``reason`` says why, in words a person can act on."""

    def __init__(self, operation: str, reason: str) -> None:
        super().__init__(f"{operation} is not supported: {reason}")
        self.operation = operation
        self.reason = reason


class ImageImportError(DriverError):
    """An image could not be brought into the node's cache from a URL or a registry.

    ``reason`` is one CamelCase word for a condition or an Event, ``field`` the spec field to look at
    (the caller names the prefix, e.g. ``spec.boot.image``), ``message`` the cause and the fix. A plain
    ``ImageImportError`` is transient (the agent retries with its backoff); the permanent kinds are also
    ``InvalidInstanceSpec``, so they fail the instance until its spec (or the Secret it names) changes.
    """

    reason = "ImageUnavailable"
    field: str
    message: str

    @property
    def transient(self) -> bool:
        """Whether retrying may succeed with nothing changed."""
        return not isinstance(self, InvalidInstanceSpec)


class ImageSourceUnavailable(ImageImportError):
    """The source failed in a way that may pass (5xx, a reset or timed-out connection), after retries.

    A partial download stays in the cache as a dot-file and the next attempt resumes it.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ImageSourceUnreachable(ImageSourceUnavailable):
    """No connection could be made (DNS, refused, connect timeout), after retries."""

    reason = "ImageUnreachable"


class ImageImportRefused(InvalidInstanceSpec, ImageImportError):
    """A permanent import failure: nothing of it stays in the cache, and retrying cannot help."""

    reason = "ImageImportFailed"


class ImageSourceNotFound(ImageImportRefused):
    """The server has no such file, repository or manifest (404)."""

    reason = "ImageNotFound"


class ImageUnauthorized(ImageImportRefused):
    """The server refused the credentials, or wanted some and got none (401, 403)."""

    reason = "ImageUnauthorized"


class ImageTLSError(ImageImportRefused):
    """The server's certificate could not be verified (unknown CA, wrong name, expired)."""

    reason = "ImageTLSError"


class ImageTooLarge(ImageImportRefused):
    """The image is larger than the node accepts."""

    reason = "ImageTooLarge"


class ImageDigestMismatch(ImageImportRefused, ImageChecksumMismatch):
    """What arrived does not hash to the digest the spec (or a manifest) named."""

    reason = "ImageChecksumMismatch"


class ImageInvalid(ImageImportRefused):
    """What arrived is no usable disk image: a container image without ``disk/<name>``, a manifest that is
    not JSON, a qcow2 with a backing file, a reference by tag."""

    reason = "ImageInvalid"
