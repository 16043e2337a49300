"""Soak: a bounded mixed workload against a real ``fhircrypt serve`` process, watching its RSS and fds.

Reads, blind-index searches, creates, updates, JSON Patches and batch Bundles run from
concurrent workers for a fixed time. After a warm-up (caches, connection pool, allocator
arenas settle), the proxy's resident set size and open file descriptors are sampled every
two seconds. The run fails when, from the first sample after warm-up to the end, RSS grows
by more than ``RSS_BOUND`` bytes or the fd count by more than ``FD_BOUND``, or when any
request ends in a 5xx.

    python -m tests.soak                 # 10 minutes (FHIRCRYPT_SOAK_SECONDS to change)
    pytest tests/adversarial/test_adv_soak.py    # the CI version: 40 seconds

Writes go to a fixed set of ids (updates, patches) plus a bounded number of creates, so the
upstream's result sizes stay flat and growth can only come from the proxy.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from dataclasses import dataclass, field

import aiohttp
import orjson

from tests.adversarial.harness import ServedProxy, rss_and_fds

RSS_BOUND = 40 * 1024 * 1024  # bytes of RSS growth after warm-up
FD_BOUND = 16  # open file descriptors of growth after warm-up
NIK_SYSTEM = "https://fhir.kemkes.go.id/id/nik"
FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
IDS = 20


@dataclass
class SoakResult:
    seconds: float
    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, rss, fds) after warm-up

    @property
    def rss_growth(self) -> int:
        return self.samples[-1][1] - self.samples[0][1]

    @property
    def fd_growth(self) -> int:
        return self.samples[-1][2] - self.samples[0][2]

    def summary(self) -> str:
        mib = 1024 * 1024
        first, last = self.samples[0], self.samples[-1]
        return (
            f"{self.requests} requests in {self.seconds:.0f} s; statuses {dict(sorted(self.statuses.items()))}; "
            f"RSS {first[1] / mib:.1f} -> {last[1] / mib:.1f} MiB (bound +{RSS_BOUND / mib:.0f}), "
            f"fds {first[2]} -> {last[2]} (bound +{FD_BOUND}), {len(self.samples)} samples"
        )


def _patient(i: int, version: int) -> dict:
    return {
        "resourceType": "Patient",
        "id": f"soak-{i}",
        "identifier": [{"system": NIK_SYSTEM, "value": f"3174{i:06d}{version % 1000:06d}"}],
        "name": [{"family": f"Soakname{i}", "given": [f"V{version}"]}],
        "birthDate": "1980-01-01",
        "address": [{"city": "Bandung", "line": [f"Jl. Soak {version}"]}],
    }


async def _worker(session: aiohttp.ClientSession, base: str, stop: float, result: SoakResult, seed: int) -> None:
    rng = random.Random(seed)
    version = 0
    while time.monotonic() < stop:
        i = rng.randrange(IDS)
        version += 1
        kind = rng.choices(["read", "search", "update", "patch", "create", "batch"], [35, 30, 15, 10, 5, 5])[0]
        if kind == "read":
            req = session.get(f"{base}/Patient/soak-{i}")
        elif kind == "search":
            query = rng.choice([f"identifier={NIK_SYSTEM}|3174{i:06d}", f"name=Soakname{i}", "birthdate=1980-01-01"])
            req = session.get(f"{base}/Patient?{query}&_count=10")
        elif kind == "update":
            req = session.put(f"{base}/Patient/soak-{i}", data=orjson.dumps(_patient(i, version)), headers=FHIR_JSON)
        elif kind == "patch":
            patch = [{"op": "replace", "path": "/birthDate", "value": f"19{rng.randrange(50, 99)}-01-01"}]
            headers = {"Content-Type": "application/json-patch+json"}
            req = session.patch(f"{base}/Patient/soak-{i}", data=orjson.dumps(patch), headers=headers)
        elif kind == "create":
            body = {k: v for k, v in _patient(i, version).items() if k != "id"}
            req = session.post(f"{base}/Patient", data=orjson.dumps(body), headers=FHIR_JSON)
        else:
            bundle = {
                "resourceType": "Bundle",
                "type": "batch",
                "entry": [{"request": {"method": "GET", "url": "metadata"}}],
            }
            req = session.post(base, data=orjson.dumps(bundle), headers=FHIR_JSON)
        async with req as resp:
            await resp.read()
            result.statuses[resp.status] = result.statuses.get(resp.status, 0) + 1
            result.requests += 1


async def _drive(proxy: ServedProxy, seconds: float, warmup: float, workers: int) -> SoakResult:
    base = proxy.base + "/fhir/R4"
    result = SoakResult(seconds)
    async with aiohttp.ClientSession(headers={"Accept": "application/fhir+json"}) as session:
        for i in range(IDS):
            async with session.put(
                f"{base}/Patient/soak-{i}", data=orjson.dumps(_patient(i, 0)), headers=FHIR_JSON
            ) as resp:
                assert resp.status in (200, 201), await resp.text()
        start = time.monotonic()
        stop = start + seconds
        tasks = [asyncio.create_task(_worker(session, base, stop, result, seed)) for seed in range(workers)]
        await asyncio.sleep(warmup)
        assert proxy.proc is not None
        while time.monotonic() < stop:
            rss, fds = rss_and_fds(proxy.proc.pid)
            result.samples.append((time.monotonic() - start, rss, fds))
            await asyncio.sleep(2)
        await asyncio.gather(*tasks)
        rss, fds = rss_and_fds(proxy.proc.pid)
        result.samples.append((time.monotonic() - start, rss, fds))
    return result


def run_soak(upstream_base: str, seconds: float, workers: int = 8) -> SoakResult:
    """Start a proxy in front of ``upstream_base`` and soak it; warm-up is a quarter of the run (at most 60 s)."""
    with ServedProxy(upstream_base, env={"FHIRCRYPT_LOG_LEVEL": "warning"}) as proxy:
        return asyncio.run(_drive(proxy, seconds, min(60.0, seconds / 4), workers))


def check(result: SoakResult) -> list[str]:
    """What is wrong with a soak run (empty when it passed)."""
    problems = []
    if result.rss_growth > RSS_BOUND:
        problems.append(f"RSS grew by {result.rss_growth} bytes (bound {RSS_BOUND})")
    if result.fd_growth > FD_BOUND:
        problems.append(f"open fds grew by {result.fd_growth} (bound {FD_BOUND})")
    errors = {s: n for s, n in result.statuses.items() if s >= 500 and s != 501}
    if errors:
        problems.append(f"server errors: {errors}")
    return problems


def main() -> int:
    from tests.upstream_server import UpstreamServer

    seconds = float(os.environ.get("FHIRCRYPT_SOAK_SECONDS", "600"))
    with UpstreamServer() as upstream:
        result = run_soak(upstream.base_url, seconds)
    print(result.summary())
    problems = check(result)
    for problem in problems:
        print("FAIL:", problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
