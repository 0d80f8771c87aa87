"""The NoCloud config drive: an ISO9660 volume labelled ``cidata`` that cloud-init reads.

user-data stays exactly the user's; what kubenova adds (admin password, injected files)
goes to vendor-data, which cloud-init merges under the user's own settings.
"""
from __future__ import annotations

import base64
import io
import os
import pathlib

import pycdlib
import yaml

from kubenova.driver.base import InstanceSpec


def _iso_name(index: int) -> str:
    return f"/F{index}.;1"


def contents(instance: InstanceSpec) -> dict[str, bytes]:
    files = {
        "meta-data": yaml.safe_dump({"instance-id": instance.uuid,
                                     "local-hostname": instance.name}).encode(),
        "user-data": (instance.user_data or "#cloud-config\n{}\n").encode(),
    }
    if instance.network_config:
        files["network-config"] = instance.network_config.encode()
    vendor: dict[str, object] = {}
    if instance.admin_password:
        vendor.update({"password": instance.admin_password, "chpasswd": {"expire": False}})
    if instance.injected_files:
        vendor["write_files"] = [{"path": f.path, "encoding": "b64",
                                  "content": base64.b64encode(f.content).decode()} for f in instance.injected_files]
    if vendor:
        files["vendor-data"] = ("#cloud-config\n" + yaml.safe_dump(vendor)).encode()
    return files


def needed(instance: InstanceSpec) -> bool:
    return bool(instance.user_data or instance.network_config or instance.injected_files or instance.admin_password)


def write(instance: InstanceSpec, path: pathlib.Path) -> None:
    _write_iso(contents(instance), path)


def replace_file(path: pathlib.Path, name: str, data: bytes) -> None:
    """Rewrite one file of an existing drive, keeping the others."""
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    files = {}
    for child in iso.list_children(rr_path="/"):
        if child.is_file():
            rr_name = child.rock_ridge.name().decode()
            buf = io.BytesIO()
            iso.get_file_from_iso_fp(buf, rr_path=f"/{rr_name}")
            files[rr_name] = buf.getvalue()
    iso.close()
    files[name] = data
    _write_iso(files, path)


def _write_iso(files: dict[str, bytes], path: pathlib.Path) -> None:
    """Write the ISO; readable by root only, since it may hold the admin password."""
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
