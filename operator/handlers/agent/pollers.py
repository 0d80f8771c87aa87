"""Nova's periodic tasks for this node's instances, run with the agent's resync."""

from __future__ import annotations

import logging

from kubenova.driver.base import DriverError, RebootType
from kubenova.handlers.agent.instances import InstanceAgent

log = logging.getLogger(__name__)


def poll(agent: InstanceAgent) -> None:
    """Stuck reboots are finished hard, long rescues are pointed out."""
    settings = agent.settings
    for uid in agent.driver.poll_rebooting_instances(settings.reboot_timeout):
        log.warning("reboot of %s is stuck; rebooting hard", uid)
        try:
            agent.driver.reboot(uid, RebootType.HARD)
        except DriverError as exc:
            log.warning("hard reboot of %s failed: %s", uid, exc)
    if settings.rescue_timeout > 0:
        for uid in agent.driver.poll_rescued_instances(settings.rescue_timeout):
            body = agent.cache.objects.get(uid)
            if body is not None:
                agent.events.warn(
                    body,
                    "RescueTimeout",
                    f"in rescue for more than {settings.rescue_timeout:.0f}s; "
                    "set spec.rescue.enabled to false to boot normally",
                )
