"""A real ``fhircrypt serve`` process for the adversarial suite, and a plain HTTP client for it.

A separate process (not an in-process test server) because the suite needs what only a
process has: raw sockets speaking broken HTTP to the real listener, the process's RSS
and file descriptors for the soak, and resource limits (RLIMIT_FSIZE) for a full disk.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from proxy.keymgmt.keyring import Keyring, save_keyring
from proxy.keymgmt.providers.local import LocalKeyProvider, generate_kek, parse_kek
from tests.conftest import DEPLOYMENT, ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return orjson.loads(self.body)


class ServedProxy:
    """``python -m proxy serve`` on a free port, configured through FHIRCRYPT_* variables."""

    def __init__(
        self,
        upstream: str,
        policy: str = "policies/satusehat.yaml",
        *,
        env: dict[str, str] | None = None,
        fsize_limit: int | None = None,
        settings: dict | None = None,
    ) -> None:
        self.port = free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="fhircrypt-adv-")
        self.dir = Path(self._tmp.name)
        kek = generate_kek()
        (self.dir / "kek.txt").write_text(kek)
        save_keyring(self.dir / "keyring.json", Keyring.generate(), LocalKeyProvider(parse_kek(kek)))
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": str(ROOT),
            "FHIRCRYPT_UPSTREAM": upstream,
            "FHIRCRYPT_POLICY": str(ROOT / policy),
            "FHIRCRYPT_LISTEN": f"127.0.0.1:{self.port}",
            "FHIRCRYPT_KEYRING": str(self.dir / "keyring.json"),
            "FHIRCRYPT_KEK_FILE": str(self.dir / "kek.txt"),
            "FHIRCRYPT_AUTH": "none",
            "FHIRCRYPT_LOG_LEVEL": "info",
            **DEPLOYMENT,  # the shipped policies' deployment variables
            **(env or {}),
        }
        self.fsize_limit = fsize_limit
        if fsize_limit is not None:
            # a file-size limit would also cut the .pyc files the child writes on a fresh checkout,
            # leaving truncated bytecode that breaks every later Python process
            self.env["PYTHONDONTWRITEBYTECODE"] = "1"
        self.command = [sys.executable, "-m", "proxy", "serve"]
        if settings is not None:  # every Settings field, through tests/adversarial/launch.py
            base = {"upstream": upstream, "policy": str(ROOT / policy), "keyring": self.env["FHIRCRYPT_KEYRING"]}
            base |= {"kek_file": self.env["FHIRCRYPT_KEK_FILE"], "listen": ("127.0.0.1", self.port), "auth": "none"}
            self.command = [sys.executable, "-m", "tests.adversarial.launch", orjson.dumps(base | settings).decode()]
        self._log: list[bytes] = []
        self.proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ServedProxy:
        limit = self.fsize_limit

        def limits() -> None:  # in the child only: the proxy's files may not grow beyond ``limit``
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))  # soft: can be lifted

        self.proc = subprocess.Popen(
            self.command,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,  # a pipe, not a file: RLIMIT_FSIZE must hit the audit trail only
            preexec_fn=limits,  # no threads in the child before exec
        )
        pipe = self.proc.stderr
        threading.Thread(target=lambda: self._log.extend(iter(pipe.readline, b"")), daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                if self.request("GET", "/healthz").status == 200:
                    return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"fhircrypt serve did not start:\n{self.stderr()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
            self.proc = None

    def stderr(self) -> str:
        """Everything the proxy logged so far (JSON lines)."""
        return b"".join(self._log).decode(errors="replace")

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Reply:
        """One request on a fresh connection; the path is sent exactly as given."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def raw(self, data: bytes, quiet: float = 1.5) -> bytes:
        """Send raw bytes and return what the proxy answers until it closes or stays quiet ``quiet`` s.

        The sending side stays open: a server may drop a request whose client half-closed.
        """
        with socket.create_connection(("127.0.0.1", self.port), timeout=quiet) as s:
            with contextlib.suppress(OSError):
                s.sendall(data)
            chunks = []
            with contextlib.suppress(TimeoutError, ConnectionResetError):
                while chunk := s.recv(65536):
                    chunks.append(chunk)
            return b"".join(chunks)

    def __enter__(self) -> ServedProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._tmp.cleanup()


def rss_and_fds(pid: int) -> tuple[int, int]:
    """Resident set size in bytes and the number of open file descriptors of ``pid`` (Linux /proc)."""
    with open(f"/proc/{pid}/statm") as fh:
        rss_pages = int(fh.read().split()[1])
    return rss_pages * os.sysconf("SC_PAGE_SIZE"), len(os.listdir(f"/proc/{pid}/fd"))
