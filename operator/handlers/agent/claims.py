"""PersistentVolumeClaims, agent side: where this node's kubelet mounted a claim's volume for its holder pod.

The controller runs one holder pod per claim attachment, and per instance whose root disk is a claim, on
the instance's node (controller/holders.py); the kubelet and the cluster's storage driver attach and mount
the volume for it, as for any pod. The agent then finds the volume in the kubelet's folder of that pod (the
controller names it in the attachment's or instance's status.holderPodUID), by the name of the
PersistentVolume the claim is bound to, and hands that host path to the driver. It never takes a path from
an object a tenant writes: the claim's binding (``spec.volumeName`` of a Bound claim) is the
PersistentVolume controller's, status is kubenova's, and the folders are the kubelet's.
"""

from __future__ import annotations

import os
import pathlib
import re
import stat
from collections.abc import Mapping
from typing import Any

from kubernetes.utils import parse_quantity

from kubenova.driver.base import InvalidInstanceSpec
from kubenova.handlers.agent.secret_reader import WaitFor
from kubenova.handlers.core_v1 import CoreV1
from kubenova.handlers.shared import claim_missing, condition, read_claim, root_claim_of

#: The guest's disk in a Filesystem-mode claim.
DISK_IMAGE = "disk.img"
#: What the disk image leaves to the file system (KubeVirt's default filesystemOverhead: 5.5 %).
FILESYSTEM_OVERHEAD = 0.055
MIB = 2**20
#: A pod's UID: the only shape of folder name the agent looks under.
UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


#: What the controller says of a claim's user that has no holder yet: the agent says the same, not another.
CONTROLLER_WAITS = ("ClaimNotFound", "HolderNameTaken")


class ClaimNotReady(WaitFor):
    """The claim's volume is not on this node yet (no holder, no claim, not bound, not mounted): it waits.

    ``reason`` is the condition's; the message names the claim and what to do."""


def usable_bytes(capacity: str) -> int:
    """The disk image's size in a claim of ``capacity``: what the file system leaves, in whole MiB."""
    return int(float(parse_quantity(capacity)) * (1 - FILESYSTEM_OVERHEAD)) // MIB * MIB


class Claims:
    """Finds claims' volumes in the kubelet's folder (``--kubelet-dir``, mounted into the agent's pod with
    HostToContainer propagation, so the kubelet's later mounts show)."""

    def __init__(self, core: CoreV1, kubelet_dir: pathlib.Path) -> None:
        self.core = core
        self.kubelet_dir = kubelet_dir

    def disk(self, namespace: str, claim: str, read_only: bool, status: Mapping[str, Any]) -> str:
        """The host path of an attachment's disk in ``claim``, for the holder pod its ``status`` names: a
        Block-mode claim's device where the kubelet mapped it, else disk.img in the volume's mount, made
        empty at the claim's size when missing."""
        found, size = self._volume(namespace, claim, status, "spec.volume.persistentVolumeClaim")
        if stat.S_ISBLK(found.stat().st_mode):
            return str(found)
        image = found / DISK_IMAGE
        if not image.exists():
            if read_only:
                raise InvalidInstanceSpec(
                    "spec.readOnly",
                    f"claim {claim!r} holds no {DISK_IMAGE} yet, and a read-only attachment cannot make one; "
                    "attach it read-write once",
                )
            _make_image(image, size)
        return regular_disk(found, claim)

    def root(self, instance: Mapping[str, Any]) -> tuple[str, int] | None:
        """An instance's root disk in its claim, if it has one: the host path of disk.img in the volume's
        mount for its holder pod, and the size the driver makes it at, from the image, when missing."""
        meta, spec = instance["metadata"], instance.get("spec") or {}
        claim = root_claim_of(spec)
        if claim is None:
            return None
        field = "spec.rootDisk.persistentVolumeClaim"
        found, size = self._volume(meta["namespace"], claim, instance.get("status") or {}, field)
        if not found.is_dir():  # the controller refuses a Block-mode claim as a root disk
            raise InvalidInstanceSpec(field, f"claim {claim!r} is not a Filesystem-mode claim")
        if (found / DISK_IMAGE).exists() or (found / DISK_IMAGE).is_symlink():
            regular_disk(found, claim, field)
        return str(found / DISK_IMAGE), size

    def _volume(
        self, namespace: str, claim: str, status: Mapping[str, Any], field: str
    ) -> tuple[pathlib.Path, int]:
        """Where the claim's volume is mounted (a Block-mode claim's: mapped) for the holder pod ``status``
        names (status.holderPodUID, the controller's), and the size of a disk in it. Never another pod's
        mount of the same claim: that one may go (a holder of an earlier user, still unmounting) and take the
        disk with it."""
        holder = str(status.get("holderPodUID", ""))
        if not UID.fullmatch(holder):
            said = condition(status, "Ready") or {}
            if said.get("reason") in CONTROLLER_WAITS:
                raise ClaimNotReady(said["reason"], str(said.get("message", "")))
            raise ClaimNotReady("HolderPending", "waiting for kubenova's controller to make the holder pod")
        pvc = read_claim(self.core, namespace, claim)
        if pvc is None:
            raise ClaimNotReady("ClaimNotFound", claim_missing(namespace, claim))
        spec, pvc_status = pvc.get("spec") or {}, pvc.get("status") or {}
        pv, phase = spec.get("volumeName"), pvc_status.get("phase") or "Pending"
        if phase != "Bound" or not pv:
            raise ClaimNotReady(
                "ClaimPending",
                f"PersistentVolumeClaim {claim!r} is {phase}: waiting for it to bind "
                f"(kubectl -n {namespace} describe pvc {claim} says why not)",
            )
        found = self._mapped(holder, pv) if spec.get("volumeMode") == "Block" else self._mounted(holder, pv)
        if found is None:
            raise ClaimNotReady(
                "ClaimNotMounted",
                f"waiting for the kubelet to make volume {pv} of claim {claim!r} ready on this node for its "
                "holder pod",
            )
        size = usable_bytes((pvc_status.get("capacity") or {}).get("storage", "0"))
        if size <= 0:
            raise InvalidInstanceSpec(field, f"claim {claim!r} is too small for a disk")
        return found, size

    def _mounted(self, pod: str, pv: str) -> pathlib.Path | None:
        """The volume where the kubelet mounted it for the pod: the in-tree plugins'
        ``pods/<pod>/volumes/<plugin>/<pv>``, CSI's ``.../<pv>/mount``."""
        mounted = mount_points()
        for folder in (self.kubelet_dir / "pods" / pod / "volumes").glob(f"*/{pv}"):
            for path in (folder / "mount", folder):
                if str(path) in mounted:
                    return path
        return None

    def _mapped(self, pod: str, pv: str) -> pathlib.Path | None:
        """A Block-mode volume's device as the kubelet mapped it for the pod, bind-mounted in its folder at
        ``plugins/<plugin>/volumeDevices/<pv>/<pod>`` (CSI: ``plugins/kubernetes.io/csi/volumeDevices/<pv>/
        dev/<pod>``), which the agent sees; not the pod's link in ``pods/<pod>/volumeDevices``, which names
        the host's /dev."""
        mounted = mount_points()
        for pattern in (f"plugins/*/volumeDevices/{pv}/{pod}", f"plugins/*/*/volumeDevices/{pv}/dev/{pod}"):
            for path in self.kubelet_dir.glob(pattern):
                if str(path) in mounted and stat.S_ISBLK(path.stat().st_mode):
                    return path
        return None


def mount_points(mountinfo: str = "/proc/self/mountinfo") -> set[str]:
    """Where something is mounted, as this process sees it. Not os.path.ismount: a bind mount of a folder of
    the same file system (a local PersistentVolume's) has the device of its parent, and ismount says no."""
    points = set()
    for line in pathlib.Path(mountinfo).read_text().splitlines():
        point = line.split()[4]
        for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
            point = point.replace(code, char)
        points.add(point)
    return points


def regular_disk(mount: pathlib.Path, claim: str, field: str = "spec.volume.persistentVolumeClaim") -> str:
    """disk.img in a claim's mount, if it is a plain file of the volume: a namespace user's pod that mounts
    the same claim could replace it with a link, and libvirtd, on the host, would follow it anywhere."""
    image = mount / DISK_IMAGE
    found = image.lstat()
    if not stat.S_ISREG(found.st_mode) or found.st_nlink != 1:
        raise InvalidInstanceSpec(
            field,
            f"{DISK_IMAGE} in claim {claim!r} is not a plain file (a link, or a device), so kubenova does "
            "not attach it; delete it from the volume, then attach the claim again (a new disk is made)",
        )
    return str(image)


def _make_image(image: pathlib.Path, size: int) -> None:
    """A sparse raw disk of ``size``, complete or absent: written under another name, then renamed."""
    part = image.with_name(f".{image.name}.part")
    with open(part, "wb") as f:
        f.truncate(size)
        os.fsync(f.fileno())
    os.rename(part, image)
