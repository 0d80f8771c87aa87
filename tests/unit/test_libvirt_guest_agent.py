"""The libvirt driver's calls through the guest agent, against a domain that answers as libvirt does: the
channel's state read from the XML before any wait, a timeout set before every command, libvirt's errors
in the contract's terms, and the agent lifecycle event handed to listeners."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import libvirt
import pytest

from kubenova.driver.base import GuestAgentUnavailable, InstanceNotFound, Unsupported
from kubenova.driver.images import ImageStore
from kubenova.driver.libvirt import guest as libvirt_guest
from kubenova.driver.libvirt.config import GuestConfig
from kubenova.driver.libvirt.driver import LibvirtDriver
from kubenova.driver.libvirt.guest import Guest
from kubenova.driver.libvirt.host import Host

UID = "6f1c3a52-1d7e-4f49-9a57-0c2d2b3f4e10"


def error(code: int) -> libvirt.libvirtError:
    exc = libvirt.libvirtError("libvirt says no")
    exc.err = (code, 0, "libvirt says no", 2, None, None, None, 0, 0)
    return exc


def domain_xml(state: str | None, channel: bool = True) -> str:
    root = ET.fromstring(
        GuestConfig(UID, "ns_vm", "ns", "vm", 1, 128, "/c.log", kernel="/k", guest_agent=channel).to_xml()
    )
    for target in root.iter("target"):
        if target.get("name") == "org.qemu.guest_agent.0" and state:
            target.set("state", state)
    return ET.tostring(root, encoding="unicode")


class Domain:
    """What Guest asks of a virDomain, answered as a running domain with a guest agent would."""

    def __init__(self, state: str | None = "connected", channel: bool = True) -> None:
        self.xml = domain_xml(state, channel)
        self.calls: list[tuple[str, Any]] = []
        self.raises: dict[str, libvirt.libvirtError] = {}
        self.info = {
            libvirt.VIR_DOMAIN_GUEST_INFO_OS: {"os.name": "Debian GNU/Linux", "os.kernel-release": "6.1.0"},
            libvirt.VIR_DOMAIN_GUEST_INFO_HOSTNAME: {"hostname": "vm"},
        }

    def _call(self, name: str, argument: Any = None) -> None:
        self.calls.append((name, argument))
        if name in self.raises:
            raise self.raises[name]

    def UUIDString(self) -> str:  # noqa: N802 (libvirt's name)
        return UID

    def XMLDesc(self, flags: int = 0) -> str:  # noqa: N802
        return self.xml

    def agentSetResponseTimeout(self, timeout: int, flags: int = 0) -> int:  # noqa: N802
        self.calls.append(("timeout", timeout))
        return 0

    def setUserPassword(self, user: str, password: str, flags: int = 0) -> int:  # noqa: N802
        self._call("setUserPassword", user)
        return 0

    def guestInfo(self, types: int = 0, flags: int = 0) -> dict[str, str]:  # noqa: N802
        self._call(f"guestInfo:{types}", types)
        return self.info[types]

    def fsFreeze(self, mountpoints: Any = None, flags: int = 0) -> int:  # noqa: N802
        self._call("fsFreeze")
        return 1


def guest(domain: Domain) -> Guest:
    return Guest(domain)  # type: ignore[arg-type]


def test_no_agent_is_known_from_the_xml_without_asking_the_guest() -> None:
    guest(Domain("connected")).require_agent()
    for domain, says in (
        (Domain("disconnected"), "qemu-guest-agent"),
        (Domain(channel=False), "older kubenova"),
    ):
        with pytest.raises(GuestAgentUnavailable, match=says):
            guest(domain).require_agent()
        assert domain.calls == [], "nothing was asked of the guest"


def test_every_command_is_bounded_by_a_timeout_set_first() -> None:
    domain = Domain()
    guest(domain).set_user_password("debian", "pw")
    guest(domain).freeze_filesystems()
    assert domain.calls == [
        ("timeout", libvirt_guest.AGENT_TIMEOUT),
        ("setUserPassword", "debian"),
        ("timeout", libvirt_guest.FREEZE_TIMEOUT),
        ("fsFreeze", None),
    ]
    assert 0 < libvirt_guest.AGENT_TIMEOUT <= 10, "libvirt's own default waits for ever"


@pytest.mark.parametrize(
    ("code", "raised"),
    [
        (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, GuestAgentUnavailable),
        (libvirt.VIR_ERR_AGENT_UNSYNCED, GuestAgentUnavailable),
        (libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED, GuestAgentUnavailable),
        (libvirt.VIR_ERR_OPERATION_UNSUPPORTED, Unsupported),
        (libvirt.VIR_ERR_NO_DOMAIN, InstanceNotFound),
    ],
)
def test_libvirts_errors_become_the_contracts(code: int, raised: type[Exception]) -> None:
    domain = Domain()
    domain.raises["setUserPassword"] = error(code)
    with pytest.raises(raised):
        guest(domain).set_user_password("root", "pw")


def test_an_older_agent_without_a_kind_of_information_still_says_the_rest() -> None:
    domain = Domain()
    domain.raises[f"guestInfo:{libvirt.VIR_DOMAIN_GUEST_INFO_OS}"] = error(
        libvirt.VIR_ERR_OPERATION_UNSUPPORTED
    )
    assert guest(domain).guest_info() == {"hostname": "vm"}


def test_the_agent_lifecycle_event_reaches_every_listener_and_a_broken_one_harms_none() -> None:
    seen: list[str] = []

    def broken(uuid: str) -> None:
        raise RuntimeError("a listener's bug")

    driver = LibvirtDriver("test:///default", "qemu", "/nowhere", ImageStore("/nowhere"), "/nowhere")
    host = driver.host
    driver.add_guest_agent_listener(broken)
    driver.add_guest_agent_listener(seen.append)
    host._agent_lifecycle(
        None,  # type: ignore[arg-type]
        Domain(),  # type: ignore[arg-type]
        libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED,
        libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_REASON_CHANNEL,
        None,
    )
    assert seen == [UID]


class Connection:
    """The calls Host makes of a new connection, recorded."""

    def __init__(self) -> None:
        self.events: list[int] = []
        self.deregistered: list[int] = []

    def isAlive(self) -> bool:  # noqa: N802
        return True

    def setKeepAlive(self, interval: int, count: int) -> int:  # noqa: N802
        return 0

    def registerCloseCallback(self, callback: Any, opaque: Any) -> int:  # noqa: N802
        return 0

    def unregisterCloseCallback(self) -> int:  # noqa: N802
        return 0

    def domainEventRegisterAny(self, dom: Any, event: int, callback: Any, opaque: Any) -> int:  # noqa: N802
        self.events.append(event)
        return len(self.events)

    def domainEventDeregisterAny(self, callback_id: int) -> int:  # noqa: N802
        self.deregistered.append(callback_id)
        return 0

    def close(self) -> int:
        return 0


def test_a_connection_registers_for_agent_events_and_lets_go_of_them(monkeypatch: pytest.MonkeyPatch) -> None:
    conn = Connection()
    monkeypatch.setattr(libvirt, "open", lambda uri: conn)
    host = Host("test:///default")
    host.get_connection()
    assert conn.events == [libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE]
    host.close()
    assert conn.deregistered == [1, 2]
