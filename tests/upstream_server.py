"""Launch and control the test upstream FHIR R4 server (tests/upstream/server.mjs).

The server is Medplum's in-memory FHIR router behind a small node:http server,
with strict R4 validation of writes and test-only admin endpoints
(see tests/upstream/README.md).

Usage::

    from tests.upstream_server import UpstreamServer   # or: from upstream_server import ...

    with UpstreamServer() as upstream:
        upstream.base_url      # http://127.0.0.1:PORT/fhir/R4
        upstream.reset()       # empty repository + request log
        upstream.dump()        # every stored resource version (list of dicts)
        upstream.requests()    # every request the FHIR base received

Standalone (foreground, for demos)::

    python tests/upstream_server.py --port 8103

Only the standard library is used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["UPSTREAM_DIR", "UpstreamServer", "UpstreamServerError"]

UPSTREAM_DIR = Path(__file__).resolve().parent / "upstream"
FHIR_BASE_PATH = "/fhir/R4"
ADMIN_PATH = "/$admin"


def stdout_lines(proc: subprocess.Popen, name: str) -> queue.Queue[bytes | None]:
    """A child's stdout lines on a queue (None at EOF), read by a daemon thread so start-up can time out."""
    lines: queue.Queue[bytes | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, name=name, daemon=True).start()
    return lines


def stop_process(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM, SIGKILL after ``grace`` seconds, then close its stdout (shared with the benchmark)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    if proc.stdout:
        with contextlib.suppress(OSError):
            proc.stdout.close()


class UpstreamServerError(RuntimeError):
    """The upstream server could not be installed or started."""


class UpstreamServer:
    """A running instance of the test upstream FHIR server (a node child process)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        startup_timeout: float = 30.0,
        install_timeout: float = 600.0,
        node: str | None = None,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.startup_timeout = startup_timeout
        self.install_timeout = install_timeout
        self.node = node or os.environ.get("NODE") or shutil.which("node") or "node"
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._stderr_file: Any | None = None

    # ------------------------------------------------------------------ urls
    @property
    def root_url(self) -> str:
        self._require_running()
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """FHIR base, e.g. ``http://127.0.0.1:PORT/fhir/R4`` (no trailing slash)."""
        return self.root_url + FHIR_BASE_PATH

    @property
    def admin_url(self) -> str:
        """Admin base, e.g. ``http://127.0.0.1:PORT/$admin``."""
        return self.root_url + ADMIN_PATH

    # ------------------------------------------------------------- lifecycle
    @staticmethod
    def install(timeout: float = 600.0) -> None:
        """Run tests/upstream/install.sh (idempotent; fast when already installed)."""
        try:
            proc = subprocess.run(
                ["bash", str(UPSTREAM_DIR / "install.sh")],
                cwd=UPSTREAM_DIR,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise UpstreamServerError(f"install.sh timed out after {timeout}s") from exc
        if proc.returncode != 0:
            raise UpstreamServerError(
                f"install.sh failed (exit {proc.returncode}):\n{proc.stdout.decode(errors='replace')}"
            )

    @staticmethod
    def _needs_install() -> bool:
        return not (UPSTREAM_DIR / "node_modules" / ".fhircrypt-install-stamp").exists()

    def start(self) -> UpstreamServer:
        """Install if needed, launch ``node server.mjs`` and wait for ``LISTENING <port>``."""
        if self._proc is not None:
            raise UpstreamServerError("server already started")
        if self._needs_install():
            self.install(self.install_timeout)

        self._stderr_file = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
        cmd = [
            self.node,
            str(UPSTREAM_DIR / "server.mjs"),
            "--host",
            self.host,
            "--port",
            str(self.requested_port),
            # The server exits when our end of its stdin closes, so it never
            # outlives this Python process (even on SIGKILL of the tests).
            "--exit-on-stdin-close",
        ]
        try:
            self._proc = subprocess.Popen(
                cmd,
                cwd=UPSTREAM_DIR,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr_file,
            )
        except OSError as exc:
            self._close_stderr()
            raise UpstreamServerError(f"could not run {self.node!r}: {exc}") from exc

        proc = self._proc
        lines = stdout_lines(proc, "upstream-stdout")

        deadline = time.monotonic() + self.startup_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                err = self._stderr_text()
                self.stop()
                raise UpstreamServerError(
                    f"upstream server did not report LISTENING within {self.startup_timeout}s\nstderr:\n{err}"
                )
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                proc.wait(timeout=5)
                err = self._stderr_text()
                self.stop()
                raise UpstreamServerError(
                    f"upstream server exited with code {proc.returncode} before listening\nstderr:\n{err}"
                )
            text = line.decode(errors="replace").strip()
            if text.startswith("LISTENING "):
                self.port = int(text.split()[1])
                return self

    async def start_async(self) -> UpstreamServer:
        """``start()`` in a worker thread, for use from async fixtures."""
        return await asyncio.to_thread(self.start)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                if proc.stdin:
                    proc.stdin.close()
            except OSError:
                pass
            stop_process(proc, grace=5)
        self._close_stderr()
        self.port = None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> UpstreamServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.stop()

    # ---------------------------------------------------------------- admin
    def reset(self) -> None:
        """Clear the repository and the request log."""
        self._admin("POST", "reset")

    def dump(self) -> list[dict]:
        """Every resource version ever stored since the last reset (incl. old and deleted ones)."""
        return self._admin("GET", "dump")["resources"]

    def dump_all(self) -> dict:
        """Full dump: ``{"resources": [...], "deleted": [{"resourceType","id","versionId","lastUpdated"}]}``."""
        return self._admin("GET", "dump")

    def requests(self) -> list[dict]:
        """Requests received by the FHIR base since the last reset:
        ``{"method", "url" (path + raw query), "headers" (lower-case names), "body" (raw text), "status"}``."""
        return self._admin("GET", "requests")["requests"]

    # -------------------------------------------------------------- helpers
    def _admin(self, method: str, action: str) -> Any:
        req = urllib.request.Request(
            f"{self.admin_url}/{action}",
            method=method,
            data=b"" if method == "POST" else None,
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            raise UpstreamServerError(
                f"admin {action} failed: HTTP {exc.code}: {exc.read().decode(errors='replace')}"
            ) from exc

    def _require_running(self) -> None:
        if self.port is None:
            raise UpstreamServerError("upstream server is not running (call start())")

    def _stderr_text(self) -> str:
        f = self._stderr_file
        if f is None:
            return ""
        try:
            f.seek(0)
            return f.read().decode(errors="replace")
        except (OSError, ValueError):
            return ""

    def _close_stderr(self) -> None:
        if self._stderr_file is not None:
            with contextlib.suppress(OSError):
                self._stderr_file.close()
            self._stderr_file = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the test upstream FHIR R4 server in the foreground.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8103, help="0 picks a free port (default 8103)")
    args = parser.parse_args(argv)

    server = UpstreamServer(args.host, args.port)
    try:
        server.start()
    except UpstreamServerError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(server.base_url, flush=True)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.is_set() and server.is_running():
            stop.wait(0.5)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
