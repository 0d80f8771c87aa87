"""An instance's firewall, live: spec.firewall is applied to its running guest when it changes, without a
redefinition (the domain's definition only names the filter)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from kubenova.driver.base import ComputeDriver, FirewallRule
from kubenova.handlers.agent.translate import firewall_rules


class FirewallKeeper:
    """Remembers the rules applied to each instance, so a look applies them only when they changed (and
    once after the agent starts: what libvirt holds may be older)."""

    def __init__(self, driver: ComputeDriver) -> None:
        self.driver = driver
        self._applied: dict[str, tuple[FirewallRule, ...]] = {}
        self._lock = threading.Lock()

    def follow(self, uid: str, spec: Mapping[str, Any]) -> None:
        """Apply the spec's rules to the instance's filter if they are not what was applied last."""
        if spec.get("interfaces") == []:
            return  # no interface, no filter
        rules = firewall_rules(spec.get("firewall"))
        with self._lock:
            if self._applied.get(uid) == rules:
                return
        self.driver.ensure_filtering_rules_for_instance(uid, rules)
        with self._lock:
            self._applied[uid] = rules

    def spawned(self, uid: str, spec: Mapping[str, Any]) -> None:
        """The spawn defined the filter with the spec's rules: defining it again would have libvirt
        re-apply it to the new guest's taps (a rebuild of its firewall rules) for nothing."""
        with self._lock:
            self._applied[uid] = firewall_rules(spec.get("firewall"))

    def forget(self, uid: str) -> None:
        with self._lock:
            self._applied.pop(uid, None)
