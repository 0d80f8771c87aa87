"""What the agent lets a migration travel over: encrypted channels, unless a test setup names the
insecure setting; and the flags and parameters of its rate and convergence."""

from __future__ import annotations

import urllib.parse

import libvirt
import pytest

from kubenova.driver.base import Convergence, InvalidInstanceSpec
from kubenova.driver.libvirt.migration import transfer_options
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


def test_a_transfer_is_capped_in_pre_copy_and_post_copy_alike() -> None:
    """QEMU's post-copy is unlimited unless told: the user's cap would stop at the switch."""
    flags, params = transfer_options(8, Convergence(post_copy=True))
    assert flags == libvirt.VIR_MIGRATE_POSTCOPY
    assert params == {libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: 8, libvirt.VIR_MIGRATE_PARAM_BANDWIDTH_POSTCOPY: 8}


def test_auto_converge_starts_high_and_steps_fast() -> None:
    flags, params = transfer_options(None, Convergence(auto_converge=True))
    assert flags == libvirt.VIR_MIGRATE_AUTO_CONVERGE
    assert params == {
        libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL: Convergence.THROTTLE_INITIAL,
        libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT: Convergence.THROTTLE_STEP,
    }
    assert Convergence.THROTTLE_INITIAL > 20 and Convergence.THROTTLE_STEP > 10  # above QEMU's own


def test_without_convergence_a_transfer_is_plain_pre_copy() -> None:
    assert transfer_options(None, Convergence()) == (0, {})
    assert transfer_options(4, Convergence()) == (0, {libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: 4})
