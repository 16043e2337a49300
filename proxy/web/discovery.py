"""SMART discovery: what the proxy enforces, told to clients in the FHIR way.

``[base]/.well-known/smart-configuration`` (SMART App Launch 2.x) is built from the OpenID
provider's own discovery document, which the token verifier fetched at start-up, plus the
permission models the proxy itself enforces (:mod:`proxy.auth.decision`). The
CapabilityStatement the server returns is rewritten the same way: its ``rest.security`` names
the proxy's authorization, not the server's (which only ever sees the proxy's credential).
"""

from __future__ import annotations

import orjson
from aiohttp import web

from proxy.outcome import FhirError
from proxy.policy.affects import answerable
from proxy.policy.compiler import CompiledPolicy
from proxy.web import headers as hdr
from proxy.web.runtime import RUNTIME

_SMART_SECURITY = "http://terminology.hl7.org/CodeSystem/restful-security-service"
_OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
# endpoints copied from the provider's discovery document when it publishes them
_PROVIDER_FIELDS = (
    "issuer",
    "jwks_uri",
    "authorization_endpoint",
    "token_endpoint",
    "introspection_endpoint",
    "revocation_endpoint",
    "grant_types_supported",
    "token_endpoint_auth_methods_supported",
    "code_challenge_methods_supported",
)
# what the proxy decides itself, whatever the provider supports
_CAPABILITIES = [
    "permission-patient",
    "permission-user",
    "permission-v1",
    "permission-v2",
    "context-standalone-patient",
]


def smart_configuration(provider: dict) -> dict:
    """The SMART configuration document for an OpenID provider's discovery document."""
    config = {k: provider[k] for k in _PROVIDER_FIELDS if k in provider}
    if "authorization_endpoint" in provider:
        config["capabilities"] = [*_CAPABILITIES, "launch-standalone", "client-public", "client-confidential-symmetric"]
    else:
        config["capabilities"] = list(_CAPABILITIES)
    return config


def secure_capabilities(statement: dict, provider: dict | None, policy: CompiledPolicy) -> None:
    """Rewrite a CapabilityStatement to what the proxy really offers (in place): ``rest.security`` names
    the proxy's SMART authorization (``provider``: the OpenID discovery document; None without
    authentication), and covered types list only the search parameters the proxy can answer on
    encrypted data (the others it refuses)."""
    authenticated, provider = provider is not None, provider or {}
    uris = [
        {"url": name, "valueUri": provider[key]}
        for name, key in (("authorize", "authorization_endpoint"), ("token", "token_endpoint"))
        if isinstance(provider.get(key), str)
    ]
    security: dict = {
        "service": [{"coding": [{"system": _SMART_SECURITY, "code": "SMART-on-FHIR"}], "text": "OAuth2 using SMART"}],
        "description": "Bearer tokens from the hospital's OpenID provider; access decided by fhircrypt",
    }
    if uris:
        security["extension"] = [{"url": _OAUTH_URIS, "extension": uris}]
    for rest in statement.get("rest") or ():
        if isinstance(rest, dict):
            if authenticated:
                rest["security"] = security
            for resource in rest.get("resource") or ():
                rp = policy.resources.get(str(resource.get("type"))) if isinstance(resource, dict) else None
                params = resource.get("searchParam") if rp is not None else None
                if rp is not None and isinstance(params, list):
                    resource["searchParam"] = [
                        p for p in params if not isinstance(p, dict) or answerable(rp, str(p.get("name", "")))
                    ]


async def smart_configuration_handler(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    if rt.verifier is None or not rt.verifier.openid_configuration:
        error = FhirError(404, "not-found", "no SMART configuration: the proxy is not configured with --oidc-issuer")
        return web.Response(status=404, body=orjson.dumps(error.outcome()), content_type=hdr.FHIR_JSON)
    body = orjson.dumps(smart_configuration(rt.verifier.openid_configuration))
    return web.Response(body=body, content_type="application/json", headers={"Cache-Control": "max-age=300"})
