"""Who is calling and what they may do: bearer tokens, the request's access decision, canary alarms."""

from __future__ import annotations

import logging

from aiohttp import web

from proxy.auth.caller import caller_from_claims
from proxy.auth.decision import Decision, decide, development, unscoped
from proxy.auth.tokens import TokenError
from proxy.outcome import FhirError
from proxy.policy.operations import read_only
from proxy.transform.interactions import Interaction
from proxy.web.auditing import Exchange
from proxy.web.runtime import Runtime

log = logging.getLogger("fhircrypt")


def _unauthorized(description: str, invalid: bool) -> FhirError:
    challenge = 'Bearer realm="fhircrypt"'
    if invalid:
        challenge += f', error="invalid_token", error_description="{description}"'
    return FhirError(401, "login", description, headers={"WWW-Authenticate": challenge})


async def authorize(
    rt: Runtime, request: web.Request, it: Interaction, request_id: str, exchange: Exchange
) -> Decision:
    """Authenticate the caller and decide the request (:func:`proxy.auth.decision.decide`):
    401 without a valid bearer token (except for metadata), 403 when the decision refuses."""
    if rt.verifier is None:
        return development()  # --auth none: development mode, everything decrypts
    if it.kind == "capabilities":
        return unscoped(None)
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        claims = _certificate_claims(rt, request)
        if claims is None:
            raise _unauthorized("a bearer token is required", invalid=False)
    else:
        token = token.strip()
        try:
            if rt.introspector is not None and token.count(".") != 2:  # opaque: not a JWS compact serialisation
                claims = await rt.introspector.verify(token)
            else:
                claims = await rt.verifier.verify(token)
        except TokenError as exc:
            raise _unauthorized(str(exc), invalid=True) from None
    access = rt.policy.access
    if access is None:
        exchange.caller = caller_from_claims(claims)
        return unscoped(None)
    caller = caller_from_claims(claims, access.roles_claim, request.headers.get(access.reason_header) or None)
    exchange.caller = caller
    if caller.subject in rt.blocked_subjects:
        raise FhirError(403, "forbidden", "access refused")
    grants = access.grants(caller)
    exchange.caller, exchange.grants, exchange.break_glass = caller, grants, grants.break_glass
    if grants.break_glass:
        log.warning(
            "break-glass",
            extra={
                "event": "break-glass",
                "request_id": request_id,
                "subject": caller.subject,
                "client_id": caller.client_id,
            },
        )
    return decide(grants, it, read_only(rt.policy.operations))


def _certificate_claims(rt: Runtime, request: web.Request) -> dict | None:
    """Without a bearer token: the claims mapped to the client's certificate (verified by the TLS layer
    against tls_client_ca), or None. A bearer token, when sent, always decides instead."""
    if rt.identities is None or request.transport is None:
        return None
    ssl_object = request.transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return rt.identities.claims_for(der) if der else None


def watch_canaries(rt: Runtime, decision: Decision, hits: list[str]) -> Decision:
    """The same decision, noting each honeytoken resource that is about to be decrypted for the caller."""
    canaries = rt.policy.canaries
    if not canaries:
        return decision

    def watch(resource: dict, groups: object) -> None:
        ref = f"{resource.get('resourceType')}/{resource.get('id')}"
        if ref in canaries and groups:  # ALL_GROUPS is true, an empty frozenset false
            hits.append(ref)

    return decision.watched(watch)


def alarm(rt: Runtime, exchange: Exchange, hits: list[str], request_id: str) -> None:
    """A honeytoken decrypted for a caller: alert (and with action block, refuse this caller from now on)."""
    subject = exchange.caller.subject if exchange.caller else None
    log.critical(
        "canary resource decrypted",
        extra={"event": "canary", "request_id": request_id, "subject": subject, "resources": sorted(hits)},
    )
    if rt.policy.canary_action == "block" and subject:
        rt.blocked_subjects.add(subject)
        raise FhirError(403, "forbidden", "access refused")
