"""The access matrix: every read route x every caller kind of the SATUSEHAT policy x own / other patient.

Each cell says exactly what comes back, through a real proxy with real JWTs in front of the
Medplum test server:

  P  200, the checked element in plaintext      M  200, the checked element masked
  R  403 OperationOutcome, nothing of the record (in a batch: the entry answered 403)
  A  200, the record absent from the answer
  F  forwarded and answered (no record to check: history of a type, Bulk kick-off)

A row is ``own other``: the target is patient ``pat-a`` (or its Condition ``cond-a``) and then
``pat-b`` (``cond-b``); every patient app below is launched for ``pat-a``. The table must name
every rule of the shipped policy and every read route listed here, so a new role or route fails
until somebody decides what it may see.
"""

from __future__ import annotations

import orjson
import pytest

from tests import test_auth
from tests.test_auth import bearer

issuer, jwt_proxy, proxy, stored = test_auth.issuer, test_auth.jwt_proxy, test_auth.proxy, test_auth.stored

USER = "user/*.rs"
CALLERS = {
    # caller: (claims, extra headers, the policy rule it exercises)
    "physician": ({"realm_access": {"roles": ["physician"]}, "scope": USER}, {}, "physician"),
    "clerk": ({"realm_access": {"roles": ["registration"]}, "scope": USER}, {}, "registration-clerk"),
    "billing": ({"realm_access": {"roles": ["billing"]}, "scope": USER}, {}, "billing-officer"),
    "pharmacist": ({"realm_access": {"roles": ["pharmacist"]}, "scope": USER}, {}, "pharmacist"),
    "bridge": ({"scope": "system/*.rs", "azp": "satusehat-bridge"}, {}, "satusehat-bridge"),
    "break-glass": (
        {"realm_access": {"roles": ["emergency"]}, "scope": USER},
        {"X-Break-Glass-Reason": "unconscious patient in ER"},
        "break-glass",
    ),
    "app A": ({"scope": "patient/*.rs", "patient": "pat-a"}, {}, "patient-app"),
    "app A, mixed": ({"scope": "patient/*.rs user/Patient.rs", "patient": "pat-a"}, {}, "patient-app"),
    "no scopes": ({}, {}, None),
}

ROUTES = {
    # route: (method, path for a target, checked type) - {p}: patient id, {c}: condition id
    "read Patient": ("GET", "Patient/{p}", "Patient"),
    "read Condition": ("GET", "Condition/{c}", "Condition"),
    "vread Condition": ("GET", "Condition/{c}/_history/1", "Condition"),
    "search Patient": ("GET", "Patient?_id={p}", "Patient"),
    "search Condition": ("GET", "Condition?_id={c}", "Condition"),
    "history Condition": ("GET", "Condition/{c}/_history", "Condition"),
    "everything": ("GET", "Patient/{p}/$everything", "Condition"),
    "batch read": ("POST", "", "Condition"),
    "type history": ("GET", "Condition/_history", None),
    "system history": ("GET", "_history", None),
    "Patient export": ("GET", "Patient/$export", None),
}

MATRIX = {
    #                read-P read-C vread  srch-P srch-C hist-C every  batch  t-hist s-hist export
    "physician":    "PP     PP     PP     PP     PP     PP     PP     PP     FF     FF     FF",
    "clerk":        "PP     MM     MM     PP     MM     MM     MM     MM     FF     FF     FF",
    "billing":      "MM     MM     MM     MM     MM     MM     MM     MM     FF     FF     FF",
    "pharmacist":   "PP     MM     MM     PP     MM     MM     MM     MM     FF     FF     FF",
    "bridge":       "PP     PP     PP     PP     PP     PP     PP     PP     FF     FF     FF",
    "break-glass":  "PP     PP     PP     PP     PP     PP     PP     PP     FF     FF     FF",
    "app A":        "PR     PR     PR     PA     PA     PA     PR     PR     RR     RR     RR",
    "app A, mixed": "PM     PR     PR     PM     PA     PA     PA     PR     RR     RR     RR",
    "no scopes":    "RR     RR     RR     RR     RR     RR     RR     RR     RR     RR     RR",
}  # fmt: skip

TARGETS = {"own": {"p": "pat-a", "c": "cond-a"}, "other": {"p": "pat-b", "c": "cond-b"}}


def test_the_matrix_names_every_rule_and_route(satusehat):
    rules = {r.name for r in satusehat.access.rules} | {"break-glass"}
    assert rules == {rule for _, _, rule in CALLERS.values() if rule}, "a rule of the shipped policy has no row"
    for who, row in MATRIX.items():
        assert len(row.split()) == len(ROUTES), who


def _checked(resource: dict) -> bool:
    """Whether the checked element is in plaintext: a Patient's family name, a Condition's code."""
    if resource["resourceType"] == "Patient":
        return "family" in resource["name"][0]
    return "coding" in resource["code"]


def _found(body: dict, rtype: str, rid: str) -> list[dict]:
    """The resource ``rtype/rid`` wherever it is in an answer (itself, a Bundle, a batch response)."""
    if body.get("resourceType") == rtype and body.get("id") == rid:
        return [body]
    out = []
    for entry in body.get("entry", []):
        inner = entry.get("resource")
        if isinstance(inner, dict):
            out.extend(_found(inner, rtype, rid))
    return out


CELLS = [
    (who, route, target, MATRIX[who].split()[i][0 if target == "own" else 1])
    for who in MATRIX
    for i, route in enumerate(ROUTES)
    for target in TARGETS
]


@pytest.mark.parametrize(("who", "route", "target", "expected"), CELLS, ids=[f"{c[0]}|{c[1]}|{c[2]}" for c in CELLS])
async def test_access_matrix(proxy, issuer, stored, who, route, target, expected):
    claims, headers, _ = CALLERS[who]
    method, template, rtype = ROUTES[route]
    ids = TARGETS[target]
    auth = bearer(issuer.token(**claims)) | headers | {"Prefer": "respond-async"}
    if route == "batch read":
        batch = {"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "GET", "url": ""}}]}
        batch["entry"][0]["request"]["url"] = f"Condition/{ids['c']}"
        resp = await proxy.post(
            "/fhir/R4", data=orjson.dumps(batch), headers=auth | {"Content-Type": "application/fhir+json"}
        )
    else:
        resp = await proxy.request(method, "/fhir/R4/" + template.format(**ids), headers=auth)
    text = await resp.text()
    assert "fhircrypt.dev" not in text and "ciphertext" not in text
    if expected == "R" and route == "batch read" and resp.status == 200:  # refused in the entry's response
        (entry,) = orjson.loads(text)["entry"]
        assert entry["response"]["status"].startswith("403") and "resource" not in entry, text
        return
    if expected == "R":
        assert resp.status == 403, text
        assert orjson.loads(text)["resourceType"] == "OperationOutcome"
        assert "Aminah" not in text and "Wulandari" not in text and "D50.9" not in text
        return
    assert resp.status in (200, 202), text
    if expected == "F":
        return
    body = orjson.loads(text)
    rid = ids["p"] if rtype == "Patient" else ids["c"]
    found = _found(body, rtype, rid)
    if expected == "A":
        assert found == [], text
        return
    assert found, text
    assert all(_checked(r) == (expected == "P") for r in found), text
