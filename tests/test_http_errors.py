"""Requests aiohttp's HTTP parser rejects before fhircrypt's handler runs: a real ``fhircrypt serve``
answers them with an OperationOutcome that quotes nothing of the request, and logs no part of it."""

from __future__ import annotations

import json
import socket

import pytest

from proxy.web.app import create_app, ops_app
from tests.conftest import ROOT, make_settings, unit_policy
from tests.serving import Served, make_keyring

NIK = "3175042903870007"
NAME = "Santoso"

MALFORMED = {
    "control byte in the query": f"GET /fhir/R4/Patient?identifier={NIK}\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
    "space in the query": f"GET /fhir/R4/Patient?name=Budi {NAME} HTTP/1.1\r\nHost: x\r\n\r\n",
    "invalid header name": f"GET /fhir/R4/Patient HTTP/1.1\r\nHost: x\r\nX-Bad\x01: {NIK}\r\n\r\n",
    "request line too long": f"GET /fhir/R4/Patient?name={NAME}{'a' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n",
    "header too long": f"GET /fhir/R4/Patient HTTP/1.1\r\nHost: x\r\nX-Note: {NIK}{'b' * 9000}\r\n\r\n",
}


def _exchange(port: int, raw: str) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(raw.encode("latin-1"))
        data = b""
        while chunk := conn.recv(65536):  # the proxy closes the connection after an error answer
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    ring, kek = make_keyring(tmp_path_factory.mktemp("keys"))
    proxy = Served(
        ["--upstream", "http://127.0.0.1:9/fhir/R4", "--policy", str(ROOT / "policies" / "satusehat.yaml"),
         "--log-level", "debug"],
        {"FHIRCRYPT_KEYRING": str(ring), "FHIRCRYPT_KEK_FILE": str(kek), "FHIRCRYPT_AUTH": "none"},
    )  # fmt: skip
    proxy.wait_for("listening")
    yield proxy
    assert proxy.stop() == 0


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_unparseable_requests_get_an_operation_outcome_that_quotes_nothing(served, case):
    status, headers, body = _exchange(served.port, MALFORMED[case])
    assert 400 <= status < 500, case
    assert headers["content-type"].startswith("application/fhir+json")
    outcome = json.loads(body)
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["severity"] == "error" and outcome["issue"][0]["diagnostics"]
    assert NIK.encode() not in body and NAME.encode() not in body and b"GET" not in body
    log = "".join(served.lines)
    assert NIK not in log and NAME not in log, "the rejected request reached the log"


def test_a_well_formed_request_still_reaches_the_handler(served):
    status, headers, body = _exchange(
        served.port, "GET /fhir/R4/Patient/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status == 502  # the handler ran: it tried the (unreachable) upstream and said so as FHIR
    assert json.loads(body)["resourceType"] == "OperationOutcome"
    assert headers["x-request-id"]


def _get(port: int, target: str) -> tuple[int, dict[str, str], bytes]:
    return _exchange(port, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")


def test_every_answer_names_the_server_without_versions(served):
    answers = {
        "unparseable": _exchange(served.port, MALFORMED["space in the query"]),
        "upstream down": _get(served.port, "/fhir/R4/Patient/x"),
        "not a route": _get(served.port, "/nowhere"),
        "liveness": _get(served.port, "/healthz"),
        "readiness": _get(served.port, "/readyz"),
    }
    assert {name: status for name, (status, _, _) in answers.items()} == {
        "unparseable": 400,
        "upstream down": 502,
        "not a route": 404,
        "liveness": 200,
        "readiness": 503,
    }
    assert {name: headers.get("server") for name, (_, headers, _) in answers.items()} == dict.fromkeys(
        answers, "fhircrypt"
    )


async def test_the_ops_listener_names_the_server_too(aiohttp_client, keyring):
    app = create_app(make_settings("http://127.0.0.1:9/fhir/R4"), unit_policy(), keyring)
    client = await aiohttp_client(ops_app(app))
    for path in ("/healthz", "/metrics", "/nowhere"):
        resp = await client.get(path)
        assert resp.headers["Server"] == "fhircrypt", path


def test_an_unreachable_upstream_is_logged_with_its_host_and_error_class_only(served):
    status, _, _ = _get(served.port, "/fhir/R4/Patient?_id=q7secret")
    assert status == 502
    event = served.wait_for("upstream-unreachable")[-1]
    assert event["upstream"] == "127.0.0.1:9"
    assert event["error"] == "ClientConnectorError (ConnectionRefusedError)"
    assert "q7secret" not in json.dumps(event) and "/fhir" not in json.dumps(event)
