"""Requests aiohttp's HTTP parser rejects before fhircrypt's handler runs: a real ``fhircrypt serve``
answers them with an OperationOutcome that quotes nothing of the request, and logs no part of it."""

from __future__ import annotations

import json
import socket

import pytest

from tests.conftest import ROOT
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
