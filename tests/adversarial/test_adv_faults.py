"""Fault injection: an upstream whose behaviour each test sets, a failing key provider, a full disk.

The upstream here is a small real aiohttp server (not the Medplum one) because the faults
are its behaviour: answering too slowly, resetting the connection in the middle of a body,
5xx, broken JSON, ciphertext the proxy did not write, tampered envelopes. It counts every
request by method, so "no retry of a non-idempotent request" is a count.
Expected everywhere: a clear 502/503/504 OperationOutcome or masked data with the
integrity header, never plaintext from a failed check, one upstream hit per POST, and
normal service as soon as the fault clears.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import resource
import time

import orjson
import pytest
from aiohttp import web

from proxy.keymgmt.keyring import Keyring, load_keyring, save_keyring
from proxy.keymgmt.providers.base import KeyringError
from proxy.keymgmt.providers.local import LocalKeyProvider, generate_kek, parse_kek
from proxy.transform.bodies import encrypt_for_write
from proxy.transform.markers import CIPHERTEXT_URL, GROUP_URL
from tests.adversarial.harness import ServedProxy
from tests.conftest import FHIR_JSON, sealed_groups, spoil

NIK = "3174112233445566"
NAME = "Faultinjectedname"
PATIENT = {
    "resourceType": "Patient",
    "id": "f1",
    "identifier": [{"system": "https://fhir.kemkes.go.id/id/nik", "value": NIK}],
    "name": [{"family": NAME}],
}


class FaultyUpstream:
    """A FHIR-ish upstream whose next answers follow ``mode``; ``stored`` is what it serves."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.stored: dict = {}
        self.hits: collections.Counter[str] = collections.Counter()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.method] += 1
        await request.read()
        mode = self.mode
        if mode == "slow":
            await asyncio.sleep(3)
        if mode == "5xx":
            outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "transient"}]}
            return web.json_response(outcome, status=503, content_type="application/fhir+json")
        if mode == "reset":
            resp = web.StreamResponse(headers={"Content-Type": "application/fhir+json", "Content-Length": "5000"})
            await resp.prepare(request)
            await resp.write(orjson.dumps(self.stored)[:40])
            request.transport.abort()  # connection reset in the middle of the body
            return resp
        bodies = {
            "invalid-json": b'{"resourceType": "Patient", name: }',
            "truncated-json": orjson.dumps(self.stored)[:-7],
            "deep-json": b'{"resourceType":"Patient","x":' + b"[" * 600 + b"]" * 600 + b"}",
            "not-json": b"<html>proxy error</html>",
            "ndjson-truncated": orjson.dumps(self.stored) + b"\n" + orjson.dumps(self.stored)[:9],
        }
        if mode in bodies:
            ctype = "text/html" if mode == "not-json" else "application/fhir+json"
            return web.Response(body=bodies[mode], content_type=ctype)
        status = 201 if request.method == "POST" else 200
        return web.Response(body=orjson.dumps(self.stored), status=status, content_type="application/fhir+json")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


@pytest.fixture
async def faulty(aiohttp_server, proxy_for, satusehat, keyring):
    upstream = FaultyUpstream()
    server = await aiohttp_server(upstream.app())
    upstream.stored = _sealed(PATIENT, satusehat, keyring)
    client = await proxy_for(str(server.make_url("/fhir/R4")), satusehat, upstream_timeout=1.0)
    return upstream, client


def _sealed(resource: dict, policy, ring: Keyring) -> dict:
    stored = copy.deepcopy(resource)
    encrypt_for_write(stored, policy, ring, validate="off")
    return stored


async def _outcome(resp) -> str:
    body = await resp.read()
    assert NIK.encode() not in body and NAME.encode() not in body
    outcome = orjson.loads(body)
    assert outcome["resourceType"] == "OperationOutcome"
    return outcome["issue"][0]["code"]


FAULTS = {
    # mode: (status the client gets, OperationOutcome code)
    "slow": (504, "timeout"),
    "reset": (502, "transient"),
    "invalid-json": (502, "structure"),
    "truncated-json": (502, "structure"),
    "deep-json": (502, "structure"),
    "not-json": (502, "not-supported"),
    "ndjson-truncated": (502, "structure"),
    "5xx": (503, "transient"),
}


@pytest.mark.parametrize("mode", list(FAULTS))
async def test_upstream_faults_give_clear_errors_and_service_recovers(faulty, mode):
    upstream, client = faulty
    upstream.mode = mode
    expected_status, expected_code = FAULTS[mode]
    resp = await client.get("/fhir/R4/Patient/f1")
    assert resp.status == expected_status
    assert await _outcome(resp) == expected_code
    upstream.mode = "ok"  # the fault clears
    resp = await client.get("/fhir/R4/Patient/f1")
    assert resp.status == 200
    assert (await resp.json())["name"] == [{"family": NAME}]


@pytest.mark.parametrize("mode", ["slow", "reset", "5xx", "truncated-json"])
async def test_a_failed_create_is_not_retried(faulty, mode):
    upstream, client = faulty
    upstream.mode = mode
    body = orjson.dumps({k: v for k, v in PATIENT.items() if k != "id"})
    resp = await client.post("/fhir/R4/Patient", data=body, headers=FHIR_JSON)
    assert resp.status in (502, 503, 504)
    await _outcome(resp)
    assert upstream.hits["POST"] == 1  # one client request, one upstream attempt: no duplicate registration


async def test_ciphertext_written_under_another_keyring_is_masked_never_returned(faulty, satusehat):
    upstream, client = faulty
    upstream.stored = _sealed(PATIENT, satusehat, Keyring.generate())  # not this proxy's keys
    resp = await client.get("/fhir/R4/Patient/f1")
    assert resp.status == 200
    body = await resp.read()
    assert NIK.encode() not in body and NAME.encode() not in body and CIPHERTEXT_URL.encode() not in body
    assert resp.headers["X-Fhircrypt-Integrity"].startswith("failed")
    assert any(s["code"] == "MASKED" for s in orjson.loads(body)["meta"]["security"])


@pytest.mark.parametrize("where", ["envelope", "element", "swap", "plaintext-added"])
async def test_tampered_records_are_masked_never_returned(faulty, satusehat, keyring, where):
    upstream, client = faulty
    stored = _sealed(PATIENT, satusehat, keyring)
    other = _sealed({**PATIENT, "name": [{"family": "Otherperson"}]}, satusehat, keyring)
    text = orjson.dumps(stored).decode()
    if where == "envelope":
        env = next(e for e in stored["extension"] if e["url"].endswith("envelope"))
        env["valueString"] = env["valueString"][:-6] + ("AAAAAA" if env["valueString"][-6:] != "AAAAAA" else "BBBBBB")
    elif where == "element":  # the ciphertext holding the name (format v2: its group's)
        spoil(sealed_groups(stored)["demographics"])
    elif where == "swap":  # a valid ciphertext of another record under the same keys
        sealed_groups(stored)["demographics"]["valueString"] = sealed_groups(other)["demographics"]["valueString"]
    else:
        stored["name"].append({"family": "Injected plaintext"})
    assert text != orjson.dumps(stored).decode() or where == "plaintext-added"
    upstream.stored = stored
    resp = await client.get("/fhir/R4/Patient/f1")
    body = await resp.read()
    assert resp.status == 200
    assert resp.headers["X-Fhircrypt-Integrity"].startswith("failed")
    # the whole record is masked when its envelope or MAC fails; injected plaintext is masked where it sits
    withheld = ("Injected plaintext", CIPHERTEXT_URL) if where == "plaintext-added" else (NAME, "Otherperson")
    for value in (*withheld, CIPHERTEXT_URL, GROUP_URL):
        assert value.encode() not in body


class FaultyKeyProvider:
    """Wraps a key provider with errors and latency that a test switches on and off.

    It implements the provider interface's calls (wrap, unwrap, describe, and ``check`` where
    the inner provider has it; a wrap ``context`` is passed through), so it fits any provider.
    """

    def __init__(self, inner: LocalKeyProvider) -> None:
        self.inner = inner
        self.type = getattr(inner, "type", "local")
        self.fail: BaseException | None = None
        self.fail_after = 0  # calls that succeed before ``fail`` is raised
        self.latency = 0.0
        self.calls = 0

    def _call(self) -> None:
        self.calls += 1
        if self.latency:
            time.sleep(self.latency)
        if self.fail is not None and self.calls > self.fail_after:
            raise self.fail

    def wrap(self, key: bytes, *context) -> bytes:
        self._call()
        return self.inner.wrap(key, *context)

    def unwrap(self, wrapped: bytes, *context) -> bytes:
        self._call()
        return self.inner.unwrap(wrapped, *context)

    def check(self) -> None:
        self._call()
        getattr(self.inner, "check", lambda: None)()

    def describe(self) -> dict[str, str]:
        return self.inner.describe()


@pytest.mark.parametrize(
    "error", [KeyringError("key provider unavailable (HSM session closed)"), OSError(110, "Connection timed out")]
)
def test_key_provider_errors_stop_loading_clearly_and_recover(tmp_path, error):
    kek = parse_kek(generate_kek())
    ring = Keyring.generate()
    save_keyring(tmp_path / "k.json", ring, LocalKeyProvider(kek))
    provider = FaultyKeyProvider(LocalKeyProvider(kek))
    provider.fail = error
    with pytest.raises(type(error)) as raised:
        load_keyring(tmp_path / "k.json", provider)
    assert kek.hex() not in str(raised.value)
    provider.fail, provider.latency = None, 0.2  # the provider comes back, slowly
    loaded = load_keyring(tmp_path / "k.json", provider)
    assert loaded.primary() == ring.primary()


def test_a_provider_failing_while_saving_leaves_the_keyring_untouched(tmp_path):
    kek = parse_kek(generate_kek())
    ring = Keyring.generate()
    path = tmp_path / "k.json"
    save_keyring(path, ring, LocalKeyProvider(kek))
    before = path.read_bytes()
    provider = FaultyKeyProvider(LocalKeyProvider(kek))
    provider.fail, provider.fail_after = KeyringError("wrap refused"), 1  # fails half way through the keys
    ring.rotate()
    with pytest.raises(KeyringError):
        save_keyring(path, ring, provider)
    assert path.read_bytes() == before  # no half-written keyring: no data loss
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.json"]


def test_a_full_disk_for_the_audit_trail_refuses_then_recovers_without_losing_records(upstream, tmp_path):
    """The proxy process may not grow files beyond 48 KiB (RLIMIT_FSIZE): its audit trail fills up.
    Records queue (no loss), then requests are refused with 503 (fail-closed), then the limit is
    lifted and the queued records are written; the trail verifies."""
    from proxy.audit.cli import init_trail, load_key_file
    from proxy.audit.trail import verify

    trail, key = tmp_path / "audit.jsonl", tmp_path / "audit.key"
    init_trail(trail, key)
    settings = {"audit_trail": str(trail), "audit_max_backlog": 20}
    upstream.reset()
    with ServedProxy(upstream.base_url, settings=settings, fsize_limit=48 * 1024) as proxy:
        statuses = []
        for _ in range(400):
            statuses.append(
                proxy.request("GET", "/fhir/R4/metadata", headers={"Accept": "application/fhir+json"}).status
            )
            if statuses[-1] == 503:
                break
        assert statuses[-1] == 503, "the trail never filled up"
        refused = proxy.request("GET", "/fhir/R4/Patient?_count=1", headers={"Accept": "application/fhir+json"})
        assert refused.status == 503 and refused.json()["resourceType"] == "OperationOutcome"
        assert "retry-after" in refused.headers
        answered = statuses.count(200)
        resource.prlimit(proxy.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        deadline = time.monotonic() + 30
        while proxy.request("GET", "/fhir/R4/metadata", headers={"Accept": "application/fhir+json"}).status != 200:
            assert time.monotonic() < deadline, "the proxy did not recover after the disk was freed"
            time.sleep(0.5)
        assert 500 not in statuses
    result = verify(trail, load_key_file(key))
    assert result.ok, str(result)
    assert result.records >= answered  # every answered request is in the trail
