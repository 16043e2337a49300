"""One FHIR R4 AuditEvent per interaction, following IHE BALP (Basic Audit Log Patterns).

The builder accepts identifiers only - references such as ``Patient/123``, group names,
codes, counts and the query string the proxy *forwarded* (blind-index tokens, never the
caller's search values). It has no parameter that could carry a resource body or an
element value, and it refuses references, group names and codes that do not look like
ids, so a caller cannot slip PHI into the audit trail by passing the wrong string.

Codes, following BALP 1.1.x (https://profiles.ihe.net/ITI/BALP) and FHIR R4 AuditEvent:

- ``type`` audit-event-type#rest, ``subtype`` restful-interaction#<interaction>, as in the
  BALP RESTful patterns (Read, Query, Create, Update, Delete).
- agent *client application*: DICOM 110153 "Source Role ID" (BALP REST ``client`` slice) and
  DICOM 110150 "Application" (BALP ``oClient`` slice of OAUTHaccessTokenUse), ``who.identifier``
  = the token's ``client_id``, ``network`` = the caller's address.
- agent *proxy*: DICOM 110152 "Destination Role ID" (BALP ``server`` slice).
- agent *user*: v3-ParticipationType IRCP "information recipient" for reads and searches
  (AUT "author" for create/update/delete, BALP UserAgentTypesVS) plus BALP
  UserAgentTypes#UserOauthAgent; ``who.identifier.value`` = token subject, ``requestor`` true,
  ``role`` = token roles, ``purposeOfUse``, ``policy`` = the token's ``jti`` when known.
- ``source``: observer = this proxy, type security-source-type#4 "Application Server".
- entity per resource: Patient -> audit-entity-type#1 Person, object-role#1 Patient (BALP
  ``patient`` slice); others -> #2 System Object, object-role#4 Domain Resource (``data`` slice).
- entity for the query: #2 System Object, object-role#24 Query, ``query`` = base64 of the
  rewritten query. BALP also copies the query into ``description``; we do not, so the query
  exists once and only as forwarded.
- entity for the request: BALP BasicAuditEntityType#XrequestId, ``what.identifier`` = request
  id; its ``detail`` carries the fhircrypt decision (decrypted and masked groups, integrity
  failures, policy name@sha, break-glass).
- ``purposeOfEvent``: v3-ActReason codes; break-glass adds ETREAT and BTG, a fhircrypt
  ``subtype`` code ``break-glass`` and the R5 cross-version ``severity`` extension = alert.
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from proxy import fhirgrammar as fg
from proxy.transform.markers import CANONICAL

AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL_INTERACTION = "http://hl7.org/fhir/restful-interaction"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
BALP_USER_AGENT_TYPES = "https://profiles.ihe.net/ITI/BALP/CodeSystem/UserAgentTypes"
BALP_ENTITY_TYPE = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
SEVERITY_EXTENSION = "http://hl7.org/fhir/5.0/StructureDefinition/extension-AuditEvent.severity"
FHIRCRYPT_SUBTYPE = CANONICAL + "/CodeSystem/audit-event-subtype"
ROLE_SYSTEM = CANONICAL + "/CodeSystem/token-role"

ACTIONS = frozenset("CRUDE")
INTERACTIONS = frozenset(
    {
        "read",
        "vread",
        "update",
        "patch",
        "delete",
        "history",
        "history-instance",
        "history-type",
        "history-system",
        "create",
        "search",
        "search-type",
        "search-system",
        "search-compartment",
        "capabilities",
        "transaction",
        "batch",
        "operation",
    }
)
_WRITE_ACTIONS = frozenset("CUD")

# What may appear in the identifying inputs. Anything else is refused: the builder is the last
# place where a value that is not an id could be kept out of the trail.
_MAX_ID = 256  # subjects, client ids, addresses: ids from tokens and sockets, never free text

_ACT_REASON_DISPLAY = {"ETREAT": "Emergency Treatment", "BTG": "break the glass"}


@dataclass(frozen=True)
class Agent:
    """Who asked: the identities from the access token and the socket, nothing from the request body.

    ``token_id`` is the token's ``jti``; BALP records it in the user agent's ``policy`` so an
    auditor can find the token that authorised the access.
    """

    subject: str | None = None
    client_id: str | None = None
    fhir_user: str | None = None
    roles: tuple[str, ...] = ()
    network_address: str | None = None
    token_id: str | None = None


def _coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    out = {"system": system, "code": code}
    if display:
        out["display"] = display
    return out


def _identity(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > _MAX_ID or not value.isprintable():
        raise ValueError(f"audit: {what} must be a short printable id")
    return value


def _names(values: list[str] | tuple[str, ...], what: str) -> list[str]:
    out: list[str] = []
    for v in values:
        if not isinstance(v, str) or not fg.CODE.match(v):
            raise ValueError(f"audit: {what} must be names or codes (letters, digits, '.', '_', '-')")
        if v not in out:
            out.append(v)
    return out


def _outcome(status: int) -> tuple[str, str]:
    """R4 audit-event-outcome: 0 success, 4 minor failure (caller's error), 8 serious (server's)."""
    if 200 <= status < 400:
        return "0", f"HTTP {status}"
    if 400 <= status < 500:
        return "4", f"HTTP {status}: request refused"
    if 500 <= status < 600:
        return "8", f"HTTP {status}: server or upstream failure"
    return "12", f"no HTTP outcome ({status})"  # aborted before a response: the worst case


def _instant(recorded: datetime | None) -> str:
    when = recorded or datetime.now(UTC)
    if when.tzinfo is None:
        raise ValueError("audit: recorded must be timezone-aware")
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _network(address: str) -> dict[str, Any]:
    # R4 AuditEventAgentNetworkType: 1 machine name, 2 IP address, 5 URI.
    if "://" in address:
        return {"address": address, "type": "5"}
    try:
        ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return {"address": address, "type": "1"}
    return {"address": address, "type": "2"}


def _agents(action: str, agent: Agent, purposes: list[dict[str, Any]], source_observer: str) -> list[dict[str, Any]]:
    subject = _identity(agent.subject, "agent subject")
    client_id = _identity(agent.client_id, "agent client_id")
    fhir_user = _identity(agent.fhir_user, "agent fhir_user")
    address = _identity(agent.network_address, "agent network_address")
    token_id = _identity(agent.token_id, "agent token_id")
    roles = _names(agent.roles, "agent roles")
    has_user = subject is not None or fhir_user is not None

    out: list[dict[str, Any]] = []
    if has_user:
        user_type = ("AUT", "author (originator)") if action in _WRITE_ACTIONS else ("IRCP", "information recipient")
        who: dict[str, Any] = {}
        if fhir_user is not None:
            who["reference"] = fhir_user
        if subject is not None:
            who["identifier"] = {"value": subject}
        user: dict[str, Any] = {
            "type": {
                "coding": [
                    _coding(PARTICIPATION_TYPE, *user_type),
                    _coding(BALP_USER_AGENT_TYPES, "UserOauthAgent", "User OAuth Agent participant"),
                ]
            },
            "who": who,
            "requestor": True,
        }
        if roles:
            user["role"] = [{"coding": [_coding(ROLE_SYSTEM, r)], "text": r} for r in roles]
        if subject is not None:
            user["name"] = subject  # BALP: the user id again in .name, which servers can search
        if token_id is not None:
            user["policy"] = [token_id]
        if purposes:
            user["purposeOfUse"] = purposes
        out.append(user)

    client: dict[str, Any] = {
        "type": {
            "coding": [
                _coding(DCM, "110153", "Source Role ID"),
                _coding(DCM, "110150", "Application"),
            ]
        },
        "who": {"identifier": {"value": client_id}} if client_id is not None else {"display": "unidentified client"},
        "requestor": not has_user,
    }
    if address is not None:
        client["network"] = _network(address)
    out.append(client)

    out.append(
        {
            "type": {"coding": [_coding(DCM, "110152", "Destination Role ID")]},
            "who": {"display": source_observer},
            "requestor": False,
            "network": _network(source_observer),
        }
    )
    return out


def _resource_entity(reference: str) -> dict[str, Any]:
    if reference.startswith("Patient/"):
        etype, role = _coding(ENTITY_TYPE, "1", "Person"), _coding(OBJECT_ROLE, "1", "Patient")
    else:
        etype, role = _coding(ENTITY_TYPE, "2", "System Object"), _coding(OBJECT_ROLE, "4", "Domain Resource")
    return {"what": {"reference": reference}, "type": etype, "role": role}


def audit_event(
    *,
    action: str,
    interaction: str,
    status: int,
    request_id: str,
    agent: Agent,
    resources: list[str],
    record_id: str | None = None,
    query: str | None,
    decrypted_groups: list[str],
    masked_groups: list[str],
    purpose_of_use: list[str],
    break_glass: bool,
    integrity_failures: int,
    policy: str,
    source_observer: str,
    recorded: datetime | None = None,
) -> dict[str, Any]:
    """Build the AuditEvent (an R4 JSON dict) for one interaction. Raises ValueError on any input
    that is not an id, a reference, a name or a code - see the module docstring for the codes."""
    if action not in ACTIONS:
        raise ValueError("audit: action must be one of C, R, U, D, E")
    if interaction not in INTERACTIONS:
        raise ValueError("audit: interaction must be a restful-interaction code")
    if not isinstance(status, int) or isinstance(status, bool):
        raise ValueError("audit: status must be an HTTP status code")
    if not isinstance(request_id, str) or not fg.REQUEST_ID.match(request_id):
        raise ValueError("audit: request_id must be a short id")
    if record_id is not None and not fg.ID.match(record_id):
        raise ValueError("audit: record_id must be a FHIR id")
    if not isinstance(integrity_failures, int) or isinstance(integrity_failures, bool) or integrity_failures < 0:
        raise ValueError("audit: integrity_failures must be a count")
    if _identity(policy, "policy") is None or "@" not in policy:
        raise ValueError("audit: policy must be 'name@sha'")
    observer = _identity(source_observer, "source_observer")
    if observer is None:
        raise ValueError("audit: source_observer is required")
    refs: list[str] = []
    for ref in resources:
        if not isinstance(ref, str) or not fg.VERSIONED_REFERENCE.match(ref):
            raise ValueError("audit: resources must be references like 'Patient/123'")
        if ref not in refs:
            refs.append(ref)
    decrypted = sorted(_names(decrypted_groups, "decrypted_groups"))
    masked = sorted(_names(masked_groups, "masked_groups"))
    reasons = _names(purpose_of_use, "purpose_of_use")
    if break_glass:
        reasons += [c for c in ("ETREAT", "BTG") if c not in reasons]
    purposes = [{"coding": [_coding(ACT_REASON, c, _ACT_REASON_DISPLAY.get(c))]} for c in reasons]

    outcome, outcome_desc = _outcome(status)
    subtype = [_coding(RESTFUL_INTERACTION, interaction, interaction)]
    if break_glass:
        subtype.append(_coding(FHIRCRYPT_SUBTYPE, "break-glass", "Break-glass access (high severity)"))

    entities: list[dict[str, Any]] = []
    if query:
        if not isinstance(query, str):
            raise ValueError("audit: query must be the forwarded query string")
        entities.append(
            {
                "type": _coding(ENTITY_TYPE, "2", "System Object"),
                "role": _coding(OBJECT_ROLE, "24", "Query"),
                "query": base64.b64encode(query.encode("utf-8")).decode("ascii"),
            }
        )
    entities.extend(_resource_entity(ref) for ref in refs)
    detail = [{"type": "policy", "valueString": policy}]
    if decrypted:
        detail.append({"type": "decrypted-groups", "valueString": ",".join(decrypted)})
    if masked:
        detail.append({"type": "masked-groups", "valueString": ",".join(masked)})
    detail.append({"type": "integrity-failures", "valueString": str(integrity_failures)})
    if break_glass:
        detail.append({"type": "break-glass", "valueString": "true"})
    entities.append(
        {
            "what": {"identifier": {"value": request_id}},
            "type": _coding(BALP_ENTITY_TYPE, "XrequestId"),
            "detail": detail,
        }
    )

    event: dict[str, Any] = {"resourceType": "AuditEvent"}
    if record_id is not None:  # the proxy's own: a caller chooses X-Request-ID, so that cannot name the record
        event["id"] = record_id
    if break_glass:
        event["extension"] = [{"url": SEVERITY_EXTENSION, "valueCode": "alert"}]
    event.update(
        {
            "type": _coding(AUDIT_EVENT_TYPE, "rest", "Restful Operation"),
            "subtype": subtype,
            "action": action,
            "recorded": _instant(recorded),
            "outcome": outcome,
            "outcomeDesc": outcome_desc,
        }
    )
    if purposes:
        event["purposeOfEvent"] = purposes
    event["agent"] = _agents(action, agent, purposes, observer)
    event["source"] = {
        "observer": {"display": observer},
        "type": [_coding(SOURCE_TYPE, "4", "Application Server")],
    }
    event["entity"] = entities
    return event
