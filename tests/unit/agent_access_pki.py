"""Certificates for the agent's access server tests, made with the openssl command line as the test ground's
are (testground/pki.py): the access CA, the node's server certificate (its DNS name the node's), the
access API server's client certificate, and what an attacker might hold: a client certificate of the same
CA with another name, and one of another CA with the right name."""

from __future__ import annotations

import dataclasses
import pathlib
import ssl
import subprocess

NODE = "node-a"
CLIENT = "kubenova-access"


def _openssl(*args: str, cwd: pathlib.Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {proc.stderr.strip()}")


def _key(name: str, cwd: pathlib.Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", name, cwd=cwd)


def _ca(folder: pathlib.Path, name: str) -> None:
    _key(f"{name}.key", folder)
    _openssl(
        "req", "-x509", "-new", "-key", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
        "-subj", f"/CN={name}", cwd=folder,
    )  # fmt: skip


def _issue(folder: pathlib.Path, ca: str, name: str, cn: str, extensions: str) -> None:
    """``name``.pem and ``name``.key: a certificate for ``cn`` signed by ``ca``, with ``extensions``."""
    _key(f"{name}.key", folder)
    _openssl("req", "-new", "-key", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=folder)
    (folder / f"{name}.ext").write_text(extensions)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=folder,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class AccessPKI:
    folder: pathlib.Path

    @property
    def ca(self) -> str:
        return str(self.folder / "access-ca.pem")

    @property
    def server(self) -> tuple[str, str]:
        return str(self.folder / "server.pem"), str(self.folder / "server.key")

    def client_context(self, client: str | None = "client") -> ssl.SSLContext:
        """What a client uses: the access CA to check the node, ``client``'s certificate (None: none)."""
        context = ssl.create_default_context(cafile=self.ca)
        if client is not None:
            context.load_cert_chain(self.folder / f"{client}.pem", self.folder / f"{client}.key")
        return context


def make(folder: pathlib.Path) -> AccessPKI:
    """The access CA and another CA, the node's server certificate and three client certificates:
    ``client`` (the access API server's), ``other-name`` (same CA, another name) and ``other-ca``."""
    folder.mkdir(parents=True, exist_ok=True)
    _ca(folder, "access-ca")
    _ca(folder, "other-ca-root")
    server = f"subjectAltName=DNS:{NODE}\nextendedKeyUsage=serverAuth\n"
    client = "extendedKeyUsage=clientAuth\n"
    _issue(folder, "access-ca", "server", NODE, server)
    _issue(folder, "access-ca", "client", CLIENT, client)
    _issue(folder, "access-ca", "other-name", "kubenova-agent", client)
    _issue(folder, "other-ca-root", "other-ca", CLIENT, client)
    return AccessPKI(folder)
