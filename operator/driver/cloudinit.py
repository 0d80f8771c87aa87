"""What an instance's NoCloud config drive holds, shared by every driver.

user-data stays exactly the user's; what kubenova adds (admin password, injected files)
goes to vendor-data, which cloud-init merges under the user's own settings.
"""

from __future__ import annotations

import base64

import yaml

from kubenova.driver.base import InstanceSpec

#: The spec fields behind each file of the drive, for saying which change a running guest has not seen yet.
FIELDS = {
    "user-data": "spec.userData",
    "network-config": "spec.networkConfig",
    "vendor-data": "spec.injectedFiles/spec.adminPasswordSecretRef",
}


def needed(instance: InstanceSpec) -> bool:
    return bool(
        instance.user_data or instance.network_config or instance.injected_files or instance.admin_password
    )


def files(instance: InstanceSpec) -> dict[str, bytes]:
    """The drive's files by name."""
    found = {
        "meta-data": yaml.safe_dump({"instance-id": instance.uuid, "local-hostname": instance.name}).encode(),
        "user-data": (instance.user_data or "#cloud-config\n{}\n").encode(),
    }
    if instance.network_config:
        found["network-config"] = instance.network_config.encode()
    vendor: dict[str, object] = {}
    if instance.admin_password:
        vendor.update({"password": instance.admin_password, "chpasswd": {"expire": False}})
    if instance.injected_files:
        vendor["write_files"] = [
            {"path": f.path, "encoding": "b64", "content": base64.b64encode(f.content).decode()}
            for f in instance.injected_files
        ]
    if vendor:
        found["vendor-data"] = ("#cloud-config\n" + yaml.safe_dump(vendor)).encode()
    return found
