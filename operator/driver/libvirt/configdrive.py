"""The NoCloud config drive as an ISO9660 volume labelled ``cidata``, which cloud-init reads."""

from __future__ import annotations

import io
import os
import pathlib


def _iso_name(index: int) -> str:
    return f"/F{index}.;1"


def write(files: dict[str, bytes], path: pathlib.Path) -> None:
    """Write the drive with these files (cloudinit.files); a guest running on the old drive keeps reading it
    (the new one replaces the file, not its content), the next boot gets this one."""
    _write_iso(files, path)


def _write_iso(files: dict[str, bytes], path: pathlib.Path) -> None:
    """Write the ISO; readable by root only, since it may hold the admin password."""
    import pycdlib  # here, not at the top: 2 MiB of the agent's memory only once a guest needs a drive

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=4, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for index, (name, data) in enumerate(sorted(files.items())):
        iso.add_fp(io.BytesIO(data), len(data), _iso_name(index), rr_name=name, joliet_path=f"/{name}")
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        iso.write_fp(out)
    iso.close()
    os.replace(tmp, path)
