"""How this host's migrations travel: encrypted unless a test setup says otherwise by name.

A migration has two channels. libvirt's control channel is the URI a target node publishes
(``qemu+tls://<address>/system``); QEMU's data stream (guest memory, and the disks over NBD) is
encrypted only with ``VIR_MIGRATE_TLS``, which the hosts' ``migrate_tls_force`` makes mandatory.
Both use the hosts' libvirt certificates. A cold migration's disks come over the control channel, opened
by the agent itself: it names its own client certificates with ``pkipath``.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.parse

import libvirt

from kubenova.driver.base import InvalidInstanceSpec

#: Control channels whose traffic libvirt encrypts.
ENCRYPTED = ("qemu+tls", "qemu+ssh", "qemu+libssh", "qemu+libssh2")


@dataclasses.dataclass(frozen=True)
class MigrationTransport:
    """The agent's ``--migration-pki-dir`` and ``--insecure-migration``."""

    #: A libvirt client's certificate folder (cacert.pem, clientcert.pem, clientkey.pem); None: libvirt's
    #: defaults (/etc/pki/CA and /etc/pki/libvirt).
    pki_dir: str | os.PathLike[str] | None = None
    #: Test setups only: a plain ``qemu+tcp`` peer, and QEMU's stream without TLS.
    insecure: bool = False

    def check(self, uri: str) -> urllib.parse.SplitResult:
        """``uri`` (another node published it) split, or refused when it would carry a guest in clear text
        without ``insecure``, or would choose how this side connects."""
        parts = urllib.parse.urlsplit(uri)
        if not parts.hostname:
            raise InvalidInstanceSpec("targetNode", f"{uri!r} names no host to migrate to or from")
        if parts.scheme not in ENCRYPTED and not self.insecure:
            raise InvalidInstanceSpec(
                "targetNode",
                f"{uri!r} would migrate in clear text: publish a qemu+tls URI (the agent's --migration-uri), "
                "or start the agents with --insecure-migration on a test setup",
            )
        if parts.query:
            # no_verify, pkipath, socket, command, keyfile...: each lets the publisher choose how this
            # side connects or verifies it. How a client connects is the client's own setting.
            raise InvalidInstanceSpec(
                "targetNode",
                f"{uri!r} carries parameters: a migration URI names only the scheme, host and /system "
                "(this side's certificates are its agent's --migration-pki-dir)",
            )
        return parts

    def flags(self) -> int:
        """The migration flags for QEMU's data stream."""
        return 0 if self.insecure else libvirt.VIR_MIGRATE_TLS

    def client_uri(self, uri: str) -> str:
        """``uri`` as this process opens it: with its own certificates for a TLS peer."""
        parts = self.check(uri)
        if self.pki_dir is None or parts.scheme != "qemu+tls":
            return uri
        query = urllib.parse.urlencode({"pkipath": os.fspath(self.pki_dir)}, safe="/")
        return parts._replace(query=query).geturl()
