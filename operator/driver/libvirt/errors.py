"""The one place libvirt's error codes become the contract's exceptions."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import libvirt

from kubenova.driver.base import DriverError, InstanceNotFound, InstanceNotRunning


@contextlib.contextmanager
def translate(operation: str, uuid: str = "") -> Iterator[None]:
    """libvirt's "no domain" is InstanceNotFound, "not running" InstanceNotRunning, the rest DriverError."""
    try:
        yield
    except libvirt.libvirtError as exc:
        code = exc.get_error_code()
        if code == libvirt.VIR_ERR_NO_DOMAIN:
            raise InstanceNotFound(uuid) from exc
        if code == libvirt.VIR_ERR_OPERATION_INVALID and "not running" in str(exc):
            raise InstanceNotRunning(f"{operation}: the instance is not running") from exc
        raise DriverError(f"{operation} failed: {exc}") from exc
