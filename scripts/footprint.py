"""Measure fhircrypt's footprint: start-up time, idle RSS per worker and RSS under load.

    python scripts/footprint.py [--workers 2] [--requests 3000] [--concurrency 16]

Starts the test upstream and ``fhircrypt serve`` as an operator would (local keyring, the
SATUSEHAT policy), times start-up from exec to the "listening" log line, reads VmRSS and Pss
(proportional set size: shared copy-on-write pages divided among the workers) from /proc,
then writes, reads and searches Patients at the given concurrency and reads them again.
Linux only (``/proc``). Results go to stdout as a small table for docs/operations.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.serving import Served, make_keyring  # noqa: E402
from tests.upstream_server import UpstreamServer  # noqa: E402


def memory(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM (peak RSS) and Pss of a process, in MB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            out["Pss"] = int(line.split()[1]) / 1024
    return out


def workers_of(served: Served) -> list[int]:
    pids = {e["pid"] for e in served.events() if e.get("event") == "listening"}
    return sorted(pids)


async def load(base: str, requests: int, concurrency: int) -> float:
    import aiohttp

    from tests.test_shipped_policies import _fixture

    patient = _fixture("satusehat", "patient.json", {})
    headers = {"Content-Type": "application/fhir+json"}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(requests):
        queue.put_nowait(n)

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            n = queue.get_nowait()
            async with session.post(f"{base}/Patient", json=patient, headers=headers) as resp:
                created = await resp.json()
                assert resp.status == 201, created
            async with session.get(f"{base}/Patient/{created['id']}") as resp:
                await resp.read()
            if n % 10 == 0:
                async with session.get(f"{base}/Patient?_count=20") as resp:
                    await resp.read()

    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--requests", type=int, default=3000, help="Patients written and read back")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    with UpstreamServer() as upstream, tempfile.TemporaryDirectory() as tmp:
        ring, kek = make_keyring(Path(tmp))
        env = {
            "FHIRCRYPT_UPSTREAM": upstream.base_url,
            "FHIRCRYPT_POLICY": str(ROOT / "policies" / "satusehat.yaml"),
            "FHIRCRYPT_KEYRING": str(ring),
            "FHIRCRYPT_KEK_FILE": str(kek),
            "FHIRCRYPT_AUTH": "none",
            "FHIRCRYPT_WORKERS": str(args.workers),
            "FHIRCRYPT_LOG_LEVEL": "warning" if args.workers == 1 else "info",
        }
        started = time.perf_counter()
        served = Served([], {**env, "FHIRCRYPT_LOG_LEVEL": "info"})
        served.wait_for("listening", count=args.workers)
        startup = time.perf_counter() - started
        time.sleep(2)  # idle: let start-up garbage settle
        pids = workers_of(served)
        idle = {pid: memory(pid) for pid in pids}
        seconds = asyncio.run(load(served.url("/fhir/R4"), args.requests, args.concurrency))
        loaded = {pid: memory(pid) for pid in pids}
        supervisor = memory(served.proc.pid) if args.workers > 1 else None
        served.stop()
    print(f"workers: {args.workers}; start-up (exec to listening): {startup:.2f} s")
    print(
        f"load: {args.requests} creates + reads + {args.requests // 10} searches, {args.concurrency} connections, "
        f"{seconds:.1f} s"
    )
    print("| worker | idle RSS MB | idle Pss MB | RSS after load MB | peak RSS MB |")
    print("|---|---|---|---|---|")
    for n, pid in enumerate(pids):
        print(
            f"| {n + 1} | {idle[pid]['VmRSS']:.1f} | {idle[pid]['Pss']:.1f} | {loaded[pid]['VmRSS']:.1f} | "
            f"{loaded[pid]['VmHWM']:.1f} |"
        )
    if supervisor:
        print(f"| supervisor | {supervisor['VmRSS']:.1f} | {supervisor['Pss']:.1f} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
