"""The proxy's upstream client built from its settings, and reading FHIR JSON from upstream answers.

Every upstream request of the proxy goes through the one :class:`proxy.upstream.client.UpstreamClient`
that ``client_for`` builds (same origin only, the proxy's own credential, TLS, limits).
"""

from __future__ import annotations

import orjson

from proxy.auth.decision import Decision
from proxy.outcome import FhirError
from proxy.settings import Settings
from proxy.transform import jsonnum
from proxy.transform.outline import outline
from proxy.upstream.client import UpstreamClient, read_limited
from proxy.upstream.credentials import ClientCredentials, Credential, StaticBearer
from proxy.web.tls import upstream_context

__all__ = ["client_for", "credential_for", "read_limited", "upstream_problem", "upstream_resource"]


def credential_for(settings: Settings) -> Credential | None:
    """The proxy's own credential for the upstream (``upstream_auth``); a ValueError names what is missing."""
    if settings.upstream_auth == "bearer":
        if not settings.upstream_token:
            raise ValueError("upstream_auth bearer needs FHIRCRYPT_UPSTREAM_TOKEN_FILE (or --upstream-token-file)")
        return StaticBearer(settings.upstream_token)
    if settings.upstream_auth == "client-credentials":
        if not (settings.upstream_token_url and settings.upstream_client_id and settings.upstream_client_secret):
            raise ValueError(
                "upstream_auth client-credentials needs upstream_token_url, upstream_client_id "
                "and FHIRCRYPT_UPSTREAM_CLIENT_SECRET_FILE"
            )
        return ClientCredentials(
            settings.upstream_token_url,
            settings.upstream_client_id,
            settings.upstream_client_secret,
            settings.upstream_scope,
            timeout=settings.upstream_timeout,
        )
    return None


def upstream_problem(settings: Settings) -> str | None:
    """What makes the upstream connection's configuration unusable, in words (start-up exit code 2), or None."""
    try:
        client = client_for(settings)
    except ValueError as exc:
        return str(exc)
    if settings.audit_fhir and settings.audit_fhir_token and client.owns(settings.audit_fhir):
        return "audit_fhir is on the upstream's origin: it gets upstream_auth's credential, not audit_fhir_token"
    return None


def client_for(settings: Settings) -> UpstreamClient:
    return UpstreamClient(
        settings.upstream,
        tls=upstream_context(settings),
        server_name=settings.upstream_server_name,
        credential=credential_for(settings),
        forward_caller_token=settings.forward_caller_token,
        timeout=settings.upstream_timeout,
        connect_timeout=settings.connect_timeout,
        connections=settings.upstream_connections,
        max_response=settings.max_response,
    )


def leads_elsewhere(value: str, upstream_base: str) -> bool:
    """An absolute URL outside the upstream's FHIR base: the proxy cannot rewrite it to its own base, so a
    client following it (with its token) would leave the proxy for wherever the upstream pointed."""
    lowered = value.lower()
    inside = value == upstream_base or value.startswith((upstream_base + "/", upstream_base + "?"))
    return lowered.startswith(("http:", "https:", "//")) and not inside


def _bundle_links(payload: dict) -> list:
    links = payload.get("link") if payload.get("resourceType") == "Bundle" else None
    return links if type(links) is list else []


def _away(link: object, upstream_base: str) -> bool:
    return type(link) is dict and type(link.get("url")) is str and leads_elsewhere(link["url"], upstream_base)


def drop_foreign_links(payload: dict, upstream_base: str) -> None:
    """Remove a Bundle's navigation links (next, previous, ...) that lead elsewhere (``leads_elsewhere``)."""
    links = _bundle_links(payload)
    kept = [k for k in links if not _away(k, upstream_base)]
    if len(kept) != len(links):
        payload["link"] = kept


def has_foreign_links(payload: dict, upstream_base: str) -> bool:
    """Whether :func:`drop_foreign_links` would remove a link."""
    return any(_away(k, upstream_base) for k in _bundle_links(payload))


def upstream_resource(raw: bytes, what: str = "the upstream answered with", parse=jsonnum.loads) -> dict:
    """A JSON object from the upstream, or a 502 naming what was wrong (never its content). ``parse``:
    ``orjson.loads`` where the value is only looked at, never serialised again (no exact numbers needed)."""
    try:
        value = parse(raw)
    except orjson.JSONDecodeError:
        raise FhirError(502, "structure", f"{what} invalid JSON") from None
    if type(value) is not dict:
        raise FhirError(502, "structure", f"{what} JSON that is not a FHIR resource")
    return value


def untouched_view(raw: bytes, decision: Decision, what: str = "the upstream answered with") -> dict:
    """An answer the policy does not act on (``bodies.untouched``), as much of it as judging it for
    ``decision`` needs: its outline (``proxy.transform.outline``) when the caller is judged by resource
    type alone, else a plain parse. Neither is serialised again: the client gets the upstream's bytes."""
    view = None if decision.judges_content() else outline(raw)
    return view if view is not None else upstream_resource(raw, what, parse=orjson.loads)
