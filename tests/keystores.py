"""Real key stores for the key-provider tests: a SoftHSM2 token, moto_server (AWS KMS) and a
stand-in Vault that speaks the Transit endpoints fhircrypt uses and records every exchange.

The fixtures are made available to every test module by ``tests/conftest.py``.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PIN = "4815-1623-42"  # the test token's user PIN; never expected in any output
SO_PIN = "so-pin-not-used-by-fhircrypt"
TOKEN = "fhircrypt-test"


def softhsm_module() -> str:
    for candidate in ("/usr/lib/softhsm/libsofthsm2.so", *glob.glob("/usr/lib/*/softhsm/libsofthsm2.so")):
        if os.path.exists(candidate):
            return candidate
    pytest.fail("SoftHSM2 is not installed: ./dev test installs it (apt-get install softhsm2)")


def init_softhsm(directory: Path) -> dict[str, str]:
    """A fresh SoftHSM2 token store in ``directory``; returns the environment that selects it."""
    tokens = directory / "tokens"
    tokens.mkdir(parents=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", TOKEN, "--pin", PIN, "--so-pin", SO_PIN],
        env=env,
        check=True,
        capture_output=True,
    )
    return {"SOFTHSM2_CONF": str(conf)}


def generate_hsm_key(module: str, label: str) -> None:
    """An AES-256 key on the token as an HSM administrator would create it: sensitive, not extractable."""
    import pkcs11
    from pkcs11 import Attribute, KeyType

    from proxy.keymgmt.providers.hsm import _library

    token = _library(module).get_token(token_label=TOKEN)
    with token.open(user_pin=PIN, rw=True) as session:
        template = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False}
        session.generate_key(KeyType.AES, 256, label=label, store=True, template=template)
    assert pkcs11  # imported for its side effect of checking the SDK is there


@dataclass
class SoftHsm:
    module: str
    directory: Path
    env: dict[str, str]  # SOFTHSM2_CONF for subprocesses
    pin_file: Path

    def config(self, key_label: str = "kek-a") -> dict[str, str]:
        return {"type": "pkcs11", "module": self.module, "token_label": TOKEN, "key_label": key_label}

    def flags(self, key_label: str = "kek-a", prefix: str = "") -> list[str]:
        return [
            f"--{prefix}key-provider",
            "pkcs11",
            f"--{prefix}pkcs11-module",
            self.module,
            f"--{prefix}pkcs11-token-label",
            TOKEN,
            f"--{prefix}pkcs11-key-label",
            key_label,
        ]


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory) -> SoftHsm:
    """One token per test session (SoftHSM reads SOFTHSM2_CONF once per process) with keys kek-a and kek-b."""
    if not shutil.which("softhsm2-util"):
        pytest.fail("SoftHSM2 is not installed: ./dev test installs it (apt-get install softhsm2)")
    module = softhsm_module()
    directory = tmp_path_factory.mktemp("softhsm")
    env = init_softhsm(directory)
    os.environ.update(env)  # before this process loads the library
    for label in ("kek-a", "kek-b"):
        generate_hsm_key(module, label)
    pin_file = directory / "pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    return SoftHsm(module, directory, env, pin_file)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, deadline: float = 60.0) -> None:
    until = time.monotonic() + deadline
    while time.monotonic() < until:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-access-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "ap-southeast-3",
}


@dataclass
class Kms:
    endpoint: str
    env: dict[str, str]

    def client(self):
        import boto3

        return boto3.client(
            "kms",
            endpoint_url=self.endpoint,
            region_name=self.env["AWS_DEFAULT_REGION"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
        )

    def new_key(self) -> str:
        return self.client().create_key(Description="fhircrypt test KEK")["KeyMetadata"]["KeyId"]

    def config(self, key_id: str) -> dict[str, str]:
        return {"type": "aws-kms", "key_id": key_id, "endpoint": self.endpoint}


@pytest.fixture(scope="session")
def kms() -> Kms:
    """moto_server as a real HTTP server on a free local port."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **AWS_TEST_ENV},
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(endpoint + "/moto-api/", process)
        yield Kms(endpoint, dict(AWS_TEST_ENV))
    finally:
        process.terminate()
        process.wait(timeout=10)


VAULT_TOKEN = "hvs.stand-in-token-never-printed"


@dataclass
class Exchange:
    method: str
    path: str
    headers: dict[str, str]
    body: dict | None


@dataclass
class VaultStandIn:
    """Transit's encrypt, decrypt and read-key endpoints, with real AES-GCM behind them."""

    token: str = VAULT_TOKEN
    namespace: str | None = None
    fail_with: int | None = None  # answer every request with this status (403, 500, 503)
    keys: dict[str, bytes] = field(default_factory=dict)
    exchanges: list[Exchange] = field(default_factory=list)
    address: str = ""

    def key(self, mount: str, name: str) -> bytes:
        return self.keys.setdefault(f"{mount}/{name}", AESGCM.generate_key(256))

    def answer(self, method: str, path: str, headers: dict[str, str], body: dict | None) -> tuple[int, dict]:
        self.exchanges.append(Exchange(method, path, headers, body))
        if self.fail_with == 503:
            return 503, {"errors": ["Vault is sealed"]}
        if self.fail_with:
            return self.fail_with, {"errors": ["stand-in failure"]}
        if headers.get("X-Vault-Token") != self.token or headers.get("X-Vault-Namespace") != self.namespace:
            return 403, {"errors": ["permission denied"]}
        parts = path.strip("/").split("/")
        if len(parts) < 4 or parts[0] != "v1":
            return 404, {"errors": []}
        mount, action, name = "/".join(parts[1:-2]), parts[-2], parts[-1]
        if (method, action) == ("GET", "keys"):
            if f"{mount}/{name}" not in self.keys:
                return 404, {"errors": []}
            return 200, {"data": {"type": "aes256-gcm96", "name": name}}
        aead = AESGCM(self.key(mount, name))
        aad = base64.b64decode(body.get("associated_data", "")) if body else b""
        if (method, action) == ("POST", "encrypt"):
            nonce = os.urandom(12)
            sealed = aead.encrypt(nonce, base64.b64decode(body["plaintext"]), aad)
            return 200, {"data": {"ciphertext": "vault:v1:" + base64.b64encode(nonce + sealed).decode()}}
        if (method, action) == ("POST", "decrypt"):
            raw = base64.b64decode(body["ciphertext"].removeprefix("vault:v1:"))
            try:
                plain = aead.decrypt(raw[:12], raw[12:], aad)
            except InvalidTag:
                return 400, {"errors": ["cipher: message authentication failed"]}
            return 200, {"data": {"plaintext": base64.b64encode(plain).decode()}}
        return 405, {"errors": []}

    def config(self, key: str = "fhircrypt", mount: str = "transit") -> dict[str, str]:
        config = {"type": "vault", "address": self.address, "key": key, "mount": mount}
        if self.namespace:
            config["namespace"] = self.namespace
        return config


@pytest.fixture
def vault():
    """A fresh stand-in per test, on its own port, so each test sees only its own exchanges."""
    standin = VaultStandIn()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            status, answer = standin.answer(self.command, self.path, dict(self.headers), body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    standin.address = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield standin
    server.shutdown()
    server.server_close()
