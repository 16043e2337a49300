"""Authorized decryption: real signed tokens, a JWKS served over HTTP, and the role matrix."""

from __future__ import annotations

import time
import urllib.parse
import uuid

import jwt
import orjson
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.conftest import FHIR_JSON

AUDIENCE = "fhircrypt-test"
NIK = "https://fhir.kemkes.go.id/id/nik"
BPJS = "https://fhir.example-hospital.id/id/bpjs"


class Issuer:
    """An OpenID provider for the test run: keys generated per run, discovery and JWKS over HTTP."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.kids = {"rsa-1": self.rsa, "ec-1": self.ec}
        self.url = ""
        self.jwks_requests = 0

    def jwks(self) -> dict:
        keys = []
        for kid, key in self.kids.items():
            jwk = orjson.loads(
                jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())
                if isinstance(key, rsa.RSAPrivateKey)
                else jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())
            )
            keys.append(
                {**jwk, "kid": kid, "use": "sig", "alg": "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"}
            )
        return {"keys": keys}

    def token(self, kid: str = "rsa-1", alg: str | None = None, key=None, **claims) -> str:
        now = int(time.time())
        body = {
            "iss": self.url,
            "aud": AUDIENCE,
            "sub": f"user-{uuid.uuid4().hex[:6]}",
            "iat": now,
            "exp": now + 300,
            "azp": "emr",
            **claims,
        }
        body = {k: v for k, v in body.items() if v is not None}
        alg = alg or ("RS256" if kid.startswith("rsa") else "ES256")
        return jwt.encode(body, key or self.kids.get(kid, self.rsa), algorithm=alg, headers={"kid": kid})

    def app(self) -> web.Application:
        async def discovery(request):
            return web.json_response({"issuer": self.url, "jwks_uri": f"{self.url}/jwks"})

        async def jwks(request):
            self.jwks_requests += 1
            return web.json_response(self.jwks())

        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", discovery)
        app.router.add_get("/jwks", jwks)
        return app


@pytest.fixture
async def issuer(aiohttp_server):
    it = Issuer()
    server = await aiohttp_server(it.app())
    it.url = str(server.make_url("")).rstrip("/")
    return it


@pytest.fixture
def jwt_proxy(proxy_for, clean_upstream, satusehat, issuer):
    """Factory: the proxy with JWT authentication against the test issuer, plus extra settings."""

    async def make(policy=None, **extra):
        return await proxy_for(
            clean_upstream.base_url, policy or satusehat, auth="jwt", oidc_issuer=issuer.url, audience=AUDIENCE, **extra
        )

    return make


@pytest.fixture
async def proxy(jwt_proxy):
    return await jwt_proxy()


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def test_missing_and_invalid_tokens_get_401_with_a_challenge(proxy, issuer, clean_upstream):
    resp = await proxy.get("/fhir/R4/Patient/x")
    assert resp.status == 401 and resp.headers["WWW-Authenticate"] == 'Bearer realm="fhircrypt"'
    assert (await resp.json())["resourceType"] == "OperationOutcome"
    public = await proxy.get("/fhir/R4/metadata")
    assert public.status == 200

    now = int(time.time())
    public_pem = issuer.rsa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    good = issuer.token(scope="user/*.rs")
    header, payload, signature = good.split(".")
    cases = {
        "expired": issuer.token(exp=now - 3600, iat=now - 7200),
        "not yet valid": issuer.token(nbf=now + 3600),
        "another audience": issuer.token(aud="someone-else"),
        "another issuer": issuer.token(iss="https://evil.example"),
        "unknown key": issuer.token(kid="rsa-2", key=rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "algorithm is not allowed": jwt.encode(
            {"iss": issuer.url, "aud": AUDIENCE, "sub": "x", "exp": now + 60},
            None,
            algorithm="none",
            headers={"kid": "rsa-1"},
        ),
        "HS256 with the public key": _hs256(public_pem, issuer.url),
        "tampered signature": f"{header}.{payload}.{signature[:-4]}AAAA",
        "tampered claims": f"{header}.{payload[:-2]}Zz.{signature}",
        "garbage": "not-a-jwt",
        "ES256 token claiming an RSA key": issuer.token(kid="rsa-1", alg="ES256", key=issuer.ec),
    }
    for what, token in cases.items():
        resp = await proxy.get("/fhir/R4/Patient/x", headers=bearer(token))
        assert resp.status == 401, what
        assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"], what
    assert clean_upstream.requests()[-1]["url"].endswith("/metadata")  # nothing else got through


def _hs256(secret: bytes, iss: str) -> str:
    """An HMAC token keyed with the RSA public key: the classic algorithm-confusion attack."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(orjson.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}))
    body = b64(orjson.dumps({"iss": iss, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 60}))
    sig = b64(hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest())
    return f"{head}.{body}.{sig}"


async def test_keys_added_at_the_provider_are_picked_up(proxy_for, clean_upstream, satusehat, issuer):
    proxy = await proxy_for(
        clean_upstream.base_url,
        satusehat,
        auth="jwt",
        jwks_url=f"{issuer.url}/jwks",
        token_issuer=issuer.url,
        audience=AUDIENCE,
    )
    from proxy.web.runtime import RUNTIME

    proxy.server.app[RUNTIME].verifier.settings.__dict__["min_refresh"] = 0.0  # a fresh test key is minutes old
    issuer.kids["rsa-2"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    before = issuer.jwks_requests
    resp = await proxy.get("/fhir/R4/metadata", headers=bearer(issuer.token(kid="rsa-2", scope="user/*.rs")))
    assert resp.status == 200
    resp = await proxy.get("/fhir/R4/Patient?_count=1", headers=bearer(issuer.token(kid="rsa-2", scope="user/*.rs")))
    assert resp.status == 200 and issuer.jwks_requests == before + 1
    resp = await proxy.get("/fhir/R4/Patient?_count=1", headers=bearer(issuer.token(kid="ec-1", scope="user/*.rs")))
    assert resp.status == 200


# --------------------------------------------------------------------------- the role matrix

PATIENT = {
    "resourceType": "Patient",
    "id": "pat-a",
    "identifier": [{"system": NIK, "value": "3174015507880001"}, {"system": BPJS, "value": "0001122334401"}],
    "name": [{"family": "Wulandari", "given": ["Sri"]}],
    "birthDate": "1988-07-15",
    "gender": "female",
}
OTHER = {
    **PATIENT,
    "id": "pat-b",
    "identifier": [{"system": NIK, "value": "3578016001900004"}],
    "name": [{"family": "Aminah", "given": ["Siti"]}],
}
CONDITION = {
    "resourceType": "Condition",
    "id": "cond-a",
    "subject": {"reference": "Patient/pat-a"},
    "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "D50.9"}]},
}
OBSERVATION = {
    "resourceType": "Observation",
    "id": "obs-a",
    "status": "final",
    "code": {"text": "Hb"},
    "subject": {"reference": "Patient/pat-a"},
    "valueQuantity": {"value": 9.87, "unit": "g/dL"},
}
MEDREQ = {
    "resourceType": "MedicationRequest",
    "id": "mr-a",
    "status": "active",
    "intent": "order",
    "subject": {"reference": "Patient/pat-a"},
    "medicationCodeableConcept": {"text": "Ferrous sulfate 300 mg"},
}
OTHER_CONDITION = {**CONDITION, "id": "cond-b", "subject": {"reference": "Patient/pat-b"}}


def _plain(resource: dict) -> dict[str, bool]:
    """Which checked element of each resource came back as plaintext."""
    rtype = resource["resourceType"]
    if rtype == "Patient":
        ids = {i["system"]: "value" in i for i in resource.get("identifier", [])}
        return {
            "nik": ids.get(NIK, False),
            "bpjs": ids.get(BPJS, False),
            "name": "family" in resource["name"][0],
            "birthDate": "birthDate" in resource,
        }
    if rtype == "Condition":
        return {"code": "coding" in resource["code"]}
    if rtype == "Observation":
        return {"value": "valueQuantity" in resource}
    return {"medication": "text" in resource["medicationCodeableConcept"]}


EVERYTHING = {
    "nik": True,
    "bpjs": True,
    "name": True,
    "birthDate": True,
    "code": True,
    "value": True,
    "medication": True,
}
NOTHING = dict.fromkeys(EVERYTHING, False)
ALL_TYPES = frozenset({"Patient", "Condition", "Observation", "MedicationRequest"})
ROLES = {
    # who: (claims, headers, expected for pat-a's resources, types the caller may not read at all: 403)
    "clerk": (
        {"realm_access": {"roles": ["registration"]}, "scope": "user/*.rs"},
        {},
        {**NOTHING, "nik": True, "name": True, "birthDate": True},
        frozenset(),
    ),
    "billing": (
        {"realm_access": {"roles": ["billing"]}, "scope": "user/*.rs"},
        {},
        {**NOTHING, "bpjs": True},
        frozenset(),
    ),
    "billing with a patient/ scope too": (  # the patient/ scope must not widen the user/ rule
        {"realm_access": {"roles": ["billing"]}, "scope": "user/*.rs patient/Patient.read"},
        {},
        {**NOTHING, "bpjs": True},
        frozenset(),
    ),
    "physician": ({"realm_access": {"roles": ["physician"]}, "scope": "user/*.rs"}, {}, EVERYTHING, frozenset()),
    "pharmacist": (
        {"realm_access": {"roles": ["pharmacist"]}, "scope": "user/*.rs"},
        {},
        {**NOTHING, "name": True, "birthDate": True, "medication": True},
        frozenset(),
    ),
    "physician without a Condition scope": (
        {"realm_access": {"roles": ["physician"]}, "scope": "user/Patient.rs user/Observation.rs"},
        {},
        {"nik": True, "bpjs": True, "name": True, "birthDate": True, "value": True},
        frozenset({"Condition", "MedicationRequest"}),
    ),
    "patient app, own record": (
        {"scope": "patient/*.rs launch/patient", "patient": "pat-a", "fhirUser": "Patient/pat-a"},
        {},
        EVERYTHING,
        frozenset(),
    ),
    "patient app, another patient": ({"scope": "patient/*.rs", "patient": "pat-b"}, {}, {}, ALL_TYPES),
    "satusehat bridge": ({"scope": "system/*.rs", "azp": "satusehat-bridge"}, {}, EVERYTHING, frozenset()),
    "other system client": ({"scope": "system/*.rs", "azp": "analytics"}, {}, NOTHING, frozenset()),
    "break-glass without a reason": (
        {"realm_access": {"roles": ["emergency"]}, "scope": "user/*.rs"},
        {},
        NOTHING,
        frozenset(),
    ),
    "break-glass": (
        {"realm_access": {"roles": ["emergency"]}, "scope": "user/*.rs"},
        {"X-Break-Glass-Reason": "unconscious patient in ER"},
        EVERYTHING,
        frozenset(),
    ),
    "unparseable scopes": (
        {"realm_access": {"roles": ["physician"]}, "scope": "patient/*.rsx user/Patient"},
        {},
        {},
        ALL_TYPES,
    ),
}


@pytest.fixture
async def stored(proxy_for, clean_upstream, satusehat):
    writer = await proxy_for(clean_upstream.base_url, satusehat)  # development mode writes the fixtures
    for resource in (PATIENT, OTHER, CONDITION, OTHER_CONDITION, OBSERVATION, MEDREQ):
        resp = await writer.put(
            f"/fhir/R4/{resource['resourceType']}/{resource['id']}", data=orjson.dumps(resource), headers=FHIR_JSON
        )
        assert resp.status == 201, await resp.text()
    return clean_upstream


@pytest.mark.parametrize("who", list(ROLES))
async def test_role_matrix_single_reads_and_searchsets(proxy, issuer, stored, who):
    claims, headers, expected, refused = ROLES[who]
    auth = bearer(issuer.token(**claims)) | headers
    seen: dict[str, bool] = {}
    for resource in (PATIENT, CONDITION, OBSERVATION, MEDREQ):
        resp = await proxy.get(f"/fhir/R4/{resource['resourceType']}/{resource['id']}", headers=auth)
        if resource["resourceType"] in refused:
            assert resp.status == 403, who
            outcome = await resp.json()
            assert outcome["resourceType"] == "OperationOutcome" and "ciphertext" not in str(outcome), who
            continue
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        seen.update(_plain(body))
        masked = any(s.get("code") == "MASKED" for s in body.get("meta", {}).get("security", []))
        assert masked == (not all(_plain(body).values())), who
    assert seen == expected, who
    # the same decisions inside searchsets (Medplum's in-memory repository ignores _include)
    in_bundles: dict[str, bool] = {}
    for resource in (PATIENT, CONDITION, OBSERVATION, MEDREQ):
        resp = await proxy.get(f"/fhir/R4/{resource['resourceType']}?_id={resource['id']}", headers=auth)
        if resource["resourceType"] in refused and "patient/" not in claims["scope"]:
            assert resp.status == 403, who
            continue
        bundle = await resp.json()
        if resource["resourceType"] in refused:  # a patient app: the search is confined to its own compartment
            assert bundle.get("entry", []) == [], who
            continue
        (entry,) = bundle["entry"]
        in_bundles.update(_plain(entry["resource"]))
        text = orjson.dumps(bundle).decode()
        assert "ciphertext" not in text and "fhircrypt.dev" not in text
    assert in_bundles == expected, who


async def test_patient_sees_nothing_of_other_patients_in_a_search(proxy, issuer, stored):
    auth = bearer(issuer.token(scope="patient/*.rs", patient="pat-a"))
    bundle = await (await proxy.get("/fhir/R4/Condition?code=D50.9", headers=auth)).json()
    by_subject = {e["resource"]["subject"]["reference"]: _plain(e["resource"])["code"] for e in bundle["entry"]}
    assert by_subject == {"Patient/pat-a": True}  # the proxy confines the search; the server is not trusted to
    (sent,) = [r for r in stored.requests() if r["url"].startswith("/fhir/R4/Condition?")]
    assert "patient=Patient%2Fpat-a" in sent["url"] or "patient=Patient/pat-a" in sent["url"], sent["url"]


async def test_a_masked_resource_written_back_keeps_the_stored_values(proxy, issuer, stored):
    billing = bearer(issuer.token(realm_access={"roles": ["billing"]}, scope="user/*.rs user/*.cu"))
    physician = bearer(issuer.token(realm_access={"roles": ["physician"]}, scope="user/*.rs"))
    masked = await (await proxy.get("/fhir/R4/Patient/pat-a", headers=billing)).json()
    assert "family" not in masked["name"][0] and masked["identifier"][1]["value"] == "0001122334401"
    changed = {
        **masked,
        "gender": "other",
        "identifier": [masked["identifier"][0], {"system": BPJS, "value": "0009999999999"}],
    }
    resp = await proxy.put("/fhir/R4/Patient/pat-a", data=orjson.dumps(changed), headers=FHIR_JSON | billing)
    assert resp.status == 200, await resp.text()
    full = await (await proxy.get("/fhir/R4/Patient/pat-a", headers=physician)).json()
    assert full["name"] == PATIENT["name"] and full["birthDate"] == PATIENT["birthDate"]
    assert full["identifier"] == [PATIENT["identifier"][0], {"system": BPJS, "value": "0009999999999"}]
    assert full["gender"] == "other" and "security" not in full.get("meta", {})
    request = [r for r in stored.requests() if r["method"] == "PUT"][-1]
    assert {k.lower(): v for k, v in request["headers"].items()}["if-match"] == 'W/"1"'


async def test_writes_of_groups_the_caller_may_not_set_are_forbidden(proxy, issuer, stored):
    billing = bearer(issuer.token(realm_access={"roles": ["billing"]}, scope="user/*.rs user/*.cu"))
    masked = await (await proxy.get("/fhir/R4/Patient/pat-a", headers=billing)).json()
    renamed = {**masked, "name": [{"family": "Forged"}]}
    resp = await proxy.put("/fhir/R4/Patient/pat-a", data=orjson.dumps(renamed), headers=FHIR_JSON | billing)
    assert resp.status == 403
    assert "Patient.name" in (await resp.json())["issue"][0]["diagnostics"]
    new = {k: v for k, v in masked.items() if k not in ("id", "meta")}
    resp = await proxy.post("/fhir/R4/Patient", data=orjson.dumps(new), headers=FHIR_JSON | billing)
    assert resp.status == 409  # masked elements in a create: nothing to restore them from


async def test_a_masked_write_back_against_a_stale_version_is_a_conflict(proxy, issuer, stored):
    billing = bearer(issuer.token(realm_access={"roles": ["billing"]}, scope="user/*.rs user/*.cu"))
    physician = bearer(issuer.token(realm_access={"roles": ["physician"]}, scope="user/*.rs user/*.cu"))
    read = await proxy.get("/fhir/R4/Patient/pat-a", headers=billing)
    masked, etag = await read.json(), read.headers["ETag"]
    full = await (await proxy.get("/fhir/R4/Patient/pat-a", headers=physician)).json()
    assert (
        await proxy.put(
            "/fhir/R4/Patient/pat-a",
            data=orjson.dumps({**full, "birthDate": "1988-07-16"}),
            headers=FHIR_JSON | physician,
        )
    ).status == 200
    resp = await proxy.put(
        "/fhir/R4/Patient/pat-a",
        data=orjson.dumps({**masked, "gender": "other"}),
        headers=FHIR_JSON | billing | {"If-Match": etag},
    )
    assert resp.status in (409, 412)
    latest = await (await proxy.get("/fhir/R4/Patient/pat-a", headers=physician)).json()
    assert latest["birthDate"] == "1988-07-16" and latest["gender"] == "female"


async def test_every_interaction_is_audited_without_phi_and_the_trail_verifies(
    jwt_proxy, clean_upstream, satusehat, issuer, stored, tmp_path, aiohttp_server
):
    from proxy.audit.cli import init_trail
    from proxy.audit.trail import verify
    from proxy.crypto.encoding import b64d

    trail, key_file = tmp_path / "audit.jsonl", tmp_path / "audit.key"
    init_trail(trail, key_file)
    posted = []

    async def receive(request):
        if request.headers.get("Authorization") != "Bearer audit-repo-token":
            return web.json_response({}, status=401)
        posted.append(await request.json())
        return web.json_response({}, status=201)

    repository = web.Application()
    repository.router.add_post("/fhir/AuditEvent", receive)
    audit_server = await aiohttp_server(repository)
    proxy = await jwt_proxy(
        audit_trail=str(trail),
        audit_fhir=str(audit_server.make_url("/fhir")),
        audit_fhir_token="audit-repo-token",
    )
    physician = bearer(issuer.token(realm_access={"roles": ["physician"]}, scope="user/*.rs"))
    billing = bearer(issuer.token(realm_access={"roles": ["billing"]}, scope="user/*.rs"))
    glass = bearer(issuer.token(realm_access={"roles": ["emergency"]}, scope="user/*.rs")) | {
        "X-Break-Glass-Reason": "unconscious patient"
    }
    await proxy.get("/fhir/R4/Patient/pat-a", headers=physician)
    await proxy.get(f"/fhir/R4/Patient?identifier={BPJS}|0001122334401", headers=billing)
    await proxy.get("/fhir/R4/Patient/pat-a", headers=glass)
    await proxy.get("/fhir/R4/Patient/pat-a")  # 401
    await proxy.get("/fhir/R4/Patient?name=Wu", headers=physician)  # 400: too short
    await proxy.server.close()  # flushes the sinks
    lines = [orjson.loads(line) for line in trail.read_text().splitlines()]
    assert len(lines) == 5
    assert posted == [line["event"] for line in lines]  # the audit repository received the same events
    events = [line["event"] for line in lines]
    assert [e["outcome"] for e in events] == ["0", "0", "0", "4", "4"]
    details = {d["type"]: d["valueString"] for d in events[1]["entity"][-1].get("detail", [])}
    assert "insurance" in details.get("decrypted-groups", "") and "identity" in details.get("masked-groups", "")
    assert any(c.get("code") == "BTG" for p in events[2].get("purposeOfEvent", []) for c in p.get("coding", []))
    text = trail.read_text()
    for secret in ("3174015507880001", "Wulandari", "Sri", "1988-07-15", "0001122334401", "unconscious", "Wu&"):
        assert secret not in text, secret
    assert verify(trail, b64d(key_file.read_text().strip())).ok


async def test_requests_are_refused_while_the_audit_trail_is_unavailable(
    jwt_proxy, clean_upstream, satusehat, issuer, tmp_path
):
    from proxy.audit.cli import init_trail
    from proxy.web.runtime import RUNTIME

    trail, key_file = tmp_path / "audit.jsonl", tmp_path / "audit.key"
    init_trail(trail, key_file)
    proxy = await jwt_proxy(
        audit_trail=str(trail),
        audit_max_backlog=1,
    )
    (sink,) = proxy.server.app[RUNTIME].audit
    await sink.close()  # a sink that no longer accepts records
    resp = await proxy.get("/fhir/R4/Patient/pat-a", headers=bearer(issuer.token(scope="user/*.rs")))
    assert resp.status == 503 and "audit trail" in (await resp.json())["issue"][0]["diagnostics"]
    assert clean_upstream.requests() == []


async def test_decrypting_a_canary_resource_alerts_and_blocks_the_caller(
    jwt_proxy, clean_upstream, issuer, stored, caplog
):
    import logging

    from tests.conftest import ROOT

    text = (ROOT / "policies/satusehat.yaml").read_text() + "\ncanaries: {resources: [Patient/pat-b], action: block}\n"
    from proxy.policy.compiler import compile_text

    policy = compile_text(text, "satusehat+canary.yaml")
    proxy = await jwt_proxy(policy)
    thief = bearer(issuer.token(sub="stolen-token-user", realm_access={"roles": ["physician"]}, scope="user/*.rs"))
    caplog.set_level(logging.INFO)
    assert (await proxy.get("/fhir/R4/Patient/pat-a", headers=thief)).status == 200
    bulk = await proxy.get("/fhir/R4/Patient?gender=female", headers=thief)  # the sweep includes the canary
    assert bulk.status == 403 and "Siti" not in await bulk.text()
    assert any(getattr(r, "event", None) == "canary" for r in caplog.records)
    assert (await proxy.get("/fhir/R4/Patient/pat-a", headers=thief)).status == 403  # blocked from now on
    other = bearer(issuer.token(realm_access={"roles": ["physician"]}, scope="user/*.rs"))
    assert (await proxy.get("/fhir/R4/Patient/pat-a", headers=other)).status == 200


async def test_opaque_tokens_are_checked_by_introspection(
    jwt_proxy, clean_upstream, satusehat, issuer, stored, aiohttp_server
):
    import base64

    active = {
        "opaque-physician": {
            "active": True,
            "sub": "dr-a",
            "aud": AUDIENCE,
            "exp": int(time.time()) + 60,
            "scope": "user/*.rs",
            "realm_access": {"roles": ["physician"]},
        },
        "opaque-expired": {"active": True, "sub": "dr-b", "aud": AUDIENCE, "exp": int(time.time()) - 60},
        "opaque-elsewhere": {"active": True, "sub": "dr-c", "aud": "other", "exp": int(time.time()) + 60},
    }
    calls = []

    async def introspect(request):
        form = await request.post()
        calls.append(form["token"])
        expected = "Basic " + base64.b64encode(b"fhircrypt:s3cret").decode()
        if request.headers.get("Authorization") != expected:
            return web.json_response({}, status=401)
        return web.json_response(active.get(form["token"], {"active": False}))

    app = web.Application()
    app.router.add_post("/introspect", introspect)
    endpoint = await aiohttp_server(app)
    proxy = await jwt_proxy(
        introspection_url=str(endpoint.make_url("/introspect")),
        introspection_client_id="fhircrypt",
        introspection_secret="s3cret",
    )
    ok = await proxy.get("/fhir/R4/Patient/pat-a", headers=bearer("opaque-physician"))
    assert ok.status == 200 and (await ok.json())["name"] == PATIENT["name"]
    assert (await proxy.get("/fhir/R4/Patient/pat-a", headers=bearer("opaque-physician"))).status == 200
    assert calls.count("opaque-physician") == 1  # cached
    for token in ("opaque-expired", "opaque-elsewhere", "opaque-unknown"):
        assert (await proxy.get("/fhir/R4/Patient/pat-a", headers=bearer(token))).status == 401, token
    jwt_token = issuer.token(realm_access={"roles": ["physician"]}, scope="user/*.rs")
    assert (await proxy.get("/fhir/R4/Patient/pat-a", headers=bearer(jwt_token))).status == 200
    assert jwt_token not in calls  # JWTs are verified locally


async def test_callers_cannot_search_by_what_they_may_not_read(proxy, issuer, stored, clean_upstream):
    """A billing officer searching by NIK would learn which patient has it: refused."""
    billing = bearer(issuer.token(realm_access={"roles": ["billing"]}, scope="user/*.rs"))
    resp = await proxy.get(f"/fhir/R4/Patient?identifier={NIK}|3174015507880001", headers=billing)
    assert resp.status == 403 and "identifier" in (await resp.json())["issue"][0]["diagnostics"]
    assert (await proxy.get(f"/fhir/R4/Patient?identifier={BPJS}|0001122334401", headers=billing)).status == 200
    assert "3174015507880001" not in orjson.dumps(clean_upstream.requests()).decode()


async def test_patient_apps_cannot_write_other_patients_records(proxy, issuer, stored):
    app_b = bearer(issuer.token(scope="patient/*.cruds", patient="pat-b"))
    mine = {**OTHER_CONDITION, "note": [{"text": "mine"}]}
    theirs = {**CONDITION, "note": [{"text": "not mine"}]}
    assert (
        await proxy.put("/fhir/R4/Condition/cond-b", data=orjson.dumps(mine), headers=FHIR_JSON | app_b)
    ).status == 200
    resp = await proxy.put("/fhir/R4/Condition/cond-a", data=orjson.dumps(theirs), headers=FHIR_JSON | app_b)
    assert resp.status == 403
    read_only = bearer(issuer.token(realm_access={"roles": ["physician"]}, scope="user/*.rs"))
    resp = await proxy.put("/fhir/R4/Condition/cond-a", data=orjson.dumps(theirs), headers=FHIR_JSON | read_only)
    assert resp.status == 403


async def test_scope_checks_use_the_stored_resource_deletes_and_replayed_tokens(proxy, issuer, stored, clean_upstream):
    app_b = bearer(issuer.token(scope="patient/*.cruds", patient="pat-b"))
    hijack = {**CONDITION, "subject": {"reference": "Patient/pat-b"}}  # pat-a's condition, re-pointed
    assert (
        await proxy.put("/fhir/R4/Condition/cond-a", data=orjson.dumps(hijack), headers=FHIR_JSON | app_b)
    ).status == 403
    reader = bearer(issuer.token(realm_access={"roles": ["physician"]}, scope="user/*.rs"))
    assert (await proxy.delete("/fhir/R4/Condition/cond-a", headers=reader)).status == 403
    assert (await proxy.delete("/fhir/R4/Condition/cond-a", headers=app_b)).status == 403
    assert (await proxy.delete("/fhir/R4/Condition/cond-b", headers=app_b)).status in (200, 204)
    physician = bearer(issuer.token(realm_access={"roles": ["physician"]}, scope="user/*.rs"))
    clean_upstream.reset()
    await proxy.get(f"/fhir/R4/Patient?identifier={NIK}|3174015507880001", headers=physician)
    forwarded = urllib.parse.urlsplit(clean_upstream.requests()[0]["url"]).query
    billing = bearer(issuer.token(realm_access={"roles": ["billing"]}, scope="user/*.rs"))
    replay = await proxy.get(f"/fhir/R4/Patient?{forwarded}", headers=billing)
    assert replay.status == 403
    token = urllib.parse.parse_qsl(forwarded)[0][1]
    mixed = urllib.parse.quote(f"{token},{BPJS}|0001122334401", safe="")
    assert (await proxy.get(f"/fhir/R4/Patient?identifier={mixed}", headers=billing)).status == 403
    chained = urllib.parse.quote(token, safe="")
    assert (await proxy.get(f"/fhir/R4/Condition?subject:Patient.identifier={chained}", headers=billing)).status == 403


def _transaction(*entries: tuple[str, str, dict | None]) -> bytes:
    return orjson.dumps(
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"request": {"method": method, "url": url}, **({"resource": body} if body else {})}
                for method, url, body in entries
            ],
        }
    )


async def test_bundle_entries_get_the_same_access_decisions_as_single_requests(proxy, issuer, stored, clean_upstream):
    app_b = bearer(issuer.token(scope="patient/*.cruds", patient="pat-b"))
    theirs = {**CONDITION, "note": [{"text": "not mine"}]}
    resp = await proxy.post(
        "/fhir/R4", data=_transaction(("PUT", "Condition/cond-a", theirs)), headers=FHIR_JSON | app_b
    )
    assert resp.status == 403, await resp.text()
    assert "Condition" in (await resp.json())["issue"][0]["diagnostics"]
    resp = await proxy.post(
        "/fhir/R4", data=_transaction(("DELETE", "Condition/cond-a", None)), headers=FHIR_JSON | app_b
    )
    assert resp.status == 403
    billing = bearer(issuer.token(realm_access={"roles": ["billing"]}, scope="user/*.rs user/*.cu"))
    masked = await (await proxy.get("/fhir/R4/Patient/pat-a", headers=billing)).json()
    renamed = {**masked, "name": [{"family": "Forged"}]}
    resp = await proxy.post(
        "/fhir/R4", data=_transaction(("PUT", "Patient/pat-a", renamed)), headers=FHIR_JSON | billing
    )
    assert resp.status == 403 and "Patient.name" in (await resp.json())["issue"][0]["diagnostics"]
    search = _transaction(("GET", f"Patient?identifier={NIK}|3174015507880001", None))
    assert (await proxy.post("/fhir/R4", data=search, headers=FHIR_JSON | billing)).status == 403
    # a masked write-back inside a transaction keeps the stored values and is pinned to the version read
    changed = {**masked, "gender": "other"}
    resp = await proxy.post(
        "/fhir/R4", data=_transaction(("PUT", "Patient/pat-a", changed)), headers=FHIR_JSON | billing
    )
    assert resp.status == 200, await resp.text()
    physician = bearer(issuer.token(realm_access={"roles": ["physician"]}, scope="user/*.rs"))
    full = await (await proxy.get("/fhir/R4/Patient/pat-a", headers=physician)).json()
    assert full["name"] == PATIENT["name"] and full["gender"] == "other"
    forwarded = orjson.loads([r for r in clean_upstream.requests() if r["method"] == "POST"][-1]["body"])
    assert forwarded["entry"][0]["request"]["ifMatch"] == 'W/"1"'


async def test_raw_binary_downloads_need_the_group_of_binary_data(proxy, issuer, stored):
    physician = bearer(issuer.token(realm_access={"roles": ["physician"]}, scope="user/*.rs user/*.cu"))
    resp = await proxy.post(
        "/fhir/R4/Binary", data=b"%PDF-1.4 rujukan", headers={"Content-Type": "application/pdf"} | physician
    )
    assert resp.status == 201, await resp.text()
    url = f"/fhir/R4/Binary/{(await resp.json())['id']}"
    assert await (await proxy.get(url, headers={"Accept": "application/pdf"} | physician)).read() == b"%PDF-1.4 rujukan"
    billing = bearer(issuer.token(realm_access={"roles": ["billing"]}, scope="user/*.rs"))
    refused = await proxy.get(url, headers={"Accept": "application/pdf"} | billing)
    assert refused.status == 403 and b"PDF" not in await refused.read()
    masked = await (await proxy.get(url, headers=billing)).json()
    assert "data" not in masked and masked["meta"]["security"][0]["code"] == "MASKED"
