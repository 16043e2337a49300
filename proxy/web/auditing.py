"""One audit record per interaction: what the trail needs from a request, and the glue to emit it.

Only ids, references, group names, counts and the *rewritten* query are recorded -
never bodies, never plaintext search values (the forwarded query carries blind-index
tokens where the client sent values).
"""

from __future__ import annotations

import hashlib
import logging
import re
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

from proxy import fhirgrammar as fg
from proxy.audit.events import Agent, audit_event
from proxy.audit.trail import AsyncAuditSink, AuditUnavailable
from proxy.auth.caller import Caller
from proxy.policy.access import CallerGrants
from proxy.transform.bodies import nested_resources
from proxy.transform.interactions import Interaction
from proxy.transform.records import ReadReport

log = logging.getLogger("fhircrypt")
_ACTIONS = {"create": "C", "update": "U", "patch": "U", "delete": "D", "search": "E", "operation": "E", "batch": "E"}
_LOCATION = re.compile(rf"(?:^|/)({fg.TYPE_RE}/{fg.ID_RE}){fg.HISTORY_RE}/?$")
_FHIR_USER = re.compile(rf"^(?:.*/)?{fg.TYPE_RE}/{fg.ID_RE}$")
MAX_REFERENCES = 200
OBSERVER = f"fhircrypt@{socket.gethostname()}"


@dataclass
class Exchange:
    """Filled in while a request is handled; read when it is audited."""

    caller: Caller | None = None
    grants: CallerGrants | None = None
    break_glass: bool = False
    forwarded_query: str | None = None
    report: ReadReport = field(default_factory=ReadReport)
    references: list[str] = field(default_factory=list)  # resources the answer carried or pointed at
    targets: list[str] = field(default_factory=list)  # resources the request named (deletes in a Bundle)
    record_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # the audit record's own id
    upstream_seconds: float = 0.0  # waiting for the upstream's answer (metrics: proxy overhead)


def references_in(payload: dict[str, Any]) -> list[str]:
    """``Type/id`` of the resources a response carried (the body, Bundle entries, contained) and of
    those a batch or transaction response only points at (``entry.response.location``)."""
    out = []
    for resource in (payload, *(r for r, _ in nested_resources(payload, ""))):
        if resource.get("resourceType") == "Bundle" and type(resource.get("entry")) is list:
            for entry in resource["entry"]:
                response = entry.get("response") if type(entry) is dict else None
                ref = reference_of(response.get("location")) if type(response) is dict else None
                if ref is not None:
                    out.append(ref)
        if type(resource.get("id")) is not str:
            continue
        ref = f"{resource.get('resourceType')}/{resource.get('id')}"
        if fg.REFERENCE.match(ref) and resource.get("resourceType") not in ("Bundle", "OperationOutcome"):
            out.append(ref)
        if len(out) >= MAX_REFERENCES:
            break
    return list(dict.fromkeys(out))[:MAX_REFERENCES]


def audited_references(sinks: list[AsyncAuditSink], payload: dict[str, Any]) -> list[str]:
    """:func:`references_in` when there are audit ``sinks`` to record them (nothing else reads them)."""
    return references_in(payload) if sinks else []


def reference_of(location: object) -> str | None:
    """``Patient/123`` from a Location (``[base/]Patient/123[/_history/2]``), or None."""
    if type(location) is not str:
        return None
    m = _LOCATION.search(location.split("?", 1)[0])
    return m.group(1) if m else None


def _agent(caller: Caller | None, remote: str | None) -> Agent:
    """The audit agent; values that are not plain names are recorded as a hash, so no record is lost."""
    if caller is None:
        return Agent(network_address=remote)

    def name(value: str | None) -> str | None:
        if not value:
            return None
        if len(value) <= 256 and value.isprintable():
            return value
        return "sha256:" + hashlib.sha256(value.encode()).hexdigest()

    jti = caller.claims.get("jti")
    return Agent(
        subject=name(caller.subject),
        client_id=name(caller.client_id),
        fhir_user=caller.fhir_user
        if caller.fhir_user
        and len(caller.fhir_user) <= 256
        and caller.fhir_user.isprintable()
        and _FHIR_USER.match(caller.fhir_user)
        else None,
        roles=tuple(sorted(r for r in caller.roles if fg.CODE.match(r))),
        network_address=remote,
        token_id=name(jti) if isinstance(jti, str) else None,
    )


def _interaction(it: Interaction | None) -> str:
    if it is None:
        return "operation"
    label = it.label()
    return "operation" if label.startswith("operation") else label


def record(
    sinks: list[AsyncAuditSink],
    policy: str,
    request_id: str,
    it: Interaction | None,
    status: int,
    exchange: Exchange,
    remote: str | None,
) -> None:
    caller = exchange.caller
    agent = _agent(caller, remote)
    named = [f"{it.resource_type}/{it.id}"] if it is not None and it.id and it.resource_type else []
    named_all = dict.fromkeys([*named, *exchange.targets, *exchange.references])  # ids the upstream chose too:
    resources = [ref for ref in named_all if fg.REFERENCE.match(ref)][:MAX_REFERENCES]  # one bad id loses no record
    action = _ACTIONS.get(it.kind, "R") if it else "E"
    try:
        event = audit_event(
            action=action,
            interaction=_interaction(it),
            status=status,
            request_id=request_id,
            record_id=exchange.record_id,
            agent=agent,
            resources=resources,
            query=exchange.forwarded_query,
            decrypted_groups=sorted(exchange.report.decrypted_groups),
            masked_groups=sorted(exchange.report.masked_groups),
            purpose_of_use=[p for p in (caller.purpose_of_use if caller else ()) if fg.CODE.match(p)],
            break_glass=exchange.break_glass,
            integrity_failures=len(exchange.report.failures),
            policy=policy,
            source_observer=OBSERVER,
        )
        for sink in sinks:
            sink.emit(event)
    except (ValueError, AuditUnavailable) as exc:
        log.error(
            "audit record lost", extra={"event": "audit-error", "request_id": request_id, "error": type(exc).__name__}
        )
