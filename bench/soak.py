"""python -m bench.soak [--seconds 600] [--out bench/results]: memory and key-provider calls over time.

Starts the test upstream and the real ``fhircrypt serve`` (one worker, policies/satusehat.yaml,
a keyring unwrapped by the local key provider, ``--auth none``, background key refresh every
``--refresh`` seconds) and drives it for ``--seconds`` with the benchmark's workloads in turn
(read, search, create, transaction, export; each slice resets and seeds the upstream, then
runs closed loop at 4 connections). Every ``--interval`` seconds it samples the proxy's RSS.
It reports RSS at start, after warm-up (one slice of each workload: lazily loaded models,
pools, caches, and each workload's high-water mark of the allocator's arenas),
at the end and at its peak, the growth per minute after warm-up (least squares), and the
key-provider calls counted by the proxy's own ``fhircrypt_key_provider_calls_total`` at the
start and end: keys are unwrapped once at start-up and re-verified by the background refresh,
so the calls grow with time, never with requests.

Writes ``<out>/soak.json``, ``soak.md`` and, with matplotlib, ``soak.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench import load, report
from bench.__main__ import HOST, WORKLOADS, Bench, _parser, machine_facts
from bench.targets import ServeProcess, rss_bytes

MB = 1024 * 1024
_CALLS = re.compile(r'^fhircrypt_key_provider_calls_total\{operation="(\w+)",result="(\w+)"\} (\S+)', re.M)
_REQUESTS = re.compile(r"^fhircrypt_requests_total\{[^}]*\} (\S+)", re.M)


def _metrics(port: int) -> dict:
    """Key-provider calls by operation/result and FHIR requests answered, from the proxy's /metrics."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    calls = {f"{op}/{result}": float(n) for op, result, n in _CALLS.findall(text)}
    return {"key_provider_calls": calls, "requests": sum(float(n) for n in _REQUESTS.findall(text))}


def _slope_mb_per_min(samples: list[dict]) -> float | None:
    """Least-squares RSS growth in MB per minute over ``samples``."""
    if len(samples) < 3:
        return None
    xs, ys = [s["t_s"] / 60 for s in samples], [s["rss_bytes"] / MB for s in samples]
    return statistics.linear_regression(xs, ys).slope


async def soak(args: argparse.Namespace) -> dict:
    bench = Bench(_parser().parse_args(["--quick", "--loadgen", "python"]))
    bench.upstream.start()
    samples: list[dict] = []
    slices: list[dict] = []
    try:
        with tempfile.TemporaryDirectory(prefix="fhircrypt-soak-") as tmp:
            env = {"FHIRCRYPT_KEY_REFRESH_INTERVAL": str(args.refresh)}
            proc = ServeProcess("soak", bench.upstream.base_url, 1, Path(tmp), env).start()
            bench.ports["soak"] = proc.port
            try:
                worker = proc.pid  # one worker: `serve` runs it in its own process
                started = time.monotonic()
                at_start = {"rss_bytes": rss_bytes(worker), **_metrics(proc.port)}
                next_sample = 0.0
                i = 0
                while (elapsed := time.monotonic() - started) < args.seconds:
                    workload = WORKLOADS[i % len(WORKLOADS)]
                    request, _ = await bench.seed(workload, "soak")
                    length = min(args.slice, args.seconds - elapsed)
                    end = time.monotonic() + length
                    done = errors = 0
                    while time.monotonic() < end:
                        phase = await load.closed_loop(HOST, proc.port, request, 4, min(args.interval, length))
                        done, errors = done + phase.requests, errors + phase.errors
                        t = time.monotonic() - started
                        if t >= next_sample:
                            samples.append({"t_s": round(t, 1), "rss_bytes": rss_bytes(worker), "workload": workload})
                            next_sample = t + args.interval
                    slices.append({"workload": workload, "seconds": round(length, 1), "requests": done,
                                   "errors": errors})  # fmt: skip
                    print(f"[{time.strftime('%H:%M:%S')}] soak {time.monotonic() - started:5.0f} s {workload:11} "
                          f"{done:6} requests  RSS {rss_bytes(worker) / MB:6.1f} MB", flush=True)  # fmt: skip
                    i += 1
                at_end = {"rss_bytes": rss_bytes(worker), **_metrics(proc.port)}
            finally:
                proc.stop()
    finally:
        bench.upstream.stop()
    # warm-up: one slice of every workload, so each has reached its high-water mark once
    warm = next((s for s in samples if s["t_s"] >= args.slice * len(WORKLOADS)), samples[-1])
    after_warm = [s for s in samples if s["t_s"] >= warm["t_s"]]
    return {
        "format": "fhircrypt-soak/1",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python -m bench.soak " + " ".join(sys.argv[1:]),
        "machine": machine_facts(),
        "method": {
            "proxy": "fhircrypt serve, 1 worker, policies/satusehat.yaml, --auth none, local key provider, "
            f"key_refresh_interval {args.refresh} s, gc_threshold default",
            "load": f"workloads in turn ({', '.join(WORKLOADS)}), {args.slice:.0f} s slices, closed loop at "
            "4 connections (Python client); the upstream reset and seeded at the start of each slice",
            "rss": f"resident set of the worker process, sampled every {args.interval:.0f} s",
        },
        "seconds": args.seconds,
        "requests": sum(s["requests"] for s in slices),
        "errors": sum(s["errors"] for s in slices),
        "rss_bytes": {
            "start": at_start["rss_bytes"],
            "after_warmup": warm["rss_bytes"],
            "end": at_end["rss_bytes"],
            "peak": max(s["rss_bytes"] for s in samples),
        },
        "rss_growth_mb_per_min_after_warmup": _slope_mb_per_min(after_warm),
        "key_provider_calls": {"start": at_start["key_provider_calls"], "end": at_end["key_provider_calls"]},
        "proxy_requests_counted": {"start": at_start["requests"], "end": at_end["requests"]},
        "slices": slices,
        "samples": samples,
    }


def markdown(result: dict) -> str:
    rss, calls = result["rss_bytes"], result["key_provider_calls"]
    slope = result["rss_growth_mb_per_min_after_warmup"]
    ops = sorted(set(calls["start"]) | set(calls["end"]))
    lines = [
        f"Soak {result['date']}, `{result['command']}`: {result['seconds'] / 60:.0f} minutes, "
        f"{result['requests']:,} requests, {result['errors']} errors. {result['method']['proxy']}; "
        f"{result['method']['load']}.",
        "",
        "| RSS at start | after warm-up | at end | peak | growth after warm-up |",
        "|--:|--:|--:|--:|--:|",
        f"| {rss['start'] / MB:.1f} MB | {rss['after_warmup'] / MB:.1f} MB | {rss['end'] / MB:.1f} MB | "
        f"{rss['peak'] / MB:.1f} MB | " + (report.DASH if slope is None else f"{slope:+.2f}") + " MB/min |",
        "",
        "| key-provider calls (operation/result) | at start | at end |",
        "|---|--:|--:|",
        *(f"| {op} | {calls['start'].get(op, 0):.0f} | {calls['end'].get(op, 0):.0f} |" for op in ops),
        "",
    ]
    return "\n".join(lines)


def render_chart(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=100)
    xs = [s["t_s"] / 60 for s in result["samples"]]
    ax.plot(xs, [s["rss_bytes"] / MB for s in result["samples"]], color="#c0392b", marker=".", linewidth=1)
    ax.set_xlabel("minutes")
    ax.set_ylabel("worker RSS, MB")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(f"fhircrypt serve under mixed load for {result['seconds'] / 60:.0f} min: resident memory", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=600.0, help="how long to drive the proxy (default 600)")
    p.add_argument("--slice", type=float, default=30.0, help="seconds per workload before the next (default 30)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between RSS samples (default 10)")
    p.add_argument("--refresh", type=float, default=60.0, help="the proxy's key_refresh_interval (default 60)")
    p.add_argument("--out", default="bench/results", help="directory for soak.json/.md/.png")
    args = p.parse_args(argv)
    result = asyncio.run(soak(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "soak.md").write_text(markdown(result))
    if report.have_matplotlib():
        render_chart(result, out / "soak.png")
    print(markdown(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
