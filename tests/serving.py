"""A real ``fhircrypt serve`` process for tests: started as an operator would, its JSON log lines collected."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_keyring(directory: Path) -> tuple[Path, Path]:
    ring, kek = directory / "ring.json", directory / "kek"
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "keys", "init", "--keyring", str(ring), "--generate-kek", str(kek)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return ring, kek


class Served:
    """``python -m proxy serve ARGS`` with stderr parsed line by line (JSON log lines)."""

    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, command: list[str] | None = None, port: int = 0
    ) -> None:
        self.port = port or free_port()
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        full_env = {**os.environ, "FHIRCRYPT_LISTEN": f"127.0.0.1:{self.port}", **(env or {})}
        full_env.setdefault("PYTHONPATH", str(ROOT))
        self.proc = subprocess.Popen(
            [*(command or [sys.executable, "-m", "proxy"]), "serve", *args],
            cwd=ROOT,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            self._new.put(line)
        self._new.put(None)

    def events(self) -> list[dict]:
        out = []
        for line in list(self.lines):
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"unparsed": line})
        return out

    def wait_for(self, event: str, count: int = 1, timeout: float = 60) -> list[dict]:
        """Block until ``count`` log lines with this event have been written (or fail with the log)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events() if e.get("event") == event]
            if len(found) >= count:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {count}x {event!r} in the log:\n" + "".join(self.lines[-40:]))
            try:
                if self._new.get(timeout=remaining) is None:
                    raise AssertionError(f"the process exited before {event!r}:\n" + "".join(self.lines[-40:]))
            except queue.Empty:
                pass

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def get(self, path: str) -> tuple[int, bytes]:
        return request("GET", self.url(path))

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise


def request(method: str, url: str, body: bytes | None = None, headers: dict | None = None, context=None):
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30, context=context) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
