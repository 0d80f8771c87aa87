"""Registries that want bearer tokens (Docker Hub, Harbor, GitLab, quay.io do): a real docker-registry in
token mode, and a token server here that signs what the registry checks (RS256, its certificate in x5c)."""

from __future__ import annotations

import base64
import http.server
import json
import pathlib
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from Crypto.Hash import SHA256
from Crypto.PublicKey import RSA
from Crypto.Signature import pkcs1_15

from kubenova.driver.errors import ImageUnauthorized
from kubenova.driver.imports import Credentials, Importer
from testground import pki, registry
from testground.procs import Layout
from tests.unit.import_harness import qcow2_image

SERVICE, ISSUER = "kubenova-test-registry", "kubenova-test-tokens"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer(http.server.ThreadingHTTPServer):
    """Grants every scope asked to one user and password; counts the tokens it gave."""

    daemon_threads = True

    def __init__(self, key: RSA.RsaKey, cert_der: bytes, user: str, password: str) -> None:
        super().__init__(("127.0.0.1", 0), TokenHandler)
        self.key, self.cert_der, self.basic = key, cert_der, f"{user}:{password}"
        self.issued: list[list[str]] = []

    def token(self, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self.cert_der).decode()]}
        claims = {"iss": ISSUER, "sub": "kubenova", "aud": SERVICE, "iat": now, "nbf": now - 10}
        claims |= {"exp": now + 300, "jti": str(now), "access": access}
        signed = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        signature = pkcs1_15.new(self.key).sign(SHA256.new(signed.encode()))
        return f"{signed}.{b64url(signature)}"


class TokenHandler(http.server.BaseHTTPRequestHandler):
    server: TokenServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        given = self.headers.get("Authorization", "")
        if given != "Basic " + base64.b64encode(self.server.basic.encode()).decode():
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        scopes = query.get("scope", [])
        self.server.issued.append(scopes)
        body = json.dumps({"token": self.server.token(scopes)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[registry.Registry, TokenServer]]:
    tmp = tmp_path_factory.mktemp("bearer")
    layout = Layout(tmp / "state", tmp / "cache")
    signing = tmp / "signing"
    signing.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out", "cert.pem",
         "-days", "1", "-subj", "/CN=kubenova test token issuer"],
        cwd=signing, check=True, capture_output=True,
    )  # fmt: skip
    der = ssl.PEM_cert_to_DER_cert((signing / "cert.pem").read_text())
    tokens = TokenServer(RSA.import_key((signing / "key.pem").read_bytes()), der, "robot", "s3cret")
    tls = pki.server_certificate(layout, "tokens", "127.0.0.1", tmp / "tokens-tls")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.cert, tls.key)
    tokens.socket = context.wrap_socket(tokens.socket, server_side=True)
    threading.Thread(target=tokens.serve_forever, daemon=True).start()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    auth = registry.TokenAuth(
        f"https://127.0.0.1:{tokens.server_address[1]}/token", SERVICE, ISSUER, signing / "cert.pem"
    )
    running = registry.start(
        layout, tmp / "registry", f"127.0.0.1:{port}", token=auth, name="bearer-registry"
    )
    yield running, tokens
    registry.stop(layout, running)
    tokens.shutdown()


def test_a_push_and_a_pull_get_tokens_from_the_realm_the_registry_names(
    setup: tuple[registry.Registry, TokenServer], tmp_path: pathlib.Path
) -> None:
    running, tokens = setup
    disk = tmp_path / "disk.qcow2"
    qcow2_image(disk, 1)
    auth = Credentials("robot", "s3cret", ca_pem=running.ca.read_bytes())
    importer = Importer(tmp_path / "cache", max_bytes=64 << 20, retries=0)
    digest = importer.push_oci(disk, f"{running.address}/kubenova/tokened:v1", auth)
    path = importer.fetch_oci(f"{running.address}/kubenova/tokened@{digest}", auth)
    assert path.read_bytes() == disk.read_bytes()
    # One token for the push, one for the pull (the registry lists the actions in no fixed order).
    granted = [
        {(s.rsplit(":", 1)[0], frozenset(s.rsplit(":", 1)[1].split(","))) for s in i} for i in tokens.issued
    ]
    repository = "repository:kubenova/tokened"
    assert granted == [{(repository, frozenset({"push", "pull"}))}, {(repository, frozenset({"pull"}))}]
    with pytest.raises(ImageUnauthorized) as failed:  # the token server refuses a wrong password
        Importer(tmp_path / "other", max_bytes=64 << 20).fetch_oci(
            f"{running.address}/kubenova/tokened@{digest}", Credentials("robot", "wrong", ca_pem=auth.ca_pem)
        )
    assert "fix the username and password" in failed.value.message
