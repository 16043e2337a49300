"""TLS on both sides: protocol floor, client certificates (mutual TLS) mapped to callers, and the upstream's mTLS,
CA bundle, SNI and hostname verification. Certificates are generated per run with trustme."""

from __future__ import annotations

import ssl

import aiohttp
import orjson
import pytest
import trustme
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509

from proxy.web.app import create_app
from proxy.web.tls import ServerTLS, upstream_context
from tests.conftest import FHIR_JSON, load_fixture, make_settings, unit_policy
from tests.test_auth import AUDIENCE, Issuer, bearer


def _write(tmp_path, name: str, blob) -> str:
    path = tmp_path / name
    blob.write_to_path(str(path))
    return str(path)


@pytest.fixture
def pki(tmp_path):
    """A server CA with the proxy's certificate, and a separate CA for client certificates."""
    server_ca, client_ca = trustme.CA(), trustme.CA()
    cert = server_ca.issue_cert("127.0.0.1", "localhost")
    return {
        "server_ca": server_ca,
        "client_ca": client_ca,
        "tls_cert": _write(tmp_path, "proxy.pem", cert.cert_chain_pems[0]),
        "tls_key": _write(tmp_path, "proxy.key", cert.private_key_pem),
        "tls_client_ca": _write(tmp_path, "clients-ca.pem", client_ca.cert_pem),
    }


@pytest.fixture
async def oidc(aiohttp_server):
    issuer = Issuer()
    server = await aiohttp_server(issuer.app())
    issuer.url = str(server.make_url("")).rstrip("/")
    return issuer


def _client(pki, cert: trustme.LeafCert | None = None, minimum=None, maximum=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=None)
    pki["server_ca"].configure_trust(ctx)
    if cert is not None:
        cert.configure_cert(ctx)
    if minimum:
        ctx.minimum_version = minimum
    if maximum:
        ctx.maximum_version = maximum
    return ctx


async def _serve_tls(settings, policy, keyring) -> TestServer:
    server = TestServer(create_app(settings, policy, keyring))
    await server.start_server(ssl=ServerTLS(settings).listener, access_log=None)
    return server


async def _get(url: str, ctx: ssl.SSLContext, headers: dict | None = None) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, ssl=ctx, headers={"Accept": "application/fhir+json", **(headers or {})}) as resp,
    ):
        return resp.status, await resp.read()


async def test_only_tls12_and_later_and_no_weak_suites(pki, clean_upstream, keyring):
    settings = make_settings(clean_upstream.base_url, tls_cert=pki["tls_cert"], tls_key=pki["tls_key"])
    tls = ServerTLS(settings)
    assert tls.listener.minimum_version == tls.current.minimum_version == ssl.TLSVersion.TLSv1_2
    server = await _serve_tls(settings, unit_policy(), keyring)
    try:
        url = str(server.make_url("/fhir/R4/metadata"))
        assert (await _get(url, _client(pki)))[0] == 200
        assert (await _get(url, _client(pki, maximum=ssl.TLSVersion.TLSv1_2)))[0] == 200
        cbc = _client(pki, maximum=ssl.TLSVersion.TLSv1_2)
        cbc.set_ciphers("ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES128-SHA:AES128-SHA256:AES128-SHA")
        with pytest.raises(aiohttp.ClientError):  # CBC and static-RSA suites are not offered
            await _get(url, cbc)
    finally:
        await server.close()


async def test_required_client_certificates_are_verified_against_the_client_ca(pki, clean_upstream, keyring):
    settings = make_settings(clean_upstream.base_url, tls_client_auth="required", **_tls(pki))
    server = await _serve_tls(settings, unit_policy(), keyring)
    try:
        url = str(server.make_url("/fhir/R4/metadata"))
        with pytest.raises(aiohttp.ClientError):  # no certificate: the handshake fails
            await _get(url, _client(pki))
        stranger = trustme.CA().issue_cert("lab-analyser")  # right name, wrong CA
        with pytest.raises(aiohttp.ClientError):
            await _get(url, _client(pki, stranger))
        good = pki["client_ca"].issue_cert("lab-analyser")
        assert (await _get(url, _client(pki, good)))[0] == 200
    finally:
        await server.close()


def _tls(pki) -> dict:
    return {k: pki[k] for k in ("tls_cert", "tls_key", "tls_client_ca")}


async def test_a_mapped_client_certificate_is_a_caller_with_the_mapped_rights_and_is_audited(
    pki, clean_upstream, keyring, satusehat, oidc, tmp_path, proxy_for
):
    trail, key = tmp_path / "audit.jsonl", tmp_path / "audit.key"
    from proxy.audit.cli import init_trail

    init_trail(str(trail), str(key))
    bridge = pki["client_ca"].issue_cert("bridge.rs-sehat.example", common_name="satusehat-bridge")
    unmapped = pki["client_ca"].issue_cert("other.rs-sehat.example", common_name="someone-else")
    subject = x509.load_pem_x509_certificate(bridge.cert_chain_pems[0].bytes()).subject.rfc4514_string()
    assert subject.startswith("CN=satusehat-bridge,")
    claims = {"sub": "satusehat-bridge", "client_id": "satusehat-bridge", "scope": "system/*.rs"}
    identities = tmp_path / "identities.yaml"
    identities.write_text(yaml.safe_dump({"identities": [{"subject": subject.replace(",", ", "), "claims": claims}]}))

    writer = await proxy_for(clean_upstream.base_url, satusehat)  # --auth none, to store a resource
    patient = load_fixture("satusehat/patient.json")
    created = await (await writer.post("/fhir/R4/Patient", data=orjson.dumps(patient), headers=FHIR_JSON)).json()
    nik = next(i["value"] for i in patient["identifier"] if i["system"].endswith("/nik"))

    settings = make_settings(
        clean_upstream.base_url,
        auth="jwt",
        oidc_issuer=oidc.url,
        audience=AUDIENCE,
        tls_client_auth="optional",
        client_identities=str(identities),
        audit_trail=str(trail),
        **_tls(pki),
    )
    server = await _serve_tls(settings, satusehat, keyring)
    try:
        url = str(server.make_url(f"/fhir/R4/Patient/{created['id']}"))
        status, body = await _get(url, _client(pki, bridge))
        assert status == 200 and nik in body.decode()  # the mapped caller decrypts
        status, _ = await _get(url, _client(pki, unmapped))
        assert status == 401  # a verified but unmapped certificate is nobody
        status, _ = await _get(url, _client(pki))
        assert status == 401
        token = oidc.token(scope="user/*.rs", realm_access={"roles": ["billing"]})
        status, body = await _get(url, _client(pki, bridge), bearer(token))
        assert status == 200 and nik not in body.decode()  # a bearer token, when sent, decides
    finally:
        await server.close()
    records = [orjson.loads(line)["event"] for line in trail.read_text().splitlines()]
    agents = orjson.dumps(records).decode()
    assert "satusehat-bridge" in agents and nik not in agents


def test_the_identities_file_is_checked(tmp_path):
    from proxy.auth.certificates import CertificateIdentities, IdentityError

    bad = tmp_path / "ids.yaml"
    bad.write_text("identities:\n  - subject: CN=x\n    claims: {client_id: x}\n")
    with pytest.raises(IdentityError, match=r"identities\[0\]: needs 'claims' with a 'sub'"):
        CertificateIdentities.load(str(bad))


@pytest.fixture
async def tls_upstream(aiohttp_server, tmp_path):
    """An HTTPS FHIR endpoint that requires a client certificate and is named fhir.internal only."""
    server_ca, client_ca = trustme.CA(), trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ca.issue_cert("fhir.internal").configure_cert(ctx)
    client_ca.configure_trust(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    sni, served = [], []
    ctx.sni_callback = lambda ssl_object, name, context: sni.append(name)

    async def organization(request):
        served.append(request.path)
        return web.json_response({"resourceType": "Organization", "id": "o1"}, content_type="application/fhir+json")

    app = web.Application()
    app.router.add_get("/fhir/R4/Organization/o1", organization)
    server = await aiohttp_server(app, ssl=ctx)
    proxy_cert = client_ca.issue_cert("fhircrypt-proxy")
    return {
        "base": f"https://127.0.0.1:{server.port}/fhir/R4",
        "upstream_ca": _write(tmp_path, "up-ca.pem", server_ca.cert_pem),
        "upstream_client_cert": _write(tmp_path, "px.pem", proxy_cert.cert_chain_pems[0]),
        "upstream_client_key": _write(tmp_path, "px.key", proxy_cert.private_key_pem),
        "sni": sni,
        "served": served,
    }


async def test_upstream_mutual_tls_with_sni_and_hostname_verification(proxy_for, tls_upstream):
    up = tls_upstream
    files = {k: up[k] for k in ("upstream_ca", "upstream_client_cert", "upstream_client_key")}
    good = await proxy_for(up["base"], unit_policy(), upstream_server_name="fhir.internal", **files)
    assert (await good.get("/fhir/R4/Organization/o1")).status == 200
    assert up["sni"] == ["fhir.internal"]  # SNI carried the configured name
    wrong_name = await proxy_for(up["base"], unit_policy(), **files)  # 127.0.0.1 is not in the certificate
    assert (await wrong_name.get("/fhir/R4/Organization/o1")).status == 502
    no_client_cert = await proxy_for(
        up["base"], unit_policy(), upstream_server_name="fhir.internal", upstream_ca=up["upstream_ca"]
    )
    assert (await no_client_cert.get("/fhir/R4/Organization/o1")).status == 502
    assert len(up["served"]) == 1  # neither the wrong name nor a missing client certificate got an answer


def test_upstream_context_is_tls12_or_later_and_checks_hostnames(tls_upstream):
    ctx = upstream_context(make_settings("https://fhir.example/fhir/R4", upstream_ca=tls_upstream["upstream_ca"]))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert upstream_context(make_settings("http://fhir.example/fhir/R4")) is None
