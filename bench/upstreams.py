"""The benchmark's upstream FHIR servers: Medplum's test router (the default) and HAPI FHIR's JPA server.

The benchmark needs five things of an upstream, and the two servers give them differently:

* its FHIR base (``/fhir/R4`` on Medplum's test server, ``/fhir`` on HAPI); every target is
  asked on the same path, since fhircrypt's public base defaults to the upstream's path and
  the passthrough forwards paths as they are;
* the process whose CPU time is the upstream's share (node; the JVM, all its threads);
* a reset before every phase: Medplum's test-only ``$admin/reset``; HAPI's own ``$expunge``
  of everything, which is far cheaper than a JVM start and empties the same store. HAPI
  refuses a reference to a resource it does not hold, so the reset also puts back the
  Organization the fixture Patient refers to (an empty resource: nothing to encrypt);
* the Bulk export workload's data: Medplum's test server repeats one stored Patient as many
  times as asked (its ``copies`` option); HAPI exports what it really stores, so the
  benchmark stores that many Patients through the target first;
* how long an export may take: Medplum's finishes at once, HAPI runs it as a Batch2 job
  whose steps advance on a maintenance pass (every 2 s on the test server);
* a warm-up: HAPI runs on a JVM that compiles its hot paths after the first thousands of
  requests, so every workload runs for a few seconds, unmeasured, before the first round
  (the target measured first would otherwise pay for it). The JVM runs with its full JIT,
  not the C1-only start-up mode of the test suite.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from typing import Protocol

from tests.hapi_server import HEAP, HapiServer, HapiServerError
from tests.upstream_server import UpstreamServer

# The fixture Patient's managingOrganization (bench.core.patient_bytes puts this id in).
ORGANIZATION_ID = "org-1"
RESET_ATTEMPTS = 5


class BenchUpstream(Protocol):
    name: str
    label: str  # for the report's header and chart
    reset_method: str  # for the results' method section
    export_data: str  # what the export workload's Patients are, for the method section
    export_poll_seconds: float  # the interval of the status polls
    export_timeout: float  # how long an export may take to complete
    warmup_seconds: float  # per workload before the first round (a JVM compiles its hot paths first)

    @property
    def base_url(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def pid(self) -> int: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def reset(self) -> None: ...
    def prepare_export(self, lines: int) -> int:
        """Make the next export hold ``lines`` Patients; the number of Patients to store for it."""
        ...

    def facts(self) -> dict: ...


class _Delegating:
    """What both upstreams take from their test-server object alike."""

    server: UpstreamServer | HapiServer

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    @property
    def pid(self) -> int:
        """The server's process (node; the JVM): the test servers keep their Popen private."""
        proc = self.server._proc
        if proc is None:
            raise RuntimeError("the upstream is not running")
        return proc.pid

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


@dataclass
class Medplum(_Delegating):
    """Medplum's FHIR router behind the test server (tests/upstream/), in-memory repository."""

    name = "medplum"
    label = "Medplum upstream"
    reset_method = "POST /$admin/reset (the test server's), then the workload's data seeded through the target"
    export_data = "one Patient stored through the target, repeated by the test server's copies option"
    export_poll_seconds = 0.05
    export_timeout = 5.0
    warmup_seconds = 0.0

    def __post_init__(self) -> None:
        self.server = UpstreamServer()

    def reset(self) -> None:
        self.server.reset()

    def prepare_export(self, lines: int) -> int:
        """One Patient stored, exported ``lines`` times (the test server's ``copies`` option)."""
        body = json.dumps({"copies": lines}).encode()
        req = urllib.request.Request(f"{self.server.admin_url}/bulk-options", data=body, method="POST")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=30) as resp:
            if resp.status != 200:
                raise RuntimeError(f"bulk-options: HTTP {resp.status}")
        return 1

    def facts(self) -> dict:
        return {"name": self.name, "server": "Medplum FHIR router 4.5.2 (tests/upstream), in-memory repository, node"}


@dataclass
class Hapi(_Delegating):
    """HAPI FHIR's JPA server (tests/hapi/), R4 on an in-memory H2 database, bounded heap."""

    name = "hapi"
    label = "HAPI FHIR JPA upstream"
    reset_method = (
        "POST [base]/$expunge (expungeEverything) and PUT of the empty Organization the Patient refers to, "
        "then the workload's data seeded through the target"
    )
    export_data = "as many Patients stored through the target; HAPI's own asynchronous export (Batch2)"
    export_poll_seconds = 0.5
    export_timeout = 300.0
    warmup_seconds = 5.0

    def __post_init__(self) -> None:
        self.server = HapiServer(fast_startup=False)  # the JIT's full tiers, as a deployment runs

    def reset(self) -> None:
        """``$expunge``, retried: a closed-loop phase ends without waiting for its last answers, and
        HAPI refuses to expunge while a create still in flight writes its index rows (HAPI-0550,
        a foreign-key violation: seen after wrk's create phase)."""
        for attempt in range(RESET_ATTEMPTS):
            try:
                self.server.reset()
                break
            except HapiServerError:
                if attempt == RESET_ATTEMPTS - 1:
                    raise
                time.sleep(1.0)
        stub = {"resourceType": "Organization", "id": ORGANIZATION_ID}
        status, answer = self.server.request("PUT", f"/Organization/{ORGANIZATION_ID}", stub)
        if status not in (200, 201):
            raise HapiServerError(f"PUT Organization/{ORGANIZATION_ID} after $expunge: HTTP {status}: {answer}")

    def prepare_export(self, lines: int) -> int:
        """HAPI exports what it stores: ``lines`` Patients, each stored through the target."""
        return lines

    def facts(self) -> dict:
        """The version HAPI reports in its CapabilityStatement, the JVM's, and the start-up time."""
        software = self.server.request("GET", "/metadata")[1].get("software", {})
        java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()
        return {
            "name": self.name,
            "server": f"HAPI FHIR JPA server {software.get('version', '?')} (tests/hapi), R4, in-memory H2, "
            f"-Xmx{HEAP} -XX:+UseSerialGC",
            "java": java[0] if java else None,
            "startup_s": self.server.startup_seconds,
        }


UPSTREAMS: dict[str, type[Medplum] | type[Hapi]] = {"medplum": Medplum, "hapi": Hapi}
