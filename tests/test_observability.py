"""Logs, metrics and probes: request ids end to end, readiness states, and no PHI in any log line or metric
after a broad sample of traffic (every fixture written, read, searched, updated, patched, and refused)."""

from __future__ import annotations

import json
import re
from urllib.parse import quote

import orjson
import pytest

from proxy.policy.sentinel import DETECTORS
from tests.conftest import FHIR_JSON, FIXTURES, ROOT, unit_policy
from tests.serving import Served, make_keyring, request
from tests.test_shipped_policies import CREATED_IDS, ORDER, _fixture

INTERACTIONS = {
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "create",
    "search-type",
    "search-system",
    "search-compartment",
    "history-instance",
    "history-type",
    "history-system",
    "capabilities",
    "batch",
    "operation-type",
    "operation-instance",
    "operation-system",
    "unclassified",
}
_SAMPLE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? \S+$")


def _traffic(served: Served, policy_name: str) -> None:
    """Every fixture through the proxy: create, read, search by id, update, plus searches and refusals
    that carry the plaintext values (in URLs, bodies and headers)."""
    needles = json.loads((FIXTURES / policy_name / "needles.json").read_text())
    ids: dict[str, str] = {}
    base = "/fhir/R4"
    for name in ORDER[policy_name]:
        resource = _fixture(policy_name, name, ids)
        rtype = resource["resourceType"]
        status, body = request("POST", served.url(f"{base}/{rtype}"), orjson.dumps(resource), FHIR_JSON)
        assert status == 201, body[:300]
        rid = orjson.loads(body)["id"]
        if name in CREATED_IDS:
            ids[CREATED_IDS[name]] = rid
        assert served.get(f"{base}/{rtype}/{rid}")[0] == 200
        assert served.get(f"{base}/{rtype}?_id={rid}")[0] == 200
        update = orjson.dumps({**resource, "id": rid})
        assert request("PUT", served.url(f"{base}/{rtype}/{rid}"), update, FHIR_JSON)[0] == 200
        for needle in needles[name][:4]:  # values in query strings: rewritten to tokens, or refused
            served.get(f"{base}/{rtype}?identifier={quote(needle)}")
            served.get(f"{base}/{rtype}?_content={quote(needle)}")
            served.get(f"{base}/{rtype}?_filter={quote('name eq ' + needle)}")
        # refusals whose bodies carry the values: XML, broken JSON, a mismatched type
        request("POST", served.url(f"{base}/{rtype}"), body_xml(needles[name]), {"Content-Type": "application/xml"})
        request("POST", served.url(f"{base}/{rtype}"), orjson.dumps(resource)[:-3], FHIR_JSON)
        request("POST", served.url(f"{base}/Basic"), orjson.dumps(resource), FHIR_JSON)
    patient = ids["PATIENT_ID"]
    needle = needles["patient.json"][0]
    patch = orjson.dumps([{"op": "replace", "path": "/birthDate", "value": "1987-03-29"}])
    status, body = request(
        "PATCH", served.url(f"{base}/Patient/{patient}"), patch, {"Content-Type": "application/json-patch+json"}
    )
    assert status == 200, body[:300]
    served.get(f"{base}/Patient?identifier={quote('https://fhir.kemkes.go.id/id/nik|' + needle)}")
    served.get(f"{base}/Patient?name={quote(needles['patient.json'][6])}")
    served.get(f"{base}/Patient/{quote(needle)}")  # a value where an id belongs
    request("GET", served.url(f"{base}/Patient/{patient}"), headers={"X-Request-ID": "trace-7f3a9c"})


def body_xml(values: list[str]) -> bytes:
    return ("<Patient>" + "".join(f"<value>{v}</value>" for v in values) + "</Patient>").encode()


@pytest.mark.parametrize("policy_name", sorted(ORDER))
def test_no_log_line_and_no_metric_carries_phi(policy_name, tmp_path, clean_upstream):
    ring, kek = make_keyring(tmp_path)
    from proxy.audit.cli import init_trail

    init_trail(str(tmp_path / "audit.jsonl"), str(tmp_path / "audit.key"))
    served = Served(
        [
            "--upstream",
            clean_upstream.base_url,
            "--policy",
            str(ROOT / "policies" / f"{policy_name}.yaml"),
            "--log-level",
            "debug",
            "--audit-trail",
            str(tmp_path / "audit.jsonl"),
        ],
        {"FHIRCRYPT_KEYRING": str(ring), "FHIRCRYPT_KEK_FILE": str(kek), "FHIRCRYPT_AUTH": "none"},
    )
    try:
        served.wait_for("listening")
        at_start = _provider_calls(served.get("/metrics")[1].decode())
        _traffic(served, policy_name)
        status, metrics = served.get("/metrics")
        assert status == 200
    finally:
        assert served.stop() == 0
    log = "".join(served.lines)
    by_fixture = json.loads((FIXTURES / policy_name / "needles.json").read_text())
    needles = [n for values in by_fixture.values() for n in values]
    leaked = sorted({n for n in needles if n in log})
    assert not leaked, f"PHI in the log: {leaked}"
    events = served.events()
    assert all("unparsed" not in e for e in events), "every log line is JSON"
    requests = [e for e in events if e.get("event") == "request"]
    assert len(requests) > 50 and all(re.fullmatch(r"[0-9a-f]{32}|trace-7f3a9c", e["request_id"]) for e in requests)
    assert any(e["request_id"] == "trace-7f3a9c" and e["status"] == 200 for e in requests)
    text = metrics.decode()
    leaked = sorted({n for n in needles if n in text})
    assert not leaked, f"PHI in /metrics: {leaked}"
    _assert_closed_labels(text)
    assert re.search(r'^fhircrypt_elements_total\{operation="encrypted"\} [1-9]', text, re.M)
    assert re.search(r'^fhircrypt_refusals_total\{reason="not-supported"\} [1-9]', text, re.M)
    # keys were unwrapped at start-up; over all that traffic the key provider was not called again
    assert at_start.get("unwrap", 0) >= 1
    assert _provider_calls(text) == at_start


def _provider_calls(metrics: str) -> dict[str, float]:
    """fhircrypt_key_provider_calls_total by operation (successful calls)."""
    found = re.findall(r'^fhircrypt_key_provider_calls_total\{operation="(\w+)",result="ok"\} (\S+)', metrics, re.M)
    return {operation: float(count) for operation, count in found}


def _assert_closed_labels(text: str) -> None:
    """Every label value comes from a closed set: no ids, values or free text can get in."""
    allowed = {
        "interaction": INTERACTIONS,
        "status": re.compile(r"[1-5][0-9][0-9]"),
        "reason": re.compile(r"[a-z][a-z-]{1,30}"),  # OperationOutcome issue type codes
        "operation": {"encrypted", "decrypted", "masked", "wrap", "unwrap", "check"},
        "result": {"ok", "rejected", "error"},
        "detector": set(DETECTORS),  # fhircrypt_sentinel_reports_total: a clear phone or e-mail reported
        "le": re.compile(r"[0-9.e+-]+|\+Inf"),
    }
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith("fhircrypt_"):
            continue
        match = _SAMPLE.match(line)
        assert match, line
        for pair in filter(None, (match["labels"] or "").split(",")):
            key, _, value = pair.partition("=")
            value = value.strip('"')
            rule = allowed.get(key)
            assert rule is not None, f"unexpected label {key} in {line}"
            ok = value in rule if isinstance(rule, set) else rule.fullmatch(value)
            assert ok, f"label {key}={value!r} is not from its closed set"


async def test_request_ids_are_accepted_propagated_and_answered(proxy_for, clean_upstream):
    client = await proxy_for(clean_upstream.base_url, unit_policy())
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    resp = await client.get("/fhir/R4/metadata", headers={"X-Request-ID": "lb-1234-abcd", "traceparent": trace})
    assert resp.headers["X-Request-ID"] == "lb-1234-abcd"
    forwarded = clean_upstream.requests()[-1]["headers"]
    assert forwarded["x-request-id"] == "lb-1234-abcd" and forwarded["traceparent"] == trace
    resp = await client.get("/fhir/R4/metadata", headers={"X-Request-ID": "bad id with spaces"})
    assert re.fullmatch(r"[0-9a-f]{32}", resp.headers["X-Request-ID"])  # replaced, not echoed


async def test_readiness_names_each_check(proxy_for, clean_upstream):
    ready = await proxy_for(clean_upstream.base_url, unit_policy())
    resp = await ready.get("/readyz")
    body = await resp.json()
    assert resp.status == 200 and body["checks"] == {"keys": "ok", "policy": "ok", "upstream": "ok"}
    assert (await ready.get("/healthz")).status == 200
    down = await proxy_for("http://127.0.0.1:1/fhir/R4", unit_policy())
    resp = await down.get("/readyz")
    assert resp.status == 503 and (await resp.json())["checks"]["upstream"] == "unreachable"
    assert (await down.get("/healthz")).status == 200  # alive: a restart would not bring the upstream back


async def test_metrics_can_be_switched_off(proxy_for, clean_upstream):
    client = await proxy_for(clean_upstream.base_url, unit_policy(), metrics=False)
    resp = await client.get("/metrics")
    assert resp.status == 404  # served as a FHIR path: not a FHIR endpoint of this proxy


async def test_identities_in_request_headers_are_not_passed_on(proxy_for, clean_upstream):
    """A correlation id, trace state or user agent is sent upstream, logged and audited: one in which the
    PHI sentinel's detectors recognise a NIK, a phone number or an e-mail address is replaced or dropped."""
    client = await proxy_for(clean_upstream.base_url, unit_policy())
    nik, phone = "3273012903870002", "+6281234567890"
    headers = {
        "X-Request-ID": nik,
        "User-Agent": f"emr/2.1 (patient {phone})",
        "tracestate": f"emr={nik}",
        "Accept-Language": "id-ID",
    }
    resp = await client.get("/fhir/R4/metadata", headers=headers)
    assert resp.status == 200 and re.fullmatch(r"[0-9a-f]{32}", resp.headers["X-Request-ID"])
    forwarded = clean_upstream.requests()[-1]["headers"]
    assert not [name for name, value in forwarded.items() if nik in value or phone in value]
    assert forwarded["accept-language"] == "id-ID"  # what is no identity still passes
