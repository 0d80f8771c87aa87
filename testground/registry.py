"""The test ground's container registry, for containerDisk imports and snapshot pushes.

Debian's ``docker-registry`` (the CNCF distribution registry 2.8), run as a process of our own
(``docker-registry serve CONFIG``): its Debian service is never used. It speaks TLS with a certificate
from the test ground's CA (``pki.server_certificate``) and asks for a user and password (an htpasswd
file, bcrypt-hashed with pyca's ``bcrypt``: Apache's htpasswd tool is not needed), or, as the large
public registries do, for a bearer token from a token server (``TokenAuth``: the registry names the
server in its 401, and checks the tokens' signatures against the server's certificate).
"""

from __future__ import annotations

import dataclasses
import pathlib
import secrets
import shutil
import ssl
import urllib.error
import urllib.request

import bcrypt
import yaml

from testground import pki, procs
from testground.procs import Layout, TestGroundError

BINARY = "docker-registry"


@dataclasses.dataclass(frozen=True)
class Registry:
    """A running registry: where it listens, who may use it, and the CA its certificate comes from."""

    address: str  # host:port, as a reference names it
    folder: pathlib.Path
    user: str
    password: str
    ca: pathlib.Path
    name: str = "registry"


@dataclasses.dataclass(frozen=True)
class TokenAuth:
    """The registry's ``auth.token`` section: where clients get tokens, and whose signature it trusts."""

    realm: str  # the token server's URL
    service: str
    issuer: str
    rootcertbundle: pathlib.Path  # the certificate (PEM) the tokens' x5c chain must lead to


def htpasswd_line(user: str, password: str) -> str:
    """One line of an htpasswd file in the only scheme the registry reads: bcrypt."""
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=10)).decode()
    return f"{user}:{hashed}\n"


def write_config(
    folder: pathlib.Path,
    address: str,
    cert: pathlib.Path,
    key: pathlib.Path,
    htpasswd: pathlib.Path,
    token: TokenAuth | None = None,
) -> pathlib.Path:
    """The registry's config.yml: blobs under ``folder``/data, TLS, htpasswd (or token) authentication."""
    auth: dict[str, object] = {"htpasswd": {"realm": "kubenova test ground", "path": str(htpasswd)}}
    if token:
        auth = {"token": {**dataclasses.asdict(token), "rootcertbundle": str(token.rootcertbundle)}}
    config = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text"},
        "storage": {
            "filesystem": {"rootdirectory": str(folder / "data")},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {
            "addr": address,
            "secret": secrets.token_hex(16),
            "tls": {"certificate": str(cert), "key": str(key)},
        },
        "auth": auth,
    }
    path = folder / "config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start(
    layout: Layout,
    folder: pathlib.Path,
    address: str,
    user: str = "kubenova",
    password: str | None = None,
    name: str = "registry",
    token: TokenAuth | None = None,
) -> Registry:
    """Start the registry at ``address`` (``ip:port``) with its state in ``folder``; ready when it answers."""
    if shutil.which(BINARY) is None:
        raise TestGroundError(
            f"{BINARY} not found; run hack/install-deps.sh (or: apt-get install docker-registry)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    host = address.rsplit(":", 1)[0]
    certificate = pki.server_certificate(layout, name, host, folder / "tls")
    password = password or secrets.token_urlsafe(12)
    htpasswd = folder / "htpasswd"
    htpasswd.write_text(htpasswd_line(user, password))
    config = write_config(folder, address, certificate.cert, certificate.key, htpasswd, token)
    procs.stop(layout, name)
    procs.start(layout, name, [BINARY, "serve", str(config)], marker=str(config))
    registry = Registry(address, folder, user, password, certificate.ca, name)
    procs.wait_for(lambda: _answers(registry), 20, f"the registry at {address}", layout.logfile(name))
    return registry


def stop(layout: Layout, registry: Registry) -> bool:
    """Stop it; its blobs stay in its folder."""
    return procs.stop(layout, registry.name)


def _answers(registry: Registry) -> bool:
    """Whether the registry answers its API root (401 without credentials is an answer)."""
    context = ssl.create_default_context(cafile=str(registry.ca))
    try:
        urllib.request.urlopen(f"https://{registry.address}/v2/", context=context, timeout=2)
    except urllib.error.HTTPError as exc:
        return exc.code == 401
    except OSError:
        return False
    return True
