"""The benchmark's targets as separate processes, so that their CPU time can be measured.

Run one by hand::

    python -m bench.targets passthrough --upstream http://127.0.0.1:8103/fhir/R4
    python -m bench.targets proxy --upstream http://127.0.0.1:8103/fhir/R4 --policy policies/satusehat.yaml
    python -m bench.targets proxy --upstream ... --policy empty        # a policy that encrypts nothing

Each prints ``LISTENING <port>`` once it accepts connections (``--port 0``, the default,
picks a free port). The proxy runs as ``fhircrypt serve --auth none`` does: the same
``create_app``, JSON request logging at ``--log-level`` (default info, like serve),
writes validated (``--validate``, structure by default as in serve), a keyring generated
in memory (the key provider is never called after start-up, as in production where keys
are unwrapped once).

The passthrough is the floor any aiohttp proxy pays: it forwards method, path, headers
and body bytes to the upstream and the response bytes back, and parses nothing.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import queue
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.request
from pathlib import Path

from bench.core import DEPLOYMENT
from proxy import gctune
from proxy.gctune import DEFAULT_THRESHOLD as DEFAULT_GC_THRESHOLD
from tests.upstream_server import stdout_lines, stop_process

ROOT = Path(__file__).resolve().parent.parent

# A policy that covers no resource type: the proxy classifies, checks, forwards, parses and
# re-serialises every response, but encrypts nothing. The compiler needs at least one group.
EMPTY_POLICY = """\
fhircrypt-policy: 1
name: empty
description: benchmark baseline - no resource type is covered, nothing is encrypted
groups: {g: {}}
"""

# Hop-by-hop headers (RFC 9110 7.6.1) and those aiohttp recomputes itself.
_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)


def passthrough_app(upstream: str, connections: int = 100):
    """An aiohttp app that forwards bytes to ``upstream``'s origin and parses nothing."""
    import aiohttp
    from aiohttp import web
    from yarl import URL

    origin = str(URL(upstream).origin())
    key: web.AppKey[aiohttp.ClientSession] = web.AppKey("session")

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read() if request.body_exists else None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with request.app[key].request(
            request.method,
            URL(origin + request.raw_path, encoded=True),
            data=body,
            headers=headers,
            allow_redirects=False,
        ) as resp:
            payload = await resp.read()
            out = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP}
            return web.Response(status=resp.status, body=payload, headers=out)

    async def session_ctx(app: web.Application):
        timeout = aiohttp.ClientTimeout(total=30, connect=5)
        app[key] = aiohttp.ClientSession(
            timeout=timeout,
            connector=aiohttp.TCPConnector(limit=connections),
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent"),
        )
        yield
        await app[key].close()

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def proxy_app(upstream: str, policy: str, port: int, validate: str = "structure"):
    """fhircrypt's own ``create_app`` in development mode (``--auth none``)."""
    from proxy.keymgmt.keyring import Keyring
    from proxy.policy.compiler import compile_file, compile_text
    from proxy.settings import Settings
    from proxy.web.app import create_app

    if policy == "empty":
        compiled, policy_file = compile_text(EMPTY_POLICY, "empty.yaml"), "empty.yaml"
    else:
        compiled, policy_file = compile_file(policy, {**DEPLOYMENT, **os.environ}), policy
    settings = Settings(
        upstream=upstream.rstrip("/"),
        policy=policy_file,
        keyring="",
        listen=("127.0.0.1", port),
        auth="none",
        validate=validate,
    )
    return create_app(settings, compiled, Keyring.generate())


def _listening_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.targets", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("proxy", "passthrough"))
    parser.add_argument(
        "--upstream", required=True, help="FHIR base of the upstream, e.g. http://127.0.0.1:8103/fhir/R4"
    )
    parser.add_argument("--policy", default="empty", help="policy file, or 'empty' (proxy only)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--validate", default="structure", choices=("structure", "full", "off"),
                        help="proxy: as `fhircrypt serve --validate`")  # fmt: skip
    parser.add_argument("--log-level", default="info", help="proxy: as `fhircrypt serve --log-level`")
    parser.add_argument("--profile", metavar="FILE", help="cProfile from SIGUSR1 until SIGUSR2, which writes FILE")
    parser.add_argument("--gc-threshold", type=int, default=DEFAULT_GC_THRESHOLD,
                        help="proxy: as `fhircrypt serve --gc-threshold` (0: the defaults)")  # fmt: skip
    args = parser.parse_args(argv)

    from aiohttp import web

    try:
        sock = _listening_socket(args.host, args.port)
        port = sock.getsockname()[1]
        if args.kind == "proxy":
            from proxy.logs import configure

            configure(args.log_level)
            app = proxy_app(args.upstream, args.policy, port, validate=args.validate)
            gctune.tune(args.gc_threshold)
        else:
            app = passthrough_app(args.upstream)
    except Exception:  # shown by the launcher, which reads stdout until LISTENING
        print(traceback.format_exc(), flush=True)
        return 1
    if args.profile:
        # wall clock (cheap to read); the summary leaves out the time spent idle in epoll
        profiler = cProfile.Profile()
        signal.signal(signal.SIGUSR1, lambda *_: profiler.enable())

        def stop_profile(*_: object) -> None:
            profiler.disable()
            profiler.dump_stats(args.profile + ".tmp")
            os.replace(args.profile + ".tmp", args.profile)

        signal.signal(signal.SIGUSR2, stop_profile)
    print(f"LISTENING {port}", flush=True)
    web.run_app(app, sock=sock, print=None, access_log=None, shutdown_timeout=2)
    return 0


# ------------------------------------------------------------------ launcher (parent side)

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2 :].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14 and 15)


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its live children (``fhircrypt serve --workers N`` forks N workers).

    Children found by their parent pid in /proc; a worker that exited during a phase
    would be missed, which the phase's request count would show as errors anyway."""
    total = cpu_seconds(pid)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat[stat.rindex(b")") + 2 :].split()[1]) == pid:  # field 4: the parent pid
            total += cpu_seconds(int(entry.name))
    return total


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Child:
    """A target process the benchmark started: its name, port and pid, and how it is stopped."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, grace=10)


class TargetProcess(_Child):
    """A ``python -m bench.targets`` child: start, port, CPU time, stop."""

    def __init__(self, name: str, args: list[str]) -> None:
        super().__init__(name)
        self.args = args

    def start(self, timeout: float = 30.0) -> TargetProcess:
        cmd = [sys.executable, "-m", "bench.targets", *self.args]
        self._proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # the proxy's per-request JSON log lines
        )
        lines = stdout_lines(self._proc, f"{self.name}-stdout")
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            text = line.decode(errors="replace").rstrip()
            if text.startswith("LISTENING "):
                self.port = int(text.split()[1])
                return self
            seen.append(text)
        self.stop()
        raise RuntimeError(f"{self.name} did not start ({' '.join(cmd)}):\n" + "\n".join(seen))

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid)

    def signal(self, signum: int) -> None:
        assert self._proc is not None
        self._proc.send_signal(signum)


class ServeProcess(_Child):
    """``python -m proxy serve --workers N``: the real server command, for the scaling comparison.

    A keyring and KEK made in ``tmp`` with ``fhircrypt keys init``; configuration through the
    environment as a deployment would give it; ready when ``/healthz`` answers."""

    def __init__(self, name: str, upstream: str, workers: int, tmp: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(name)
        self.upstream, self.workers, self.tmp, self.env = upstream, workers, tmp, env or {}

    def start(self, timeout: float = 60.0) -> ServeProcess:
        ring, kek = self.tmp / f"{self.name}-ring.json", self.tmp / f"{self.name}-kek"
        init = [sys.executable, "-m", "proxy", "keys", "init", "--keyring", str(ring), "--generate-kek", str(kek)]
        subprocess.run(init, cwd=ROOT, check=True, capture_output=True)
        with socket.socket() as s:  # a free port (SO_REUSEPORT workers need a number, not a socket)
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {
            **DEPLOYMENT,
            **os.environ,
            "FHIRCRYPT_UPSTREAM": self.upstream,
            "FHIRCRYPT_POLICY": str(ROOT / "policies" / "satusehat.yaml"),
            "FHIRCRYPT_LISTEN": f"127.0.0.1:{self.port}",
            "FHIRCRYPT_KEYRING": str(ring),
            "FHIRCRYPT_KEK_FILE": str(kek),
            "FHIRCRYPT_AUTH": "none",
            "FHIRCRYPT_WORKERS": str(self.workers),
            **self.env,
        }
        cmd = [sys.executable, "-m", "proxy", "serve"]
        self._proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        time.sleep(0.5)  # let every worker bind before the load starts
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} did not start ({' '.join(cmd)} with FHIRCRYPT_WORKERS={self.workers})")


if __name__ == "__main__":
    sys.exit(main())
