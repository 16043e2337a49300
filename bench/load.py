"""Load generation: wrk (closed loop), and a paced open-loop client in Python.

Two kinds of measurement, both against a keep-alive HTTP/1.1 connection per client:

* **closed loop** (throughput): ``c`` connections each send the next request as soon as
  the previous answer arrived. With ``wrk`` (Debian's package, C, Lua script for the
  method/body) when it is installed, else with the Python client below. Its latencies
  are those of a saturated target and suffer from coordinated omission (a stall delays
  the requests that would have been sent meanwhile, so they are never measured); they
  are kept in the JSON but not used for the latency targets.
* **open loop** (latency): requests are *scheduled* at a fixed arrival rate, whatever the
  target does, and served by at most ``c`` connections in FIFO order. A request that
  waits for a busy connection is measured from its scheduled send time, so stalls count
  in full (no coordinated omission; the approach of wrk2, which Debian does not package).
  When a connection was idle at the scheduled time, the request is measured from the
  moment it was actually written, so the generator's own timer lateness (asyncio sleeps
  have ~1 ms resolution) is not charged to the target.

The Python client speaks HTTP/1.1 over asyncio streams directly (no aiohttp client) so
that its own cost per request is small: it shares the machine's cores with the targets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # absolute path with query, e.g. /fhir/R4/Patient?_count=100
    body: bytes | None = None
    content_type: str = "application/fhir+json"
    accept: str = "application/fhir+json"  # a Bulk file: application/fhir+ndjson (HAPI answers JSON otherwise)

    def raw(self, host: str, port: int) -> bytes:
        lines = [
            f"{self.method} {self.path} HTTP/1.1",
            f"Host: {host}:{port}",
            f"Accept: {self.accept}",
            "User-Agent: fhircrypt-bench",
        ]
        if self.body is not None:
            lines += [f"Content-Type: {self.content_type}", f"Content-Length: {len(self.body)}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + (self.body or b"")


@dataclass
class Phase:
    """One measured run of one request against one target."""

    mode: str  # "closed" | "open"
    tool: str  # "wrk" | "python"
    connections: int
    duration_s: float
    requests: int
    errors: int  # non-2xx/3xx answers and socket errors
    throughput: float  # completed requests per second
    latency_ms: dict[str, float]  # p50 p95 p99 max mean
    offered_rate: float | None = None  # open loop: scheduled arrivals per second
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def percentiles_ms(samples_s: list[float]) -> dict[str, float]:
    """Nearest-rank percentiles of latencies given in seconds, in milliseconds."""
    if not samples_s:
        return {
            "p50": float("nan"),
            "p95": float("nan"),
            "p99": float("nan"),
            "max": float("nan"),
            "mean": float("nan"),
        }
    s = sorted(samples_s)
    n = len(s)

    def rank(q: float) -> float:
        return s[min(n - 1, max(0, int(q * n + 0.999999) - 1))] * 1000

    return {
        "p50": rank(0.50),
        "p95": rank(0.95),
        "p99": rank(0.99),
        "max": s[-1] * 1000,
        "mean": sum(s) / n * 1000,
    }


# ------------------------------------------------------------------ a small HTTP/1.1 client


class Connection:
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        """Write one request, read its whole answer; returns (status, body)."""
        if self.writer is None:
            await self.connect()
        assert self.reader is not None and self.writer is not None
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        body = b""
        i = lower.find(b"\r\ncontent-length:")
        if i >= 0:
            n = int(head[i + 17 : lower.index(b"\r\n", i + 2)])
            if n:
                body = await self.reader.readexactly(n)
        elif b"\r\ntransfer-encoding: chunked" in lower:
            chunks = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                chunks.append(chunk[:-2])
            body = b"".join(chunks)
        if b"\r\nconnection: close" in lower:
            await self.close()
        return status, body

    async def close(self) -> None:
        writer, self.writer, self.reader = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()


async def send_all(host: str, port: int, requests: list[Request], concurrency: int = 8) -> list[tuple[int, bytes]]:
    """Send each request once (e.g. to seed data); answers in request order."""
    results: list[tuple[int, bytes] | None] = [None] * len(requests)
    todo = iter(range(len(requests)))

    async def worker() -> None:
        conn = Connection(host, port)
        try:
            for i in todo:
                results[i] = await conn.send(requests[i].raw(host, port))
        finally:
            await conn.close()

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(requests))))))
    return [r for r in results if r is not None]


class _Tally:
    """Latencies and errors of one phase; each request is timed from ``start``."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0

    async def send(self, conn: Connection, raw: bytes, start: float) -> None:
        try:
            status, _ = await conn.send(raw)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self.errors += 1
            await conn.close()
            return
        self.latencies.append(time.perf_counter() - start)
        if status >= 400:
            self.errors += 1


async def _connections(host: str, port: int, count: int) -> list[Connection]:
    conns = [Connection(host, port) for _ in range(count)]
    for conn in conns:
        await conn.connect()
    return conns


async def _drive(conns: list[Connection], worker) -> None:
    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        for conn in conns:
            await conn.close()


async def closed_loop(host: str, port: int, request: Request, connections: int, duration: float) -> Phase:
    """Python closed loop: each connection sends the next request when the previous answer is in."""
    raw = request.raw(host, port)
    tally = _Tally()
    conns = await _connections(host, port, connections)
    started = time.perf_counter()
    deadline = started + duration

    async def worker(conn: Connection) -> None:
        while time.perf_counter() < deadline:
            await tally.send(conn, raw, time.perf_counter())

    await _drive(conns, worker)
    elapsed = time.perf_counter() - started
    return Phase(
        "closed", "python", connections, elapsed, len(tally.latencies), tally.errors,
        len(tally.latencies) / elapsed, percentiles_ms(tally.latencies),
    )  # fmt: skip


async def open_loop(host: str, port: int, request: Request, connections: int, rate: float, duration: float) -> Phase:
    """Requests scheduled at ``rate`` per second for ``duration`` s, at most ``connections`` in flight.

    Latency of request i = answer time - scheduled time t_i when it had to wait for a
    connection (coordinated-omission free); answer time - write time when a connection
    was idle at t_i (the generator's timer lateness is not the target's)."""
    raw = request.raw(host, port)
    tally = _Tally()
    late = 0  # requests that waited for a busy connection
    conns = await _connections(host, port, connections)
    interval = 1.0 / rate
    total = max(1, int(duration * rate))
    ticket = 0
    t0 = time.perf_counter() + 0.005

    async def worker(conn: Connection) -> None:
        nonlocal ticket, late
        clock = time.perf_counter
        while ticket < total:
            scheduled = t0 + ticket * interval
            ticket += 1
            now = clock()
            if now < scheduled:
                await asyncio.sleep(scheduled - now)
                start = clock()
            else:
                start = scheduled
                late += 1
            await tally.send(conn, raw, start)

    await _drive(conns, worker)
    elapsed = time.perf_counter() - t0
    return Phase(
        "open", "python", connections, elapsed, len(tally.latencies), tally.errors, len(tally.latencies) / elapsed,
        percentiles_ms(tally.latencies), offered_rate=rate, extra={"waited_for_connection": late},
    )  # fmt: skip


# ------------------------------------------------------------------ wrk


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_version() -> str | None:
    exe = wrk_path()
    if not exe:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).splitlines()[0].strip() if (out.stdout or out.stderr) else "wrk"


_WRK_SCRIPT = """\
wrk.method = "{method}"
wrk.path = "{path}"
wrk.headers["Accept"] = "{accept}"
wrk.headers["User-Agent"] = "fhircrypt-bench"
{body}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests":%.0f,"duration_us":%.0f,"socket_errors":%.0f,"status_errors":%.0f,' ..
    '"p50":%.1f,"p95":%.1f,"p99":%.1f,"max":%.1f,"mean":%.1f}}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max, latency.mean))
end
"""

_WRK_BODY = """\
wrk.headers["Content-Type"] = "{ctype}"
local f = assert(io.open("{file}", "rb"))
wrk.body = f:read("*a")
f:close()
"""


def run_wrk(host: str, port: int, request: Request, connections: int, duration: float) -> Phase:
    """wrk -t1 -c<connections> -d<duration>; the Lua script sets method, path and body."""
    exe = wrk_path()
    if exe is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk), or use --loadgen python")
    seconds = max(1, round(duration))
    with tempfile.TemporaryDirectory(prefix="fhircrypt-wrk-") as tmp:
        body = ""
        if request.body is not None:
            body_file = Path(tmp) / "body.json"
            body_file.write_bytes(request.body)
            body = _WRK_BODY.format(ctype=request.content_type, file=body_file)
        script = Path(tmp) / "request.lua"
        script.write_text(
            _WRK_SCRIPT.format(method=request.method, path=request.path, accept=request.accept, body=body)
        )
        cmd = [exe, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s", str(script)]
        out = subprocess.run([*cmd, f"http://{host}:{port}{request.path}"], capture_output=True, text=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout}\n{out.stderr}")
    r = json.loads(line[len("WRKJSON ") :])
    elapsed = r["duration_us"] / 1e6
    lat = {k: r[k] / 1000 for k in ("p50", "p95", "p99", "max", "mean")}
    return Phase(
        "closed", "wrk", connections, elapsed, int(r["requests"]),
        int(r["socket_errors"] + r["status_errors"]), r["requests"] / elapsed, lat,
    )  # fmt: skip
