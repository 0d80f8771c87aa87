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

    ``field`` names the spec field so the user can be told what to fix.
    """

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
