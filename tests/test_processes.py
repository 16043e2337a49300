"""The process model with real processes and real signals: SIGTERM drains, SIGHUP reloads (and rejects
a broken policy while the old one keeps serving), ``--workers N`` shares the port and replaces dead workers."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import ssl
import time

import orjson
import pytest
import trustme
from aiohttp import web

from tests.conftest import FHIR_JSON, TEST_POLICY
from tests.serving import Served, make_keyring, request

WITHOUT_BIRTHDATE = TEST_POLICY.replace("      - {path: birthDate, group: demographics}\n", "")


@pytest.fixture
def start(tmp_path, clean_upstream):
    """Factory: ``fhircrypt serve`` against the Medplum upstream with a policy file the test may rewrite."""
    ring, kek = make_keyring(tmp_path)
    policy = tmp_path / "policy.yaml"
    running: list[Served] = []

    def make(*args: str, policy_text: str = TEST_POLICY, **env: str) -> Served:
        policy.write_text(policy_text)
        served = Served(
            list(args),
            {
                "FHIRCRYPT_UPSTREAM": clean_upstream.base_url,
                "FHIRCRYPT_POLICY": str(policy),
                "FHIRCRYPT_KEYRING": str(ring),
                "FHIRCRYPT_KEK_FILE": str(kek),
                "FHIRCRYPT_AUTH": "none",
                **env,
            },
        )
        running.append(served)
        return served

    yield make
    for served in running:
        if served.proc.poll() is None:
            served.stop()


def _create(served: Served, birth_date: str, scheme: str = "http", context=None) -> int:
    body = orjson.dumps({"resourceType": "Patient", "birthDate": birth_date})
    status, _ = request("POST", served.url("/fhir/R4/Patient", scheme), body, FHIR_JSON, context)
    return status


def _stored(upstream) -> str:
    return orjson.dumps(upstream.dump()).decode()


def _metric(served: Served, name: str) -> float:
    status, text = served.get("/metrics")
    assert status == 200
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text.decode(), re.M))


def _wait_until(check, what: str, attempts: int = 400) -> None:
    """Poll a condition between real events (no timing is asserted: only that it happens)."""
    import time

    for _ in range(attempts):
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False


@pytest.fixture
async def slow_upstream(aiohttp_server):
    """A FHIR endpoint that holds each request until the test releases it: a request in flight on demand."""
    arrived, release = asyncio.Event(), asyncio.Event()
    held: list[web.Request] = []  # the requests the upstream holds now

    async def organization(request):
        held.append(request)
        arrived.set()
        await release.wait()
        return web.json_response({"resourceType": "Organization", "id": "o1"}, content_type="application/fhir+json")

    app = web.Application()
    app.router.add_get("/fhir/R4/Organization/o1", organization)
    server = await aiohttp_server(app)
    return str(server.make_url("/fhir/R4")), arrived, release, held


async def test_sigterm_drains_requests_in_flight_and_refuses_new_connections(start, slow_upstream):
    base, arrived, release, _ = slow_upstream
    served = start("--shutdown-timeout", "60", FHIRCRYPT_UPSTREAM=base)
    await asyncio.to_thread(served.wait_for, "listening")
    pending = asyncio.create_task(asyncio.to_thread(served.get, "/fhir/R4/Organization/o1"))
    await arrived.wait()  # the proxy is waiting for the upstream's answer
    served.signal(signal.SIGTERM)
    await asyncio.to_thread(served.wait_for, "draining")
    await asyncio.to_thread(_wait_until, lambda: _refused(served.port), "the listener is closed")
    release.set()
    status, body = await pending
    assert status == 200 and orjson.loads(body)["id"] == "o1"
    assert await asyncio.to_thread(served.proc.wait, 60) == 0
    await asyncio.to_thread(served.wait_for, "stopped")


@pytest.mark.parametrize("workers", [1, 2])
async def test_the_drain_deadline_is_one_shutdown_timeout_in_total_and_cut_requests_are_logged_as_cut(
    start, slow_upstream, workers
):
    base, _, release, held = slow_upstream
    served = start("--shutdown-timeout", "3", "--workers", str(workers), FHIRCRYPT_UPSTREAM=base)
    await asyncio.to_thread(served.wait_for, "listening", workers)
    pending = [asyncio.create_task(asyncio.to_thread(served.get, "/fhir/R4/Organization/o1")) for _ in range(2)]
    while len(held) < 2:  # both are waiting for the upstream's answer
        await asyncio.sleep(0.01)
    sent = time.monotonic()
    served.signal(signal.SIGTERM)
    assert await asyncio.to_thread(served.proc.wait, 60) == 0  # it did not wait for the upstream
    took = time.monotonic() - sent
    assert 2.0 <= took <= 3.0, f"exited {took:.2f} s after SIGTERM with --shutdown-timeout 3"
    for each in pending:
        with pytest.raises(OSError):  # the connection was closed without an answer
            await each
    release.set()
    requests = [e for e in served.events() if e.get("event") == "request"]
    assert [(e["status"], e.get("cut")) for e in requests] == [(0, "no answer was sent")] * 2
    assert sum(e["count"] for e in served.events() if e.get("event") == "requests-cut") == 2


def test_sighup_reloads_the_policy_and_rejects_one_that_does_not_compile(start, clean_upstream, tmp_path):
    policy = tmp_path / "policy.yaml"  # the file the start fixture wrote
    served = start(policy_text=WITHOUT_BIRTHDATE)
    served.wait_for("listening")
    assert _create(served, "1971-02-17") == 201
    assert "1971-02-17" in _stored(clean_upstream)  # not covered by the first policy

    policy.write_text(TEST_POLICY)
    served.signal(signal.SIGHUP)
    (reloaded,) = served.wait_for("reloaded")
    assert _create(served, "1982-03-18") == 201
    assert "1982-03-18" not in _stored(clean_upstream)  # the reloaded policy encrypts it

    policy.write_text(TEST_POLICY + "      - {path: id, group: clinical}\n")
    served.signal(signal.SIGHUP)
    (rejected,) = served.wait_for("reload-rejected")
    assert (
        rejected["level"] == "error"
        and "policy.yaml:" in rejected["msg"]
        and "'id' cannot be encrypted" in (rejected["msg"])
    )
    assert _create(served, "1993-04-19") == 201
    assert "1993-04-19" not in _stored(clean_upstream)  # the previous policy still serves
    status, ready = served.get("/readyz")
    assert status == 200 and orjson.loads(ready)["policy"].endswith(reloaded["policy_sha256"][:12])
    assert served.stop() == 0


def _certificate():
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return cert, ctx


def test_sighup_replaces_the_server_certificate_and_keeps_it_when_the_new_files_are_broken(start, tmp_path):
    cert_file, key_file = tmp_path / "tls.pem", tmp_path / "tls.key"
    first, first_ctx = _certificate()
    first.cert_chain_pems[0].write_to_path(str(cert_file))
    first.private_key_pem.write_to_path(str(key_file))
    served = start(FHIRCRYPT_TLS_CERT=str(cert_file), FHIRCRYPT_TLS_KEY=str(key_file))
    served.wait_for("listening")
    assert request("GET", served.url("/healthz", "https"), context=first_ctx)[0] == 200

    second, second_ctx = _certificate()
    second.cert_chain_pems[0].write_to_path(str(cert_file))
    second.private_key_pem.write_to_path(str(key_file))
    served.signal(signal.SIGHUP)
    served.wait_for("reloaded")
    assert request("GET", served.url("/healthz", "https"), context=second_ctx)[0] == 200
    with pytest.raises(OSError):  # ssl.SSLCertVerificationError inside a URLError
        request("GET", served.url("/healthz", "https"), context=first_ctx)

    key_file.write_text("-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
    served.signal(signal.SIGHUP)
    (rejected,) = served.wait_for("reload-rejected")
    assert rejected["part"] == "certificates"
    assert request("GET", served.url("/healthz", "https"), context=second_ctx)[0] == 200
    assert served.stop() == 0


def test_workers_share_the_port_are_replaced_when_they_die_and_metrics_add_up(start, clean_upstream):
    served = start("--workers", "2")
    served.wait_for("listening", count=2)
    (started,) = served.wait_for("supervisor-start")
    workers = started["workers"]
    assert len(workers) == 2 and served.proc.pid not in workers
    for n in range(12):  # a new connection each: the kernel spreads them over the workers
        assert _create(served, f"1950-01-{n + 10:02d}") == 201
    assert _metric(served, "fhircrypt_requests_total") == 12  # any worker answers with the sum of all

    os.kill(workers[0], signal.SIGKILL)
    (replaced,) = served.wait_for("worker-start")
    served.wait_for("listening", count=3)
    assert replaced["worker"] not in workers
    for n in range(4):
        assert _create(served, f"1951-02-{n + 10:02d}") == 201
    assert _metric(served, "fhircrypt_requests_total") == 16  # the dead worker's counts are kept
    assert "1950-01-10" not in _stored(clean_upstream)

    served.signal(signal.SIGHUP)
    served.wait_for("reloaded", count=2)  # forwarded to both workers
    assert served.stop() == 0
    served.wait_for("supervisor-stopped")
    for pid in (workers[1], replaced["worker"]):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_broken_configuration_fails_at_once_with_exit_code_2(start):
    served = start("--workers", "2", FHIRCRYPT_POLICY="/nonexistent/policy.yaml")
    assert served.proc.wait(timeout=60) == 2
    assert "policy" in "".join(served.lines)
