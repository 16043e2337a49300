"""python -m bench [--quick] [--upstream medplum|hapi] [--rounds N] [--duration S] [--out bench/results]

Starts the test upstream, the bare passthrough and two fhircrypt proxies, and in every
round alternates each workload across the four targets:

  direct               straight to the upstream (Medplum's FHIR router, node; or with
                       ``--upstream hapi`` HAPI FHIR's JPA server, java: see bench/upstreams.py)
  passthrough          bare aiohttp passthrough (forwards bytes, parses nothing)
  fhircrypt-empty      fhircrypt with a policy that covers nothing (pure proxy cost)
  fhircrypt-satusehat  fhircrypt with policies/satusehat.yaml (proxy + encryption)

Workloads: ``read`` one Patient (22 encrypted elements under the SATUSEHAT policy),
``search`` returning 100 Patients, ``create`` a Patient (the proxy validates writes),
``transaction``: a 50-entry transaction Bundle creating 50 such Patients, and
``export``: one Bulk Data NDJSON file of 500 Patients, fetched (and, through fhircrypt,
decrypted line by line) through the link the target's manifest gives (Medplum's test server
repeats one stored Patient; HAPI exports 500 Patients stored through the target).
For every target, workload and concurrency (1 and 8 connections; the two heavy
workloads at 1 only, so the run still fits in a quarter of an hour): the upstream is
reset and seeded through that target, a closed-loop phase measures throughput and CPU
per request; then, for every target again (reset and seeded again), an open-loop phase
at a fixed arrival rate (half the slowest target's throughput) measures latency without
coordinated omission. Then ``gc``: each fhircrypt target against a twin with the garbage
collector left at Python's defaults (``--gc-threshold 0``), on the searchset at c=1. Then
``scaling``: ``fhircrypt serve --workers 1`` and ``--workers 2`` (SO_REUSEPORT), closed loop
on read and search at 8 connections. Medians over the rounds go to
``<out>/<name>.json``, ``.png`` and ``.md`` (``--name``, default ``latest``); see docs/benchmarks.md.

``--quick`` is the smoke mode that CI runs: one round, short phases, the Python load
generator only, and the chart only when matplotlib is installed. The 10-minute memory soak
is a separate command, ``python -m bench.soak``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import pstats
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
from yarl import URL

from bench import load, report
from bench.core import patient_bytes, profile_areas, run_core, summarise_profile
from bench.targets import DEFAULT_GC_THRESHOLD, ROOT, ServeProcess, TargetProcess, rss_bytes, tree_cpu_seconds
from bench.upstreams import UPSTREAMS

FHIR_JSON = {"Content-Type": "application/fhir+json"}

TARGETS = ("direct", "passthrough", "fhircrypt-empty", "fhircrypt-satusehat")
PROXIES = ("fhircrypt-empty", "fhircrypt-satusehat")
PROFILED = ("passthrough", *PROXIES)  # the passthrough's profile is the HTTP floor the proxies share
WORKLOADS = ("read", "search", "create", "transaction", "export")
CONCURRENCY = (1, 8)
HEAVY = ("transaction", "export")  # tens of ms per request: concurrency 1 only
HOST = "127.0.0.1"
SEARCH_SIZE = 100
BUNDLE_SIZE = 50
EXPORT_LINES = 500
NIK = b"3175042903870007"  # in the fixture Patient: must come back in plaintext from every target
SCALING = {"workers": (1, 2), "workloads": ("read", "search"), "c": 8}
GC = {"workload": "search", "c": 1}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke mode: one short round, Python load generator")
    p.add_argument("--rounds", type=int, help="rounds; the median is reported (default 3, quick 1)")
    p.add_argument("--duration", type=float, help="seconds per measured phase (default 2, quick 0.25)")
    p.add_argument("--upstream", choices=tuple(UPSTREAMS), default="medplum",
                   help="the FHIR server behind every target: Medplum's router or HAPI FHIR's JPA server")  # fmt: skip
    p.add_argument("--out", default="bench/results", help="directory for the results")
    p.add_argument("--name", default="latest", help="file name of the results in --out: NAME.json/.png/.md")
    p.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto",
                   help="closed-loop generator: wrk when installed (auto), or the Python client")  # fmt: skip
    p.add_argument("--load-fraction", type=float, default=0.5,
                   help="open-loop rate as a fraction of the slowest target's closed-loop throughput")  # fmt: skip
    p.add_argument("--no-profile", action="store_true", help="skip the cProfile pass of each target under load")
    p.add_argument("--no-core", action="store_true", help="skip the core micro-benchmark")
    p.add_argument("--no-scaling", action="store_true", help="skip the 1 vs 2 worker processes comparison")
    p.add_argument("--no-gc", action="store_true", help="skip the garbage-collector tuned vs default comparison")
    return p


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.rounds = args.rounds or (1 if self.quick else 3)
        self.duration = args.duration or (0.25 if self.quick else 2.0)
        self.warmup = 0.1 if self.quick else 0.3
        self.min_samples = 5 if self.quick else 40
        self.export_lines = 100 if self.quick else EXPORT_LINES
        if args.loadgen == "wrk" or (args.loadgen == "auto" and not self.quick and load.wrk_path()):
            if not load.wrk_path():
                raise SystemExit("wrk is not installed: apt-get install wrk (or --loadgen python)")
            self.closed_tool = "wrk"
        else:
            self.closed_tool = "python"
            if args.loadgen == "auto" and not self.quick:
                print("bench: wrk not found, the closed-loop phases use the Python client", file=sys.stderr)
        self.upstream = UPSTREAMS[args.upstream]()
        self.procs: dict[str, TargetProcess] = {}
        self.ports: dict[str, int] = {}
        self.patient = patient_bytes()
        self.log_lines: list[str] = []
        self.specs: dict[str, list[str]] = {}

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.upstream.start()
        up = self.upstream.base_url
        self.ports["direct"] = self.upstream.port
        self.specs = {
            "passthrough": ["passthrough", "--upstream", up],
            "fhircrypt-empty": ["proxy", "--upstream", up, "--policy", "empty"],
            "fhircrypt-satusehat": ["proxy", "--upstream", up, "--policy", str(ROOT / "policies" / "satusehat.yaml")],
        }
        for name, argv in self.specs.items():
            self.procs[name] = TargetProcess(name, argv).start()
            self.ports[name] = self.procs[name].port

    @property
    def base(self) -> str:
        """The upstream's FHIR base path (``/fhir/R4``, ``/fhir``): every target serves the same one."""
        return URL(self.upstream.base_url).path

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop()
        self.upstream.stop()

    def say(self, text: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {text}"
        self.log_lines.append(line)
        print(line, flush=True)

    # ------------------------------------------------------------ workloads
    async def seed(self, workload: str, target: str) -> tuple[load.Request, dict]:
        """Reset the upstream, store what the workload needs through ``target``; the request to repeat."""
        await asyncio.to_thread(self.upstream.reset)
        port = self.ports[target]
        post = load.Request("POST", f"{self.base}/Patient", self.patient)
        if workload == "create":
            return post, {}
        if workload == "transaction":
            return await self._seed_transaction(target, port)
        if workload == "export":
            return await self._seed_export(target, port)
        answers = await self._store_patients(workload, target, 1 if workload == "read" else SEARCH_SIZE)
        if workload == "read":
            request = load.Request("GET", f"{self.base}/Patient/{orjson.loads(answers[0][1])['id']}")
        else:
            request = load.Request("GET", f"{self.base}/Patient?_count={SEARCH_SIZE}")
        status, body = (await load.send_all(HOST, port, [request]))[0]
        doc = orjson.loads(body)
        check = {"status": status, "bytes": len(body)}
        if workload == "search":
            check["entries"] = len(doc.get("entry", ()))
            if check["entries"] != SEARCH_SIZE:
                raise RuntimeError(f"search through {target} returned {check['entries']} Patients")
        # the plaintext NIK must come back: the satusehat target decrypted what it stored encrypted
        if status != 200 or NIK not in body:
            raise RuntimeError(f"{workload} through {target}: status {status}, plaintext not returned")
        return request, check

    async def _store_patients(self, workload: str, target: str, n: int) -> list[tuple[int, bytes]]:
        """``n`` variants of the fixture Patient created through ``target``; their answers."""
        seeds = [load.Request("POST", f"{self.base}/Patient", patient_bytes(i)) for i in range(n)]
        answers = await load.send_all(HOST, self.ports[target], seeds, concurrency=8)
        bad = [s for s, _ in answers if s != 201]
        if bad:
            raise RuntimeError(f"seeding {workload} through {target}: statuses {sorted(set(bad))}")
        return answers

    async def _seed_transaction(self, target: str, port: int) -> tuple[load.Request, dict]:
        """The request: a transaction Bundle of 50 Patient creates (each one validated and encrypted
        by the proxy). Checked once: all 50 created, and nothing of fhircrypt's at-rest form comes back."""
        entries = [
            {
                "fullUrl": f"urn:uuid:00000000-0000-4000-8000-{i:012d}",
                "resource": orjson.loads(patient_bytes(i)),
                "request": {"method": "POST", "url": "Patient"},
            }
            for i in range(BUNDLE_SIZE)
        ]
        bundle = orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries})
        request = load.Request("POST", self.base, bundle)
        status, body = (await load.send_all(HOST, port, [request]))[0]
        doc = orjson.loads(body) if body else {}
        statuses = [str(e.get("response", {}).get("status", "")) for e in doc.get("entry", ())]
        check = {"status": status, "bytes": len(body), "entries": len(statuses), "request_bytes": len(bundle)}
        if status != 200 or len(statuses) != BUNDLE_SIZE or not all(s.startswith("201") for s in statuses):
            raise RuntimeError(f"transaction through {target}: status {status}, entry statuses {set(statuses)}")
        if b"fhircrypt.dev" in body:
            raise RuntimeError(f"transaction through {target}: the answer carries fhircrypt's at-rest markers")
        return request, check

    async def _seed_export(self, target: str, port: int) -> tuple[load.Request, dict]:
        """An export of 500 Patients (100 quick) kicked off and polled through ``target``; the request
        fetches its first NDJSON file. Medplum's test server exports one Patient stored through the
        target 500 times (its ``copies`` option); HAPI exports 500 Patients stored through the target.

        The file's URL comes from the target's own manifest: fhircrypt answers with signed links
        to itself, which it follows, decrypting the NDJSON line by line as it streams. Every file
        of the manifest is read once: together they hold every Patient, in plaintext."""
        stored = await asyncio.to_thread(self.upstream.prepare_export, self.export_lines)
        await self._store_patients("export", target, stored)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.upstream.export_timeout
        async with aiohttp.ClientSession() as session:
            kickoff = f"http://{HOST}:{port}{self.base}/$export?_type=Patient"
            async with session.get(kickoff, headers={"Prefer": "respond-async"}) as resp:
                status_url = resp.headers.get("Content-Location")
                if resp.status != 202 or not status_url:
                    raise RuntimeError(f"export kick-off through {target}: {resp.status} {await resp.text()}")
            while True:
                async with session.get(_on_target(status_url, port)) as resp:
                    if resp.status == 200:
                        manifest = await resp.json(content_type=None)
                        break
                    if resp.status != 202:
                        raise RuntimeError(f"export status through {target}: {resp.status} {await resp.text()}")
                if loop.time() > deadline:
                    raise RuntimeError(f"export through {target} did not complete in {self.upstream.export_timeout} s")
                await asyncio.sleep(self.upstream.export_poll_seconds)
        files = [
            load.Request("GET", URL(o["url"]).raw_path_qs, accept="application/fhir+ndjson")
            for o in manifest["output"]
            if o["type"] == "Patient"
        ]
        answers = await load.send_all(HOST, port, files)
        status, body = answers[0]
        check = {
            "status": status,
            "bytes": len(body),
            "lines": body.count(b"\n"),
            "files": len(files),
            "lines_all_files": sum(b.count(b"\n") for _, b in answers),
        }
        everything = b"".join(b for _, b in answers)
        if (
            any(s != 200 for s, _ in answers)
            or check["lines_all_files"] != self.export_lines
            or NIK not in everything
            or b"fhircrypt.dev" in everything
        ):
            raise RuntimeError(f"export through {target}: statuses {[s for s, _ in answers]}, {check}, plaintext?")
        return files[0], check

    def _cpu(self, target: str) -> tuple[float | None, float]:
        """CPU seconds so far of the target's processes (with any workers it forked) and of the upstream."""
        proxy = tree_cpu_seconds(self.procs[target].pid) if target in self.procs else None
        return proxy, tree_cpu_seconds(self.upstream.pid)

    async def phase(
        self,
        target: str,
        workload: str,
        c: int,
        mode: str,
        seeded: tuple[load.Request, dict],
        rate: float | None = None,
        seconds: float | None = None,
    ) -> dict:
        """One measured phase; ``seeded`` is what ``seed`` returned for this target and workload."""
        request, check = seeded
        port = self.ports[target]
        await load.closed_loop(HOST, port, request, c, self.warmup)  # warm connections, pools and caches
        proxy0, up0 = self._cpu(target)
        gen0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        own0 = time.process_time()
        if mode == "open":
            assert rate is not None
            result = await load.open_loop(HOST, port, request, c, rate, seconds or self.duration)
        elif self.closed_tool == "wrk":
            result = await asyncio.to_thread(load.run_wrk, HOST, port, request, c, self.duration)
        else:
            result = await load.closed_loop(HOST, port, request, c, self.duration)
        proxy1, up1 = self._cpu(target)
        gen1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        gen_cpu = (
            (gen1.ru_utime + gen1.ru_stime) - (gen0.ru_utime + gen0.ru_stime)
            if result.tool == "wrk"
            else time.process_time() - own0
        )
        out = result.to_dict()
        n = max(1, result.requests)
        out.update(
            target=target,
            workload=workload,
            check=check,
            proxy_cpu_us_per_req=None if proxy0 is None else (proxy1 - proxy0) / n * 1e6,
            proxy_cores=None if proxy0 is None else (proxy1 - proxy0) / result.duration_s,
            upstream_cpu_us_per_req=(up1 - up0) / n * 1e6,
            upstream_cores=(up1 - up0) / result.duration_s,
            loadgen_cores=gen_cpu / result.duration_s,
        )
        if result.errors:
            self.say(f"  !! {target} {workload} c={c} {mode}: {result.errors} errors of {result.requests}")
        return out

    async def warm_up(self) -> None:
        """Each workload straight at the upstream and through fhircrypt-satusehat (plaintext and stored
        forms) for the upstream's warm-up time, unmeasured; nothing for an upstream that needs none."""
        seconds = self.upstream.warmup_seconds * (0.2 if self.quick else 1.0)
        if not seconds:
            return
        for workload in WORKLOADS:
            for target in ("direct", "fhircrypt-satusehat"):
                request, _ = await self.seed(workload, target)
                await load.closed_loop(HOST, self.ports[target], request, 1 if workload in HEAVY else 8, seconds)
        self.say(f"upstream warmed up: every workload for {seconds:.0f} s direct and through fhircrypt-satusehat")

    async def run_rounds(self) -> list[list[dict]]:
        """Each round: per workload and concurrency, every target closed loop, then every target open loop."""
        rounds = []
        for i in range(self.rounds):
            order = TARGETS[i % len(TARGETS) :] + TARGETS[: i % len(TARGETS)]  # rotate: no target always first
            cells = []
            for workload in WORKLOADS:
                for c in (1,) if workload in HEAVY else CONCURRENCY:
                    cells += await self.compare(order, workload, c, f"round {i + 1}")
            rounds.append(cells)
        return rounds

    async def compare(self, order: tuple[str, ...], workload: str, c: int, label: str) -> list[dict]:
        """Every target in ``order`` closed loop, then every target open loop; one cell per target.

        The open-loop arrival rate is ``--load-fraction`` of the slowest target's closed-loop
        throughput, so every target gets the same offered load."""
        closed = {}
        for target in order:
            closed[target] = await self.phase(target, workload, c, "closed", await self.seed(workload, target))
        # no floor above the slowest target's capacity: a transaction through fhircrypt takes ~1 s
        rate = max(0.2, self.args.load_fraction * min(r["throughput"] for r in closed.values()))
        # enough samples for a p99 that is not just the maximum, within twice the phase time
        seconds = min(2 * self.duration, max(self.duration, self.min_samples / rate))
        cells = []
        for target in order:
            opened = await self.phase(target, workload, c, "open", await self.seed(workload, target), rate, seconds)
            cells.append({"target": target, "workload": workload, "c": c, "closed": closed[target], "open": opened})
            r = closed[target]
            cpu = r["proxy_cpu_us_per_req"]
            self.say(
                f"{label} {workload:6} c={c} {target:20} {r['throughput']:7.0f} req/s  "
                f"open @{rate:.0f}/s p50 {opened['latency_ms']['p50']:6.2f} "
                f"p99 {opened['latency_ms']['p99']:6.2f} ms" + (f"  proxy {cpu:5.0f} µs/req" if cpu else "")
            )
        return cells

    async def run_gc(self) -> dict:
        """The garbage-collector comparison: each fhircrypt target against a twin started with
        ``--gc-threshold 0`` (Python's defaults, nothing frozen), on the searchset at c=1, per round.

        A 100-Patient searchset is the allocation-heavy case: its parse makes ~20,000 containers."""
        twins = {f"{t}-gc-default": t for t in PROXIES}
        for twin, target in twins.items():
            self.procs[twin] = TargetProcess(twin, [*self.specs[target], "--gc-threshold", "0"]).start()
            self.ports[twin] = self.procs[twin].port
        rows: list[dict] = []
        try:
            for i in range(self.rounds):
                for twin, target in twins.items():
                    pair = (target, twin) if i % 2 == 0 else (twin, target)
                    for cell in await self.compare(pair, GC["workload"], GC["c"], f"gc round {i + 1}"):
                        rows.append({"round": i, "policy": target, "gc": "default" if cell["target"] == twin else
                                     "tuned", **cell})  # fmt: skip
        finally:
            for twin in twins:
                self.procs.pop(twin).stop()
                del self.ports[twin]
        return {
            "workload": GC["workload"],
            "c": GC["c"],
            "tuned": f"gc.freeze() after start-up, generation-0 threshold {DEFAULT_GC_THRESHOLD} (fhircrypt's default)",
            "default": "--gc-threshold 0: Python's defaults (700, 10, 10), nothing frozen",
            "raw": rows,
        }

    async def run_scaling(self) -> dict:
        """Throughput and proxy CPU of ``fhircrypt serve --workers N`` (SO_REUSEPORT), closed loop, per round.

        The real server command, not the benchmark's in-process target: it forks the workers
        that share the port. Both process counts run in every round, alternating first."""
        rows: list[dict] = []
        with tempfile.TemporaryDirectory(prefix="fhircrypt-bench-") as tmp:
            for workers in SCALING["workers"]:
                name = f"serve-{workers}w"
                self.procs[name] = ServeProcess(name, self.upstream.base_url, workers, Path(tmp)).start()
                self.ports[name] = self.procs[name].port
            try:
                for i in range(self.rounds):
                    order = SCALING["workers"] if i % 2 == 0 else SCALING["workers"][::-1]
                    for workload in SCALING["workloads"]:
                        for workers in order:
                            target = f"serve-{workers}w"
                            seeded = await self.seed(workload, target)
                            r = await self.phase(target, workload, SCALING["c"], "closed", seeded)
                            rows.append({"round": i, "workers": workers, **r})
                            self.say(
                                f"scaling round {i + 1} {workload:6} workers={workers} {r['throughput']:7.0f} req/s  "
                                f"proxy {r['proxy_cores']:.2f} cores, {r['proxy_cpu_us_per_req']:5.0f} µs/req"
                            )
            finally:
                for workers in SCALING["workers"]:
                    self.procs.pop(f"serve-{workers}w").stop()
                    del self.ports[f"serve-{workers}w"]
        return {
            "command": "fhircrypt serve --workers N (policies/satusehat.yaml, --auth none, JSON log to /dev/null)",
            "connections": SCALING["c"],
            "closed_loop_tool": self.closed_tool,
            "raw": rows,
        }

    async def profile_targets(self) -> dict:
        """Each target of :data:`PROFILED` in a fresh process under cProfile while the Python client drives
        each workload at c=1: where each one's CPU goes, by area and by function (idle time left out)."""
        out: dict[str, dict[str, dict]] = {}
        with tempfile.TemporaryDirectory(prefix="fhircrypt-prof-") as tmp:
            for workload in WORKLOADS:
                for target in PROFILED:
                    prof = Path(tmp) / f"{target}-{workload}.prof"
                    proc = TargetProcess("profiled", [*self.specs[target], "--profile", str(prof)]).start()
                    self.ports["profiled"] = proc.port
                    try:
                        request, _ = await self.seed(workload, "profiled")
                        await load.closed_loop(HOST, proc.port, request, 1, self.warmup)
                        proc.signal(signal.SIGUSR1)
                        await asyncio.sleep(0.05)
                        r = await load.closed_loop(HOST, proc.port, request, 1, self.duration)
                        proc.signal(signal.SIGUSR2)
                        for _ in range(100):
                            if prof.exists():
                                break
                            await asyncio.sleep(0.05)
                    finally:
                        proc.stop()
                        del self.ports["profiled"]
                    stats = pstats.Stats(str(prof))
                    summary = summarise_profile(stats, max(1, r.requests), top=12)
                    summary["areas"] = profile_areas(stats, max(1, r.requests))
                    out.setdefault(workload, {})[target] = summary
                    self.say(
                        f"profiled {workload:11} {target:20} {r.requests:5} requests, "
                        f"{summary['total_us_per_op']:7.0f} µs CPU each"
                    )
        return {
            "tool": "cProfile, enabled only while the Python client drives one workload at c=1 against a fresh "
            "process of each target; idle time in epoll left out; cProfile inflates Python call costs",
            "workloads": out,
        }


def _on_target(url: str, port: int) -> str:
    """``url`` sent to the target under test (a manifest may name the upstream's own host)."""
    return str(URL(url).with_host(HOST).with_port(port).with_scheme("http"))


def machine_facts() -> dict:
    model, mhz = "unknown", None
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("cpu MHz") and mhz is None:
                mhz = float(line.split(":", 1)[1])
    mem = None
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) * 1024
    import platform

    import aiohttp

    node = None
    with contextlib.suppress(OSError):
        import subprocess

        node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "cpu_mhz": mhz,
        "memory_bytes": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "orjson": orjson.__version__,
        "node": node,
        "wrk": load.wrk_version(),
        "shared_cores": "load generator, upstream and proxy processes all run on these cores, unpinned",
    }


async def amain(args: argparse.Namespace) -> dict:
    bench = Bench(args)
    started = time.time()
    result: dict = {
        "format": "fhircrypt-bench/1",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python -m bench " + " ".join(sys.argv[1:]),
        "quick": bench.quick,
        "machine": machine_facts(),
    }
    if not args.no_core:
        bench.say("core micro-benchmark")
        result["core"] = run_core(
            rounds=bench.rounds, min_time=0.05 if bench.quick else 0.5, profile_ops=50 if bench.quick else 2000
        )
    bench.say("starting upstream, passthrough and proxies")
    bench.start()
    try:
        result["upstream"] = bench.upstream.facts()
        rss_start = {name: rss_bytes(p.pid) for name, p in bench.procs.items()}
        await bench.warm_up()
        rounds = await bench.run_rounds()
        rss_end = {name: rss_bytes(p.pid) for name, p in bench.procs.items()}
        gc_compare = None if args.no_gc else await bench.run_gc()
        scaling = None if args.no_scaling else await bench.run_scaling()
        profile = None if (bench.quick or args.no_profile) else await bench.profile_targets()
    finally:
        bench.stop()
    result.update(
        method={
            "targets": list(TARGETS),
            "workloads": {
                "read": "GET /Patient/<id>: the SATUSEHAT fixture Patient (22 encrypted elements under satusehat)",
                "search": f"GET /Patient?_count={SEARCH_SIZE}: a searchset of {SEARCH_SIZE} such Patients",
                "create": "POST /Patient of the fixture Patient (validation on, Prefer default: representation)",
                "transaction": f"POST [base] of a transaction Bundle with {BUNDLE_SIZE} Patient creates "
                "(each entry validated, indexed and encrypted by fhircrypt)",
                "export": f"GET of the first Bulk Data NDJSON file of an export of {bench.export_lines} Patients "
                f"({bench.upstream.export_data}), through the link in the target's own manifest (fhircrypt: a "
                "signed link; it decrypts each line)",
            },
            "soak": "separate command: python -m bench.soak (10 minutes; RSS and key-provider calls)",
            "concurrency": list(CONCURRENCY),
            "concurrency_heavy": [1],
            "rounds": bench.rounds,
            "phase_seconds": bench.duration,
            "closed_loop_tool": bench.closed_tool,
            "open_loop_tool": "python (bench/load.py open_loop: paced arrivals, latency from the scheduled time)",
            "load_fraction": args.load_fraction,
            "open_loop_rate": "load_fraction x the slowest target's closed-loop throughput in the same round; "
            f"each open-loop phase lasts until {bench.min_samples} requests, between 1x and 2x phase_seconds",
            "auth": "none (development mode: every element decrypts, no token checks)",
            "proxy_logging": "JSON request log at level info, like fhircrypt serve, written to /dev/null",
            "reset": f"before every phase: {bench.upstream.reset_method}",
            "median": "per metric over rounds; ratios and deltas are medians of per-round paired values",
        },
        rss_bytes={"start": rss_start, "end": rss_end},
        raw_rounds=rounds,
        scaling=scaling,
        gc=gc_compare,
        proxy_profile=profile,
        log=bench.log_lines,
    )
    result["elapsed_s"] = time.time() - started
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    result = asyncio.run(amain(args))
    summary = report.summarise(result)
    out = Path(args.out)
    paths = report.write_all(summary, out, chart=not args.quick or report.have_matplotlib(), name=args.name)
    print(report.markdown(summary))
    print("wrote " + ", ".join(str(p) for p in paths), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
