"""The one upstream client: a hostile upstream cannot widen decryption or send the proxy elsewhere, and the
upstream sees the proxy's own credential (static bearer or OAuth2 client credentials), never the caller's
token unless the operator forwards it on purpose.

The hostile upstream is an aiohttp server written here; a second server on another port counts every
request it receives (it must receive none). Callers present real signed JWTs (``tests/test_auth.py``).
"""

from __future__ import annotations

import ast
import asyncio
import base64
import copy
from pathlib import Path
from urllib.parse import parse_qs

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.auth.decision import key_holder
from proxy.keymgmt.keyring import load_keyring
from proxy.keymgmt.providers.local import LocalKeyProvider, parse_kek
from proxy.migrate.upstream import Upstream, UpstreamDown
from proxy.outcome import FhirError
from proxy.server import check_startup
from proxy.transform.bodies import decrypt_body, encrypt_for_write
from proxy.transform.records import ALL_GROUPS, ReadReport, decrypt_resource
from proxy.upstream.client import UpstreamClient
from tests.conftest import FHIR_JSON, PUBLIC_BASE, ROOT, make_settings
from tests.serving import Served, make_keyring
from tests.test_auth import AUDIENCE, NOTHING, OTHER, PATIENT, _plain, bearer, issuer  # noqa: F401 - fixture

ASYNC = {"Prefer": "respond-async"}
NOBODY = {}  # a valid token with no roles and no scopes
BILLING = {"realm_access": {"roles": ["billing"]}, "scope": "user/*.rs"}
PHYSICIAN = {"realm_access": {"roles": ["physician"]}, "scope": "user/*.rs"}
SEES = {  # what each caller may read of pat-a's Patient (tests/test_auth.py ROLES)
    "nobody": (NOBODY, {"nik": False, "bpjs": False, "name": False, "birthDate": False}),
    "billing": (BILLING, {"nik": False, "bpjs": True, "name": False, "birthDate": False}),
    "physician": (PHYSICIAN, {"nik": True, "bpjs": True, "name": True, "birthDate": True}),
}


class Counter:
    """Another origin (same host, another port): every request it receives is a failure of the proxy."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.base = ""

    def app(self) -> web.Application:
        async def anything(request: web.Request) -> web.Response:
            self.received.append(request.path_qs)
            return web.Response(status=200, body=b"{}", content_type="application/fhir+json")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", anything)
        return app


class Hostile:
    """An upstream FHIR server that answers as the test scripts: ``answers[route] = (status, headers, body)``."""

    def __init__(self, stored: dict) -> None:
        self.stored = stored  # an encrypted Patient, as the real upstream would store it
        self.answers: dict[str, tuple[int, dict, object]] = {}
        self.seen: list[tuple[str, str | None]] = []  # (method path, Authorization)
        self.base = ""

    def answer(self, route: str, status: int, body: object = None, **headers: str) -> None:
        self.answers[route] = (status, headers, body)

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.seen.append((f"{request.method} {request.path}", request.headers.get("Authorization")))
            route = request.path.removeprefix("/fhir/R4/")
            if route == "metadata":
                return web.json_response({"resourceType": "CapabilityStatement"})
            status, headers, body = self.answers.get(route, (404, {}, None))
            if isinstance(body, bytes):
                return web.Response(status=status, body=body, headers=headers)
            raw = b"" if body is None else orjson.dumps(body)
            ctype = headers.pop("Content-Type", "application/fhir+json")
            return web.Response(status=status, body=raw, headers=headers, content_type=ctype)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


@pytest.fixture
def encrypted(satusehat, keyring) -> dict:
    patient = copy.deepcopy(PATIENT)
    encrypt_for_write(patient, satusehat, keyring, validate="off")
    return orjson.loads(orjson.dumps(patient))


@pytest.fixture
async def scene(aiohttp_server, proxy_for, satusehat, issuer, encrypted):  # noqa: F811
    """(client factory, hostile upstream, counter): the proxy with JWT auth in front of the hostile server."""
    counter, hostile = Counter(), Hostile(encrypted)
    counter.base = str((await aiohttp_server(counter.app())).make_url("")).rstrip("/")
    hostile.base = str((await aiohttp_server(hostile.app())).make_url("/fhir/R4"))
    client = await proxy_for(hostile.base, satusehat, auth="jwt", oidc_issuer=issuer.url, audience=AUDIENCE)
    return client, hostile, counter


def _local(url: str) -> str:
    assert url.startswith(PUBLIC_BASE), url
    return url[len("http://proxy.test") :]


def _patients(body: object) -> list[dict]:
    found = [body] if type(body) is dict and body.get("resourceType") == "Patient" else []
    if type(body) is dict and body.get("resourceType") == "Bundle":
        found += [e["resource"] for e in body.get("entry", []) if e["resource"].get("resourceType") == "Patient"]
    return found


def _manifest(url: str) -> dict:
    return {
        "transactionTime": "2026-01-01T00:00:00Z",
        "request": "x",
        "requiresAccessToken": True,
        "output": [{"type": "Patient", "url": url}],
        "error": [],
    }


async def _to_stage(client, hostile: Hostile, stage: str, token: str):
    """Drive an export to ``stage`` and return the proxy's answer there."""
    headers = bearer(token)
    if stage == "kickoff":
        return await client.get("/fhir/R4/$export", headers={**ASYNC, **headers})
    hostile.answer("$export", 202, **{"Content-Location": f"{hostile.base}/status/1"})
    kicked = await client.get("/fhir/R4/$export", headers={**ASYNC, **headers})
    assert kicked.status == 202, await kicked.text()
    status_link = _local(kicked.headers["Content-Location"])
    if stage in ("status", "cancel"):
        return await client.request("DELETE" if stage == "cancel" else "GET", status_link, headers=headers)
    hostile.answer("status/1", 200, _manifest(f"{hostile.base}/files/Patient.ndjson"))
    polled = await client.get(status_link, headers=headers)
    assert polled.status == 200, await polled.text()
    return await client.get(_local((await polled.json())["output"][0]["url"]), headers=headers)


STAGE_ROUTES = {"kickoff": "$export", "status": "status/1", "cancel": "status/1", "file": "files/Patient.ndjson"}


@pytest.mark.parametrize("who", list(SEES))
@pytest.mark.parametrize("status", [200, 403, 500])
@pytest.mark.parametrize("stage", list(STAGE_ROUTES))
async def test_unexpected_export_answers_decrypt_only_what_the_caller_may_read(scene, issuer, stage, status, who):  # noqa: F811
    """Whatever the upstream answers at any stage of an export (a resource instead of an OperationOutcome,
    a Bundle, any status), the caller gets exactly its own grants: the physician proves decryption ran."""
    client, hostile, counter = scene
    claims, expected = SEES[who]
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": hostile.stored}]}
    if stage == "file" and status == 200:
        ndjson = {"Content-Type": "application/fhir+ndjson"}
        hostile.answer(STAGE_ROUTES[stage], 200, orjson.dumps(hostile.stored) + b"\n", **ndjson)
    else:
        hostile.answer(STAGE_ROUTES[stage], status, bundle)
    if who == "nobody":  # no read scope on every type: the access decision refuses the kick-off itself
        resp = await client.get("/fhir/R4/$export", headers={**ASYNC, **bearer(issuer.token(**claims))})
        assert resp.status == 403 and b"Wulandari" not in await resp.read()
        assert counter.received == []
        return
    resp = await _to_stage(client, hostile, stage, issuer.token(**claims))
    raw = await resp.read()
    body = orjson.loads(raw.splitlines()[0]) if raw else None
    patients = _patients(body)
    if stage == "status" and status == 200:  # a manifest-shaped answer is required here: a Bundle is not one
        assert resp.status == 502 and not patients
    else:
        assert patients, (resp.status, raw[:200])
        assert [{k: v for k, v in _plain(p).items() if k in expected} for p in patients] == [expected]
    for secret in ("3174015507880001", "Wulandari") if who != "physician" else ():
        assert secret.encode() not in raw
    assert counter.received == []


FORGED = {
    "another port": lambda hostile, counter: f"{counter.base}/fhir/R4/files/x.ndjson",
    "scheme-relative": lambda hostile, counter: "//" + counter.base.split("//", 1)[1] + "/x",
    "user information": lambda hostile, counter: hostile.base.replace("://", "://user:pw@") + "/files/x",
    "another scheme": lambda hostile, counter: hostile.base.replace("http://", "https://") + "/files/x",
    "file scheme": lambda hostile, counter: "file:///etc/passwd",
}


@pytest.mark.parametrize("forged", list(FORGED))
@pytest.mark.parametrize("where", ["status URL", "output file", "error file"])
async def test_foreign_urls_from_the_upstream_are_refused_and_never_fetched(scene, issuer, where, forged):  # noqa: F811
    client, hostile, counter = scene
    url = FORGED[forged](hostile, counter)
    token = bearer(issuer.token(**PHYSICIAN))
    if where == "status URL":
        hostile.answer("$export", 202, **{"Content-Location": url})
        resp = await client.get("/fhir/R4/$export", headers={**ASYNC, **token})
    else:
        hostile.answer("$export", 202, **{"Content-Location": f"{hostile.base}/status/1"})
        manifest = _manifest(f"{hostile.base}/files/Patient.ndjson")
        manifest["output" if where == "output file" else "error"].append({"type": "OperationOutcome", "url": url})
        hostile.answer("status/1", 200, manifest)
        kicked = await client.get("/fhir/R4/$export", headers={**ASYNC, **token})
        resp = await client.get(_local(kicked.headers["Content-Location"]), headers=token)
    outcome = await resp.json()
    assert resp.status == 502 and outcome["resourceType"] == "OperationOutcome"
    assert "outside its own origin" in outcome["issue"][0]["diagnostics"] and url not in str(outcome)
    assert counter.received == []


async def test_redirects_and_foreign_links_are_neither_followed_nor_passed_on(scene, issuer):  # noqa: F811
    client, hostile, counter = scene
    token = bearer(issuer.token(**PHYSICIAN))
    elsewhere = f"{counter.base}/fhir/R4/Patient?page=2"
    hostile.answer("$export", 202, **{"Content-Location": f"{hostile.base}/status/1"})
    hostile.answer("status/1", 302, None, Location=elsewhere)
    kicked = await client.get("/fhir/R4/$export", headers={**ASYNC, **token})
    polled = await client.get(_local(kicked.headers["Content-Location"]), headers=token)
    assert polled.status == 302 and "Location" not in polled.headers
    page = {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": [
            {"relation": "self", "url": f"{hostile.base}/Patient?_count=1"},
            {"relation": "next", "url": elsewhere},
            {"relation": "previous", "url": "//" + elsewhere.split("//", 1)[1]},
        ],
        "entry": [{"fullUrl": f"{hostile.base}/Patient/pat-a", "resource": hostile.stored}],
    }
    hostile.answer("Patient", 200, page, Location=elsewhere, **{"Content-Location": f"{hostile.base}/Patient/x"})
    resp = await client.get("/fhir/R4/Patient?_count=1", headers=token)
    body = await resp.json()
    assert resp.status == 200 and body["link"] == [{"relation": "self", "url": f"{PUBLIC_BASE}/Patient?_count=1"}]
    assert "Location" not in resp.headers and resp.headers["Content-Location"] == f"{PUBLIC_BASE}/Patient/x"
    hostile.answer("status/1", 500, page)  # a relayed export answer gets the same treatment
    relayed = await (await client.get(_local(kicked.headers["Content-Location"]), headers=token)).json()
    assert relayed["link"] == [{"relation": "self", "url": f"{PUBLIC_BASE}/Patient?_count=1"}]
    hostile.answer("Patient/pat-a/$everything", 500, page)
    resp = await client.get("/fhir/R4/Patient/pat-a/$everything", headers=bearer(issuer.token(**BILLING)))
    body = await resp.json()
    assert resp.status == 500 and _plain(body["entry"][0]["resource"])["nik"] is False
    assert "link" in body and all(counter.base not in link["url"] for link in body["link"])
    assert counter.received == []


async def test_the_upstream_gets_the_proxys_token_and_never_the_callers(
    proxy_for,
    clean_upstream,
    satusehat,
    issuer,  # noqa: F811
):
    """Reads, searches, writes (with their stored-version reads), Bulk kick-off and readiness all carry the
    proxy's bearer token; ``forward_caller_token`` is the explicit opt-in to send the caller's instead."""
    caller = issuer.token(**{**PHYSICIAN, "scope": "user/*.cruds"}, sub="dr-a")
    jwt = {"auth": "jwt", "oidc_issuer": issuer.url, "audience": AUDIENCE}
    sent: dict[str, set] = {}
    for mode, extra in {
        "default": {},
        "bearer": {"upstream_auth": "bearer", "upstream_token": "proxy-token-1"},
        "forward": {"upstream_auth": "bearer", "upstream_token": "proxy-token-1", "forward_caller_token": True},
    }.items():
        clean_upstream.reset()
        client = await proxy_for(clean_upstream.base_url, satusehat, **jwt, **extra)
        headers = {**FHIR_JSON, **bearer(caller)}
        resp = await client.put("/fhir/R4/Patient/pat-a", data=orjson.dumps(PATIENT), headers=headers)
        assert resp.status == 201, await resp.text()
        patch = orjson.dumps([{"op": "replace", "path": "/birthDate", "value": "1988-07-16"}])
        resp = await client.patch(
            "/fhir/R4/Patient/pat-a",
            data=patch,
            headers={**bearer(caller), "Content-Type": "application/json-patch+json"},
        )
        assert resp.status == 200, await resp.text()
        assert (await client.get("/fhir/R4/Patient/pat-a", headers=bearer(caller))).status == 200
        assert (await client.get("/fhir/R4/Patient?birthdate=1988-07-16", headers=bearer(caller))).status == 200
        assert (await client.get("/fhir/R4/$export", headers={**ASYNC, **bearer(caller)})).status == 202
        assert (await client.get("/readyz")).status == 200
        requests = clean_upstream.requests()
        assert len(requests) >= 6
        sent[mode] = {
            r["headers"].get("authorization") for r in requests if not r["url"].endswith("/metadata?_summary=true")
        }
        probes = [r for r in requests if "/metadata" in r["url"]]
        assert probes and {p["headers"].get("authorization") for p in probes} == (
            {None} if mode == "default" else {"Bearer proxy-token-1"}
        )
    assert sent == {"default": {None}, "bearer": {"Bearer proxy-token-1"}, "forward": {f"Bearer {caller}"}}


async def test_an_audit_repository_on_the_upstream_gets_the_proxys_credential(proxy_for, clean_upstream, satusehat):
    client = await proxy_for(
        clean_upstream.base_url,
        satusehat,
        upstream_auth="bearer",
        upstream_token="proxy-token-1",
        audit_fhir=clean_upstream.base_url,
        audit_mode="continue",
    )
    assert (await client.get("/fhir/R4/Patient", headers=bearer("not-checked-with-auth-none"))).status == 200
    for _ in range(100):
        posts = [r for r in clean_upstream.requests() if r["url"].endswith("/AuditEvent")]
        if posts:
            break
        await asyncio.sleep(0.05)
    assert posts and {r["headers"].get("authorization") for r in clean_upstream.requests()} == {"Bearer proxy-token-1"}


async def test_observation_1_through_a_real_fhircrypt_serve(tmp_path, aiohttp_server, issuer, satusehat):  # noqa: F811
    """Issue 14, observation 1, as reproduced: a real ``fhircrypt serve`` with JWT auth in front of an upstream
    that answers the kick-off with 500 and a resource, then names a status URL on another port."""
    ring, kek = make_keyring(tmp_path)
    keyring = load_keyring(ring, LocalKeyProvider(parse_kek(kek.read_text())))
    stored = copy.deepcopy(PATIENT)
    encrypt_for_write(stored, satusehat, keyring, validate="off")
    counter, hostile = Counter(), Hostile(orjson.loads(orjson.dumps(stored)))
    counter.base = str((await aiohttp_server(counter.app())).make_url("")).rstrip("/")
    hostile.base = str((await aiohttp_server(hostile.app())).make_url("/fhir/R4"))
    (tmp_path / "upstream-token").write_text("proxy-token-9\n")
    served = Served(
        ["--upstream", hostile.base, "--policy", str(ROOT / "policies" / "satusehat.yaml"),
         "--oidc-issuer", issuer.url, "--audience", AUDIENCE,
         "--upstream-auth", "bearer", "--upstream-token-file", str(tmp_path / "upstream-token")],
        {"FHIRCRYPT_KEYRING": str(ring), "FHIRCRYPT_KEK_FILE": str(kek)},
    )  # fmt: skip
    callers = {who: issuer.token(**claims) for who, (claims, _) in SEES.items()}
    try:
        await asyncio.to_thread(served.wait_for, "listening")
        async with aiohttp.ClientSession() as http:
            hostile.answer("$export", 500, hostile.stored)
            for who, token in callers.items():
                async with http.get(served.url("/fhir/R4/$export"), headers={**ASYNC, **bearer(token)}) as resp:
                    if who == "nobody":  # no read scope at all: refused before the upstream is asked
                        assert resp.status == 403
                        continue
                    assert resp.status == 500
                    assert {k: v for k, v in _plain(await resp.json()).items() if k in SEES[who][1]} == SEES[who][1]
            hostile.answer("$export", 202, **{"Content-Location": f"{counter.base}/status/1"})
            billing = {**ASYNC, **bearer(callers["billing"])}
            async with http.get(served.url("/fhir/R4/$export"), headers=billing) as resp:
                assert resp.status == 502
    finally:
        assert await asyncio.to_thread(served.stop) == 0
    assert counter.received == []
    assert {auth for _, auth in hostile.seen} == {"Bearer proxy-token-9"}


class TokenEndpoint:
    """A small OAuth2 token endpoint (client credentials, client_secret_basic) issuing short-lived tokens."""

    def __init__(self, lifetime: int) -> None:
        self.lifetime = lifetime
        self.issued: list[str] = []
        self.refused = 0

    def app(self) -> web.Application:
        async def token(request: web.Request) -> web.Response:
            form = parse_qs((await request.read()).decode())
            expected = "Basic " + base64.b64encode(b"fhircrypt-proxy:s3cret").decode()
            if request.headers.get("Authorization") != expected or form.get("grant_type") != ["client_credentials"]:
                self.refused += 1
                return web.json_response({"error": "invalid_client"}, status=401)
            assert form.get("scope") == ["system/*.cruds"]
            self.issued.append(f"tok-{len(self.issued) + 1}")
            return web.json_response(
                {"access_token": self.issued[-1], "token_type": "Bearer", "expires_in": self.lifetime}
            )

        app = web.Application()
        app.router.add_post("/token", token)
        return app


async def test_client_credentials_token_is_cached_refreshed_and_refusals_are_502(
    aiohttp_server,
    proxy_for,
    clean_upstream,
    satusehat,
):
    endpoint = TokenEndpoint(lifetime=2)  # refreshed once half of it has passed (lifetimes under two minutes)
    url = str((await aiohttp_server(endpoint.app())).make_url("/token"))
    oauth = {
        "upstream_auth": "client-credentials",
        "upstream_token_url": url,
        "upstream_client_id": "fhircrypt-proxy",
        "upstream_scope": "system/*.cruds",
    }
    client = await proxy_for(clean_upstream.base_url, satusehat, **oauth, upstream_client_secret="s3cret")
    for _ in range(3):
        assert (await client.get("/fhir/R4/Patient")).status == 200
    assert endpoint.issued == ["tok-1"]
    await asyncio.sleep(1.2)
    assert (await client.get("/fhir/R4/Patient")).status == 200
    assert endpoint.issued == ["tok-1", "tok-2"]
    sent = [r["headers"].get("authorization") for r in clean_upstream.requests()]
    assert sent == ["Bearer tok-1"] * 3 + ["Bearer tok-2"]

    clean_upstream.reset()
    refused = await proxy_for(clean_upstream.base_url, satusehat, **oauth, upstream_client_secret="wrong")
    resp = await refused.get("/fhir/R4/Patient")
    outcome = await resp.json()
    assert resp.status == 502 and outcome["resourceType"] == "OperationOutcome" and endpoint.refused == 1
    assert "wrong" not in str(outcome) and clean_upstream.requests() == []


async def test_a_token_the_upstream_refuses_is_fetched_again(aiohttp_server, proxy_for, satusehat, encrypted):
    endpoint, hostile = TokenEndpoint(lifetime=3600), Hostile(encrypted)
    url = str((await aiohttp_server(endpoint.app())).make_url("/token"))
    hostile.base = str((await aiohttp_server(hostile.app())).make_url("/fhir/R4"))
    client = await proxy_for(
        hostile.base,
        satusehat,
        upstream_auth="client-credentials",
        upstream_token_url=url,
        upstream_client_id="fhircrypt-proxy",
        upstream_client_secret="s3cret",
        upstream_scope="system/*.cruds",
    )
    hostile.answer("Patient", 401, {"resourceType": "OperationOutcome", "issue": []})
    assert (await client.get("/fhir/R4/Patient")).status == 401
    hostile.answer("Patient", 200, {"resourceType": "Bundle", "type": "searchset"})
    assert (await client.get("/fhir/R4/Patient")).status == 200
    assert (await client.get("/fhir/R4/Patient")).status == 200
    assert endpoint.issued == ["tok-1", "tok-2"]
    assert [auth for _, auth in hostile.seen] == ["Bearer tok-1", "Bearer tok-2", "Bearer tok-2"]


def test_upstream_client_resolves_only_urls_on_the_upstreams_origin():
    client = UpstreamClient("https://fhir.example:443/fhir/R4/")
    assert str(client.resolve("Patient/1")) == "https://fhir.example/fhir/R4/Patient/1"
    assert str(client.resolve("/other/path?x=1")) == "https://fhir.example/other/path?x=1"
    assert client.resolve("https://FHIR.Example/fhir/R4/x").path == "/fhir/R4/x"  # host names ignore case
    for foreign in (
        "http://fhir.example/fhir/R4/x",  # another scheme
        "https://fhir.example:8443/fhir/R4/x",  # another port
        "https://fhir.example.evil/x",
        "https://user:pw@fhir.example/x",
        "//elsewhere.example/x",
        "ftp://fhir.example/x",
    ):
        with pytest.raises(FhirError) as err:
            client.resolve(foreign)
        assert err.value.status == 502 and foreign not in str(err.value)


async def test_the_migration_client_stops_at_a_paging_link_to_another_origin():
    async with Upstream("http://127.0.0.1:9/fhir/R4", attempts=1) as upstream:
        with pytest.raises(UpstreamDown) as err:
            await upstream.request("GET", "http://169.254.169.254/latest/meta-data")
    assert "outside its own origin" in str(err.value)


def test_decrypting_without_grants_is_impossible(satusehat, keyring, encrypted):
    """None is no longer 'every group': the grants are required, and every group is asked for by name."""
    with pytest.raises(TypeError):
        decrypt_body(copy.deepcopy(encrypted), satusehat, keyring, None, ReadReport())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        decrypt_resource(copy.deepcopy(encrypted), satusehat.resources["Patient"], keyring, None, "mask", ReadReport())  # type: ignore[arg-type]
    with pytest.raises(TypeError):  # a bare callable is no decision either
        decrypt_body(copy.deepcopy(encrypted), satusehat, keyring, lambda r: ALL_GROUPS, ReadReport())  # type: ignore[arg-type]
    opened = copy.deepcopy(encrypted)
    decrypt_body(opened, satusehat, keyring, key_holder(), ReadReport())
    assert _plain(opened)["nik"] and OTHER["id"] != opened["id"]


WEB = ROOT / "proxy" / "web"
EVERY_GROUP_ALLOWED = {("access.py", "development"), ("writes.py", "key_holder")}  # --auth none; the write merge


def test_every_group_is_granted_in_the_web_shell_only_for_auth_none_and_the_write_merge():
    """A new route that grants every group (the bulk relay did) fails here until it is reviewed."""
    used = set()
    for path in sorted(WEB.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            if name in ("ALL_GROUPS", "AllGroups", "development", "key_holder"):
                used.add((path.name, name))
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                "decrypt_body",
                "decrypt_resource",
            ):
                grants = node.args[3] if len(node.args) > 3 else None
                assert not (isinstance(grants, ast.Constant) and grants.value is None), f"{path.name}:{node.lineno}"
    assert used == EVERY_GROUP_ALLOWED
    assert Path(WEB / "access.py").read_text().count("development()") == 1  # the --auth none branch


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ({"upstream_auth": "bearer"}, "upstream_auth bearer needs FHIRCRYPT_UPSTREAM_TOKEN_FILE"),
        ({"upstream_auth": "bearer", "upstream_token": " "}, "the upstream bearer token is empty"),
        (
            {
                "upstream_auth": "client-credentials",
                "upstream_token_url": "https://idp/token",
                "upstream_client_id": "p",
            },
            "upstream_auth client-credentials needs",
        ),
        (
            {"audit_fhir": "https://fhir.example/audit", "audit_fhir_token": "t"},
            "audit_fhir is on the upstream's origin",
        ),
        ({"audit_fhir": "https://audit.example/fhir", "audit_fhir_token": "t"}, None),
        ({"upstream_auth": "bearer", "upstream_token": "t", "forward_caller_token": True}, None),
    ],
)
def test_serve_refuses_an_unusable_upstream_credential_at_start_up(extra, problem):
    policy = str(ROOT / "policies" / "satusehat.yaml")
    found = check_startup(make_settings("https://fhir.example/fhir/R4", policy=policy, **extra))
    assert found == problem if problem is None else problem in found
    assert "t" not in (found or "").split()  # secrets are never quoted


async def test_paging_links_are_proxy_links_bound_to_the_caller_who_searched(scene, issuer):  # noqa: F811
    """A server's next link (HAPI's ?_getpages=<handle> carries no search values to check again) is handed
    out as a signed proxy link: followed for the same subject only, decided again, on the upstream's origin."""
    client, hostile, counter = scene
    page = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": hostile.stored}],
        "link": [
            {"relation": "self", "url": f"{hostile.base}/Patient?_count=1"},
            {"relation": "next", "url": f"{hostile.base}?_getpages=handle-1&_getpagesoffset=1&_count=1"},
        ],
    }
    hostile.answer("Patient", 200, page)
    hostile.answer("/fhir/R4", 200, page)  # the page handle, as HAPI names it (the base URL with a query)
    alice = bearer(issuer.token(sub="alice", **PHYSICIAN))
    first = await (await client.get("/fhir/R4/Patient?_count=1", headers=alice)).json()
    links = {link["relation"]: link["url"] for link in first["link"]}
    assert links["self"] == f"{PUBLIC_BASE}/Patient?_count=1"
    assert links["next"].startswith(f"{PUBLIC_BASE}/$fhircrypt-link/page/") and "_getpages" not in links["next"]
    nxt = _local(links["next"])
    second = await client.get(nxt, headers=alice)
    assert second.status == 200, await second.text()
    assert _plain((await second.json())["entry"][0]["resource"])["nik"] is True
    assert [path for path, _ in hostile.seen].count("GET /fhir/R4") == 1  # the handle, on the upstream's base
    for other in (bearer(issuer.token(sub="mallory", **PHYSICIAN)), bearer(issuer.token(sub="alice", **NOBODY))):
        resp = await client.get(nxt, headers=other)
        assert resp.status in (403, 404), await resp.text()  # another subject: unknown link; no scope: refused
    assert (await client.get(nxt[:-2] + ("AA" if not nxt.endswith("AA") else "BB"), headers=alice)).status == 404
    assert (await client.post(nxt, headers=alice)).status == 404
    assert counter.received == []
