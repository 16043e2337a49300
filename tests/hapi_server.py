"""Build, launch and read the second test upstream: HAPI FHIR's JPA server (tests/hapi/).

HAPI runs as ``java -jar tests/hapi/target/hapi-test-server.jar`` on an in-memory H2 database,
on a free port that its own start-up line reports, with a bounded heap. Every failure names the
step that failed (build, launch, start-up, metadata), so a broken HAPI half of the suite fails
loudly instead of being skipped.

Usage::

    from tests.hapi_server import HapiServer

    with HapiServer() as hapi:
        hapi.base_url      # http://127.0.0.1:PORT/fhir
        hapi.reset()       # $expunge everything: an empty server
        hapi.dump()        # every stored version of every resource, read through HAPI's REST API
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

from tests.upstream_server import stdout_lines, stop_process

__all__ = ["HAPI_DIR", "HapiServer", "HapiServerError"]

HAPI_DIR = Path(__file__).resolve().parent / "hapi"
JAR = HAPI_DIR / "target" / "hapi-test-server.jar"
STARTED = re.compile(rb"Tomcat started on port (\d+)")
HEAP = os.environ.get("FHIRCRYPT_HAPI_HEAP", "768m")


class HapiServerError(RuntimeError):
    """The HAPI test upstream could not be built or started; the message names the step."""


class HapiServer:
    """A running HAPI FHIR JPA server (a java child process that exits when our end of its stdin closes)."""

    def __init__(
        self, *, startup_timeout: float = 420.0, build_timeout: float = 1800.0, fast_startup: bool = True
    ) -> None:
        """``fast_startup``: the JIT stops at C1, which starts sooner but serves slower once warm; the
        benchmark turns it off to measure HAPI as a deployment runs it."""
        self.startup_timeout = startup_timeout
        self.fast_startup = fast_startup
        self.build_timeout = build_timeout
        self.port: int | None = None
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        """FHIR base, ``http://127.0.0.1:PORT/fhir`` (no trailing slash)."""
        if self.port is None:
            raise HapiServerError("the HAPI test upstream is not running (call start())")
        return f"http://127.0.0.1:{self.port}/fhir"

    # ------------------------------------------------------------- lifecycle
    def build(self) -> None:
        """tests/hapi/build.sh: a no-op when the jar is newer than its sources."""
        try:
            proc = subprocess.run(
                ["bash", str(HAPI_DIR / "build.sh")],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=self.build_timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise HapiServerError(f"step 'build' (tests/hapi/build.sh) timed out after {self.build_timeout}s") from exc
        if proc.returncode != 0:
            out = (proc.stdout + proc.stderr).decode(errors="replace")[-6000:]
            raise HapiServerError(f"step 'build' (tests/hapi/build.sh) failed with exit {proc.returncode}:\n{out}")

    def start(self) -> HapiServer:
        """Build if needed, launch the jar, wait for its port and for ``/fhir/metadata`` to answer."""
        self.build()
        java = shutil.which("java")
        if java is None:
            raise HapiServerError("step 'launch': no 'java' on PATH (Java 17+ is needed)")
        started = time.monotonic()
        cmd = [
            java,
            f"-Xmx{HEAP}",
            "-XX:+UseSerialGC",  # two cores shared with everything else: no parallel GC threads
            *(["-XX:TieredStopAtLevel=1"] if self.fast_startup else []),  # start-up dominates a test run
            "-Dfhircrypt.exitOnStdinClose=true",
            "-jar",
            str(JAR),
            "--server.port=0",
        ]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.port = self._wait_for_port(started + self.startup_timeout)
        self._wait_for_metadata(started + self.startup_timeout)
        self.startup_seconds = time.monotonic() - started
        return self

    def _wait_for_port(self, deadline: float) -> int:
        assert self._proc is not None
        lines = stdout_lines(self._proc, "hapi-stdout")
        tail: deque[bytes] = deque(maxlen=60)
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise HapiServerError(
                    f"step 'start-up': no 'Tomcat started' line within {self.startup_timeout}s\n{self._text(tail)}"
                ) from None
            if line is None:
                code = self._proc.wait(timeout=10)
                self.stop()
                raise HapiServerError(f"step 'start-up': HAPI exited with code {code}\n{self._text(tail)}")
            tail.append(line)
            found = STARTED.search(line)
            if found:
                discard_rest(lines)
                return int(found.group(1))

    def _wait_for_metadata(self, deadline: float) -> None:
        last = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.base_url + "/metadata", timeout=60) as resp:
                    if resp.status == 200 and json.loads(resp.read()).get("resourceType") == "CapabilityStatement":
                        return
            except (OSError, urllib.error.HTTPError, ValueError) as exc:
                last = repr(exc)
            time.sleep(0.5)
        self.stop()
        raise HapiServerError(f"step 'metadata': GET /fhir/metadata did not answer 200 in time: {last}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.stdin:
                proc.stdin.close()
            stop_process(proc, grace=20)
        self.port = None

    def __enter__(self) -> HapiServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def rss_bytes(self) -> int:
        """The JVM's resident memory now (Linux /proc), for the suite's report."""
        assert self._proc is not None
        for line in Path(f"/proc/{self._proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    # -------------------------------------------------------------- access
    def request(self, method: str, path_or_url: str, body: dict | None = None) -> tuple[int, Any]:
        """A plain HTTP call straight to HAPI (no proxy): ``(status, parsed JSON or None)``."""
        url = path_or_url if path_or_url.startswith("http") else self.base_url + path_or_url
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/fhir+json")
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                raw, status = resp.read(), resp.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        return status, (json.loads(raw) if raw else None)

    def reset(self) -> None:
        """Empty the server: ``$expunge`` with ``expungeEverything`` (all resources, all versions)."""
        body = {"resourceType": "Parameters", "parameter": [{"name": "expungeEverything", "valueBoolean": True}]}
        status, answer = self.request("POST", "/$expunge", body)
        if status != 200:
            raise HapiServerError(f"$expunge failed: HTTP {status}: {answer}")

    def pages(self, path: str) -> list[dict]:
        """Every page of a search or history, following HAPI's own ``next`` links."""
        out: list[dict] = []
        url: str | None = self.base_url + path
        while url:
            status, page = self.request("GET", url)
            if status != 200:
                raise HapiServerError(f"GET {url} failed: HTTP {status}: {page}")
            out.append(page)
            url = next((link["url"] for link in page.get("link", []) if link["relation"] == "next"), None)
        return out

    def dump(self) -> list[dict]:
        """Every version of every resource HAPI stores (system ``_history``), as the server returns them."""
        return [
            e["resource"]
            for page in self.pages("/_history?_count=200")
            for e in page.get("entry", [])
            if "resource" in e
        ]

    @staticmethod
    def _text(lines: deque[bytes]) -> str:
        return b"".join(lines).decode(errors="replace")


def discard_rest(lines: queue.Queue[bytes | None]) -> None:
    """After start-up nobody reads HAPI's log (its errors reach the tests as OperationOutcomes): empty
    the queue the pipe's reader fills, so it does not grow for the rest of the session."""

    def drain() -> None:
        while lines.get() is not None:
            pass

    threading.Thread(target=drain, name="hapi-log", daemon=True).start()
