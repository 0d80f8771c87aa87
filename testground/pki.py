"""The test ground's certificates: one CA, and per libvirtd host a key and a certificate for
its address, laid out where libvirtd and QEMU look for them (the host's /etc/pki), so that every
migration between test hosts runs over TLS as production does (``qemu+tls`` and ``VIR_MIGRATE_TLS``);
and a certificate for each test server that speaks HTTPS (the registry, the file server).

Made with the openssl command line once per test ground; a host's files are remade when its address
changes.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import subprocess

from testground.procs import Layout, TestGroundError

#: Where a host's libvirtd (server and peer-to-peer client) and QEMU (migration stream) read each file.
SERVER_FILES = {
    "CA/cacert.pem": "ca",
    "libvirt/servercert.pem": "cert",
    "libvirt/private/serverkey.pem": "key",
    "libvirt/clientcert.pem": "cert",
    "libvirt/private/clientkey.pem": "key",
    "qemu/ca-cert.pem": "ca",
    "qemu/server-cert.pem": "cert",
    "qemu/server-key.pem": "key",
    "qemu/client-cert.pem": "cert",
    "qemu/client-key.pem": "key",
}
#: A libvirt client's own folder (the ``pkipath`` of a URI): what the agent uses to fetch a cold
#: migration's disks from another host.
CLIENT_FILES = {"cacert.pem": "ca", "clientcert.pem": "cert", "clientkey.pem": "key"}


def _openssl(*args: str, cwd: pathlib.Path) -> None:
    if shutil.which("openssl") is None:
        raise TestGroundError("openssl not found; run hack/install-deps.sh (or: apt-get install openssl)")
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise TestGroundError(f"openssl {args[0]} failed: {proc.stderr.strip()}")


def _ca(layout: Layout) -> pathlib.Path:
    folder = layout.state / "migration-ca"  # not kube.ensure_pki's folder: its CA is another
    if not (folder / "ca.pem").exists():
        folder.mkdir(parents=True, exist_ok=True)
        _openssl("genrsa", "-out", "ca.key", "2048", cwd=folder)
        _openssl(
            "req", "-x509", "-new", "-key", "ca.key", "-out", "ca.pem", "-days", "3650",
            "-subj", "/O=kubenova test ground/CN=kubenova test CA", cwd=folder,
        )  # fmt: skip
    return folder


def issue(layout: Layout, node: str, address: str, host: pathlib.Path) -> None:
    """The key and certificate of the libvirtd ``node`` at ``address`` (valid as server and as client, as
    each host is both in a peer-to-peer migration), copied into ``host``/pki for its /etc/pki and into
    ``client_dir``."""
    ca = _ca(layout)
    folder = host / "cert"
    _certificate(ca, folder, node, address)
    sources = {"ca": ca / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem"}
    for root, files in ((host / "pki", SERVER_FILES), (client_dir(host), CLIENT_FILES)):
        for name, kind in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sources[kind], root / name)
            (root / name).chmod(0o600 if kind == "key" else 0o644)


def server_certificate(layout: Layout, name: str, address: str, folder: pathlib.Path) -> ServerCertificate:
    """A key and certificate for a test server (the registry, the file server) at ``address``, signed by
    the test ground's CA (``layout``'s: a test's own layout gives a CA of its own)."""
    ca = _ca(layout)
    _certificate(ca, folder, name, address)
    return ServerCertificate(folder / "cert.pem", folder / "key.pem", ca / "ca.pem")


@dataclasses.dataclass(frozen=True)
class ServerCertificate:
    cert: pathlib.Path
    key: pathlib.Path
    ca: pathlib.Path


def _certificate(ca: pathlib.Path, folder: pathlib.Path, name: str, address: str) -> None:
    """``folder``/cert.pem and key.pem for ``name`` at the IP ``address``, remade when the address changes."""
    stamp = folder / "address"
    if stamp.exists() and stamp.read_text() == address:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "ext.cnf").write_text(
        f"subjectAltName = IP:{address}, DNS:{name}\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth, clientAuth\n"
    )
    _openssl("genrsa", "-out", "key.pem", "2048", cwd=folder)
    _openssl(
        "req", "-new", "-key", "key.pem", "-out", "req.csr", "-subj", f"/O=kubenova/CN={name}", cwd=folder
    )
    _openssl(
        "x509", "-req", "-in", "req.csr", "-CA", str(ca / "ca.pem"), "-CAkey", str(ca / "ca.key"),
        "-CAcreateserial", "-out", "cert.pem", "-days", "3650", "-extfile", "ext.cnf", cwd=folder,
    )  # fmt: skip
    stamp.write_text(address)


def client_dir(host: pathlib.Path) -> pathlib.Path:
    """The folder a libvirt client on this host names as ``pkipath``."""
    return host / "pki-client"
