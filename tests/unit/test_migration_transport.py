"""What the agent lets a migration travel over: encrypted channels, unless a test setup names the
insecure setting."""

from __future__ import annotations

import urllib.parse

import libvirt
import pytest

from kubenova.driver.base import InvalidInstanceSpec
from kubenova.driver.libvirt.transport import MigrationTransport


def test_a_plain_tcp_peer_is_refused_naming_the_fix() -> None:
    with pytest.raises(InvalidInstanceSpec) as refused:
        MigrationTransport().check("qemu+tcp://10.0.0.2/system")
    assert "clear text" in str(refused.value) and "--insecure-migration" in str(refused.value)
    with pytest.raises(InvalidInstanceSpec, match="names no host"):
        MigrationTransport().check("qemu+tls:///system")


def test_the_stream_is_encrypted_unless_insecure_is_named() -> None:
    assert MigrationTransport().flags() == libvirt.VIR_MIGRATE_TLS
    insecure = MigrationTransport(insecure=True)
    assert insecure.flags() == 0
    assert insecure.check("qemu+tcp://10.0.0.2/system").hostname == "10.0.0.2"


@pytest.mark.parametrize(
    "query",
    ["no_verify=1", "pkipath=/tmp/evil", "socket=/run/other", "command=/bin/sh", "keyfile=/root/.ssh/id"],
)
def test_a_published_uri_cannot_choose_how_this_side_connects(query: str) -> None:
    """The other node publishes the URI; how this side verifies it, and with what, is this side's choice."""
    with pytest.raises(InvalidInstanceSpec, match="carries parameters"):
        MigrationTransport("/etc/kubenova/pki").client_uri(f"qemu+tls://10.0.0.2/system?{query}")


def test_the_agent_names_its_own_certificates() -> None:
    uri = MigrationTransport("/etc/kubenova/pki").client_uri("qemu+tls://10.0.0.2/system")
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(uri).query) == {"pkipath": ["/etc/kubenova/pki"]}
    assert MigrationTransport().client_uri("qemu+tls://10.0.0.2/system") == "qemu+tls://10.0.0.2/system"
    assert MigrationTransport("/p").client_uri("qemu+ssh://h/system") == "qemu+ssh://h/system"
