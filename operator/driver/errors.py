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


class ImportFailed(InvalidInstanceSpec):
    """Importing an image (by url or from a registry) failed.

    ``reason`` becomes the condition's reason (ImageNotFound, ImageUnauthorized, ImageTLSError,
    ImageUnreachable, ImageTooLarge, ImageChecksumMismatch, ImageInvalid). ``transient`` says that trying
    again later may succeed with the spec unchanged: the server may come back, a Secret may be fixed, the
    file may be uploaded, the node's limit raised. Only a wrong checksum or a file that is no disk image
    needs the spec itself to change.
    """

    def __init__(self, field: str, message: str, reason: str, transient: bool = False) -> None:
        super().__init__(field, message)
        self.reason = reason
        self.transient = transient


class InsufficientResources(InvalidInstanceSpec):
    """The host cannot give what the spec asks for (e.g. more memory than it has)."""


class InvalidCPUInfo(DriverError):
    """The CPU description handed to compare_cpu cannot be understood."""


class CPUIncompatible(DriverError):
    """This host cannot run guests made for that CPU (migration would fail)."""


class VolumeNotFound(DriverError):
    """No volume is attached at that device."""


class Unsupported(DriverError):
    """The platform cannot do this; ``reason`` says why, in words a person can act on."""

    def __init__(self, operation: str, reason: str) -> None:
        super().__init__(f"{operation} is not supported: {reason}")
        self.operation = operation
        self.reason = reason
