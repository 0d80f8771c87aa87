"""The agent's Events: a Normal one for each phase change, a Warning once per distinct problem."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

import kubernetes

from kubenova.handlers.core_v1 import CoreV1
from kubenova.handlers.shared import post_event

log = logging.getLogger(__name__)


class EventPoster:
    def __init__(self, core: CoreV1, node: str) -> None:
        self.core = core
        self.component = f"kubenova-agent/{node}"
        self._warned: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def post(self, body: Mapping[str, Any], reason: str, message: str, type_: str = "Normal") -> None:
        """An Event about ``body``; a failed post is logged, never raised (Events are best effort)."""
        try:
            post_event(self.core, body, reason, message, self.component, type_)
        except kubernetes.client.ApiException as exc:
            log.warning("cannot post the Event %s about %s: %s", reason, body["metadata"]["name"], exc.reason)

    def warn(self, body: Mapping[str, Any], reason: str, message: str) -> None:
        """One Warning per distinct problem, not one per retry."""
        key = (body["metadata"]["uid"], f"{reason}:{message}")
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        self.post(body, reason, message, "Warning")

    def forget(self, uid: str) -> None:
        """The object is gone: its problems may be said again should a new one have the same UID (never)."""
        with self._lock:
            self._warned = {key for key in self._warned if key[0] != uid}
