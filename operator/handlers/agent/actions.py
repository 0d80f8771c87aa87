"""The one-shot action protocol: spec.actions.<kind> carries an id, status.actions.<kind> answers it.

Each new id is acted on once. "InProgress" is written before the act, so an agent restarted mid-act
finds it and says the outcome is unknown (a reboot) or checks it (a snapshot) instead of acting
again. The protocol's decisions (``due``, ``started``, ``answer``) are pure; ``ActionRunner``
carries them out on the driver.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

from kubenova import faults
from kubenova.driver.base import (
    ComputeDriver,
    DriverError,
    GuestAgentUnavailable,
    ImageRef,
    InstanceNotRunning,
    RebootType,
    SnapshotResult,
)
from kubenova.driver.images import ImageStore
from kubenova.driver.imports import Importer
from kubenova.driver.oci import Reference
from kubenova.handlers.agent.events import EventPoster
from kubenova.handlers.agent.secret_reader import SecretReader, WaitFor
from kubenova.handlers.shared import now

ACTIONS = ("reboot", "snapshot", "passwordReset")
#: A snapshot's progress is written at most this often.
PROGRESS_INTERVAL = 2.0
#: Whose password a passwordReset sets unless it names a user: Nova's os_admin_user default.
DEFAULT_ADMIN_USER = "root"


@dataclasses.dataclass(frozen=True)
class Due:
    """An action whose id status has not answered yet.

    ``result``: this process acted on this id already, and only its answer is to be written (again).
    ``interrupted``: status says InProgress with this id, yet this process did not act on it: an
    earlier agent process started it, and it may or may not have happened.
    """

    kind: str
    request: Mapping[str, Any]
    interrupted: bool = False
    result: Mapping[str, Any] | None = None


def due(
    spec: Mapping[str, Any], status: Mapping[str, Any], acted: Mapping[str, tuple[str, Mapping[str, Any]]]
) -> list[Due]:
    """The actions to act on or to answer; ``acted``: kind -> (id, result) of what this process did."""
    found = []
    for kind in ACTIONS:
        request = (spec.get("actions") or {}).get(kind)
        if not request:
            continue
        ack = (status.get("actions") or {}).get(kind) or {}
        if ack.get("id") == request["id"] and ack.get("phase") != "InProgress":
            continue  # done already
        done = acted.get(kind)
        if done is not None and done[0] == request["id"]:
            found.append(Due(kind, request, result=done[1]))
        else:
            found.append(Due(kind, request, interrupted=ack.get("id") == request["id"]))
    return found


def started(kind: str, request: Mapping[str, Any]) -> dict[str, Any]:
    """The status patch written before acting."""
    return {"actions": {kind: {"id": request["id"], "phase": "InProgress", "message": f"{kind} started"}}}


def answer(kind: str, request: Mapping[str, Any], result: Mapping[str, Any]) -> dict[str, Any]:
    """The status patch that answers the request with its result."""
    return {"actions": {kind: {"id": request["id"], **result}}}


def snapshot_answer(stored: str, made: SnapshotResult) -> dict[str, Any]:
    """status.actions.snapshot's fields for a snapshot made: where it is, and whether it is consistent."""
    if made.consistent:
        return {
            "message": f"{stored}; the guest's file systems were frozen while its disk was copied",
            "consistent": True,
            "consistencyReason": None,  # a merge patch: an earlier snapshot's reason goes
        }
    return {
        "message": f"{stored}; crash-consistent only: {made.reason}",
        "consistent": False,
        "consistencyReason": made.reason,
    }


class ActionRunner:
    """Carries out the due actions of the instance reconciler; remembers what this process did."""

    def __init__(
        self,
        driver: ComputeDriver,
        images: ImageStore,
        secrets: SecretReader,
        events: EventPoster,
        write: Callable[[dict[str, Any], dict[str, Any]], None],
        soft_reboot_timeout: float,
    ) -> None:
        self.driver = driver
        self.images = images
        self.secrets = secrets
        self.events = events
        self.write = write
        self.soft_reboot_timeout = soft_reboot_timeout
        #: (uid, kind) -> (id, result) of the actions this process carried out.
        self._acted: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}

    def forget(self, uid: str) -> None:
        self._acted = {key: value for key, value in self._acted.items() if key[0] != uid}

    def run(self, body: dict[str, Any]) -> bool:
        """Act once per new id and answer in status; returns whether this call acted on anything."""
        uid = body["metadata"]["uid"]
        acted = {kind: done for (owner, kind), done in self._acted.items() if owner == uid}
        any_acted = False
        for item in due(body.get("spec") or {}, body.get("status") or {}, acted):
            result = item.result
            if result is None:
                if not item.interrupted:
                    self.write(body, started(item.kind, item.request))
                result = {"completionTime": now(), **self._act(body, uid, item)}
                self._acted[(uid, item.kind)] = (item.request["id"], result)
                any_acted = True
            # Acted on here; if this write fails (apiserver away), the retry writes it, never acts again.
            self.write(body, answer(item.kind, item.request, result))
        return any_acted

    def _act(self, body: dict[str, Any], uid: str, item: Due) -> dict[str, Any]:
        kind, request = item.kind, item.request
        try:
            if kind == "reboot":
                result = {"message": self._reboot(uid, request, item.interrupted)}
            elif kind == "snapshot":
                result = self._snapshot(body, uid, request, item.interrupted)
            else:
                result = {"message": self._password_reset(body, uid, request)}
        except GuestAgentUnavailable as exc:  # the Event's reason names the cause, not only the action
            self.events.warn(body, "GuestAgentUnavailable", f"{kind} {request['id']}: {exc}")
            return {"phase": "Failed", "message": str(exc)}
        except (DriverError, WaitFor) as exc:
            self.events.warn(body, f"{kind[0].upper()}{kind[1:]}Failed", f"{kind} {request['id']}: {exc}")
            return {"phase": "Failed", "message": str(exc)}
        return {"phase": "Succeeded", **result}

    def _reboot(self, uid: str, request: Mapping[str, Any], interrupted: bool) -> str:
        if interrupted:
            state = self.driver.get_info(uid).state.value
            raise DriverError(
                f"the agent restarted during this reboot, so whether it finished is unknown (the "
                f"domain is {state}); request another reboot with a new id if it is still needed"
            )
        try:
            done = self.driver.reboot(uid, RebootType(request["type"]), self.soft_reboot_timeout)
        except InstanceNotRunning as exc:
            raise DriverError(f"cannot reboot: {exc}") from exc
        if done is RebootType.HARD and request["type"] == "Soft":
            return f"the guest ignored the ACPI shutdown for {self.soft_reboot_timeout:.0f}s; rebooted hard"
        return f"rebooted ({request['type'].lower()})"

    def _snapshot(
        self, body: dict[str, Any], uid: str, request: Mapping[str, Any], interrupted: bool
    ) -> dict[str, Any]:
        """The image, and whether the guest's file systems were frozen while it was copied (``consistent``;
        ``consistencyReason`` says why not)."""
        name, namespace = request["imageName"], body["metadata"]["namespace"]
        stored = f"image {name} is among the namespace's snapshots in the image store"
        if interrupted and (self.images.snapshots(namespace).root / name).is_file():
            return {
                "message": stored,
                "consistent": False,
                "consistencyReason": "the agent restarted while the snapshot was made, so whether the "
                "guest's file systems were frozen is unknown",
            }
        last = [0.0]

        def progress(percent: int) -> None:
            if time.monotonic() - last[0] >= PROGRESS_INTERVAL and percent < 100:  # a bounded write rate
                last[0] = time.monotonic()
                self.write(
                    body,
                    {
                        "actions": {
                            "snapshot": {"id": request["id"], "phase": "InProgress", "progress": percent}
                        }
                    },
                )

        made = self.driver.snapshot(uid, ImageRef(name, namespace=namespace), progress)
        faults.point("snapshot.written")
        result = snapshot_answer(stored, made)
        if request.get("imageRef"):
            result.update(self._push(namespace, request))
        return result

    def _push(self, namespace: str, request: Mapping[str, Any]) -> dict[str, Any]:
        """The snapshot pushed to ``imageRef`` as a containerDisk image: bootable on any node by digest."""
        field = "spec.actions.snapshot.imageRef"
        path = self.images.snapshots(namespace).resolve(field, request["imageName"])
        auth = self.secrets.credentials(
            namespace, request.get("secretRef"), "spec.actions.snapshot.secretRef"
        )
        digest = Importer(pathlib.Path(path).parent, 0).push_oci(path, request["imageRef"], auth, field=field)
        ref = Reference.parse(request["imageRef"], field, pull=False)
        pushed = f"{ref.host}/{ref.repository}@{digest}"
        message = f"image {request['imageName']} is among the namespace's snapshots and at {pushed}"
        return {"imageRef": pushed, "message": message}

    def _password_reset(self, body: Mapping[str, Any], uid: str, request: Mapping[str, Any]) -> str:
        spec = body.get("spec") or {}
        password = self.secrets.value(
            body["metadata"]["namespace"],
            spec.get("adminPasswordSecretRef"),
            "spec.adminPasswordSecretRef",
            "password",
        )
        if password is None:
            raise WaitFor("SecretMissing", "spec.adminPasswordSecretRef is not set")
        user = request.get("user") or DEFAULT_ADMIN_USER
        try:
            self.driver.set_admin_password(uid, password, user)
        except GuestAgentUnavailable as exc:
            raise GuestAgentUnavailable(f"cannot set the password of {user!r}: {exc}") from exc
        except InstanceNotRunning as exc:
            raise DriverError(f"cannot set the password of {user!r}: {exc}") from exc
        return f"the password of {user!r} was set through the guest agent"
