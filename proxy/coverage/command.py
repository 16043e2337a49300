"""``fhircrypt coverage``: page through the server (or read Bulk export NDJSON files) and report.

The server is read with the machinery of ``fhircrypt reencrypt`` (``proxy.migrate``): the same
rate-limited upstream client with bounded retries (only the server's own origin is requested), the
same resumable keyset walk with its checkpoint saved after every page, the same progress bar. The
scan only ever sends GET: it has no code path that writes. Exit codes: 0 the report is complete;
2 the server did not answer (the message names its host; run again with the same ``--checkpoint``
to resume where it stopped) or the checkpoint belongs to another run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm
from yarl import URL

from proxy.coverage import report
from proxy.coverage.detectors import Detector, simple_detector
from proxy.coverage.scan import Coverage
from proxy.migrate.checkpoint import Checkpoint
from proxy.migrate.commands import Connection
from proxy.migrate.run import Options, Tally, walk
from proxy.migrate.upstream import UpstreamDown
from proxy.policy.compiler import CompiledPolicy
from proxy.transform import jsonnum


@dataclass(frozen=True)
class Outputs:
    report: str | None = None  # JSON file, or "-" for stdout (the table then goes to stderr)
    html: str | None = None


@dataclass(frozen=True)
class Scan:
    policy: CompiledPolicy | None
    detector: Detector = simple_detector
    detector_name: str = "simple (nik, email, phone)"

    def meta(self, source: str, complete: bool) -> dict:
        policy = {"name": self.policy.name, "digest": self.policy.digest} if self.policy else None
        return {"source": source, "complete": complete, "policy": policy, "detectors": self.detector_name}


def host_of(base: str) -> str:
    url = URL(base)
    return f"{url.host}:{url.port}" if url.port else str(url.host)


async def scan_upstream(conn: Connection, scan: Scan, opts: Options, checkpoint_path: str | None, out: Outputs) -> int:
    run = {"command": "coverage", "policy": scan.policy.digest if scan.policy else None, "types": list(opts.types)}
    checkpoint = Checkpoint(checkpoint_path, run).load()  # one of another run: a ValueError, exit 2
    tally = Tally(checkpoint.tally)
    cov = Coverage(checkpoint.tally.get("coverage"))
    # saved after each completed page only: a page cut short is read again, so no value is counted twice
    checkpoint.snapshot = lambda: {**tally.to_doc(), "coverage": cov.to_doc()}

    async def handle(resource: dict) -> None:
        tally.add(resource["resourceType"], "scanned")
        cov.add_resource(resource, scan.policy, scan.detector)

    def postfix() -> dict:
        return {"PHI-like": sum(c["phi"] for rows in cov.rows.values() for c in rows.values())}

    up = conn.open(opts.workers)
    try:
        async with up:
            await walk(up, opts, checkpoint, handle, "coverage", tally, postfix)
    except UpstreamDown as exc:
        resume = "run again with the same --checkpoint to resume" if checkpoint_path else "give --checkpoint to resume"
        print(f"error: the FHIR server at {host_of(conn.upstream)} did not answer ({exc}); {resume}", file=sys.stderr)
        return 2
    _emit(report.build(cov, scan.meta(host_of(conn.upstream), complete=True)), out)
    return 0


def scan_ndjson(files: Iterable[str], scan: Scan, out: Outputs) -> int:
    """A Bulk export already downloaded: every line of every file (``.ndjson``) is one resource."""
    cov = Coverage()
    names = [str(p) for p in files]
    with tqdm(desc="coverage", unit="res", file=sys.stderr, disable=None) as bar:
        for name in names:
            with open(name, "rb") as fh:
                for number, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        resource = jsonnum.loads(line)
                    except ValueError:
                        raise ValueError(f"{name} line {number}: not a JSON resource") from None
                    if type(resource) is not dict or type(resource.get("resourceType")) is not str:
                        raise ValueError(f"{name} line {number}: not a FHIR resource")
                    cov.add_resource(resource, scan.policy, scan.detector)
                    bar.update(1)
    _emit(report.build(cov, scan.meta(", ".join(Path(n).name for n in names), complete=True)), out)
    return 0


def _emit(doc: dict, out: Outputs) -> None:
    print(report.table(doc), file=sys.stderr if out.report == "-" else sys.stdout)
    if out.report == "-":
        print(json.dumps(doc, indent=2))
    elif out.report:
        Path(out.report).write_text(json.dumps(doc, indent=2))
    if out.html:
        Path(out.html).write_text(report.html(doc), encoding="utf-8")
