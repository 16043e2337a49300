"""Decide what one stored resource needs, and build its replacement with the proxy's own write path.

A stored resource is in one of these states (``State``):

- ``current``: written under the current policy and a key that may stay; nothing to do.
- ``plaintext``: carries no fhircrypt marker at all (stored before fhircrypt was adopted,
  or written around the proxy): encrypt it.
- ``old-key``: verifies, but an envelope names a key being retired (``--retire``) or, with
  ``to_primary``, any key other than the primary: re-encrypt it under the primary.
- ``old-policy``: verifies, but is not what the current policy would write. Detected by
  comparison, not by a fingerprint stored in the resource (the at-rest format stays as it
  is): decrypting with the current policy must find every covered element as ciphertext
  and leave no ciphertext it does not know, and the blind-index identifiers recomputed
  from the plaintext must equal the stored ones (so index identifiers of format v1 make a
  resource ``old-policy``: ``reencrypt`` moves it to index format v2), and every envelope must be of the
  at-rest format the policy writes (so records of element format v1 are ``old-policy`` under the default
  ``at_rest_format: v2``, and ``reencrypt`` moves them to v2). A resource written under an older policy
  that covered *other* elements does not verify under the current one (its record MAC
  covers other paths), so it can only be told from tampering with that older policy
  (``previous``): when it verifies under it, it is ``old-policy``, otherwise ``failed``.
  The cost is one full decryption and one blind-index computation per resource (tens of
  microseconds), small next to the HTTP round trip.
- ``failed``: does not verify (tampered, unknown key, or an older policy not given). Left
  alone and reported by reason; reasons carry paths, never values.

The replacement is produced by ``encrypt_for_write`` — exactly what the proxy writes,
blind indexes and nested resources included — from the fully decrypted resource.
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass

from proxy.auth.decision import key_holder
from proxy.keymgmt.keyring import Keyring
from proxy.outcome import FhirError
from proxy.policy.compiler import CompiledPolicy
from proxy.transform import jsonnum
from proxy.transform import markers as mk
from proxy.transform.bodies import decrypt_body, encrypt_for_write, nested_resources
from proxy.transform.indexes import index_identifiers
from proxy.transform.records import ReadReport


class State(enum.Enum):
    CURRENT = "current"
    PLAINTEXT = "plaintext"
    OLD_KEY = "old-key"
    OLD_POLICY = "old-policy"
    FAILED = "failed"


@dataclass(frozen=True)
class Plan:
    """What the run is asked to do; the same for every resource."""

    policy: CompiledPolicy
    keyring: Keyring
    retiring: frozenset[str] = frozenset()  # key ids whose resources must move to the primary
    to_primary: bool = False  # move everything that is not under the primary key
    previous: CompiledPolicy | None = None  # the policy older resources were written under


@dataclass
class Assessment:
    state: State
    key_ids: frozenset[str]  # every key id named by an envelope in the resource (nested ones too)
    replacement: dict | None = None  # the body to PUT (None when nothing is to be written)
    reason: str = ""  # why it failed: paths and codes only


_MARKER = mk.CANONICAL.encode()  # envelope, ciphertext, tag and blind-index systems all live under it


def _envelope_fields(resource: dict) -> list[list[str]]:
    """The dot-separated fields of every fhircrypt envelope anywhere in the resource.

    The whole tree is searched, not only the places the policy knows, so a retirement scan
    also sees envelopes of nested resources and of types a later policy dropped.
    """
    found: list[list[str]] = []
    stack: list[object] = [resource]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            if item.get("url") == mk.ENVELOPE_URL and type(item.get("valueString")) is str:
                found.append(item["valueString"].split("."))
            stack.extend(item.values())
        elif type(item) is list:
            stack.extend(item)
    return found


def envelope_key_ids(resource: dict) -> frozenset[str]:
    """Key ids of every fhircrypt envelope anywhere in the resource (the key id is the second field)."""
    return frozenset(parts[1] if len(parts) == 5 else "?" for parts in _envelope_fields(resource))


def _stale_format(stored: dict, policy: CompiledPolicy) -> bool:
    """An envelope of another at-rest format than the one the policy writes (``defaults.at_rest_format``)."""
    return any(parts[0] != policy.at_rest_format for parts in _envelope_fields(stored))


def _has_markers(resource: dict) -> bool:
    return _MARKER in jsonnum.dumps(resource)


def _covered(resource: dict, policy: CompiledPolicy) -> bool:
    """Whether the policy encrypts anything in this resource (itself or a nested resource)."""
    rtype = resource.get("resourceType")
    if rtype in policy.resources:
        return True
    return any(inner.get("resourceType") in policy.resources for inner, _ in nested_resources(resource, ""))


def _index_ids(resource: dict) -> list[tuple[str, str]]:
    ids = resource.get("identifier")
    return sorted(
        (str(i.get("system")), str(i.get("value")))  # a value the server stored as a non-string still sorts
        for i in (ids if type(ids) is list else ())
        if type(i) is dict and str(i.get("system", "")).startswith(mk.INDEX_BASES)
    )


def _decrypted(stored: dict, policy: CompiledPolicy, keyring: Keyring) -> tuple[dict | None, str]:
    """The resource with every covered element decrypted, or None and the reason it does not verify."""
    work = copy.deepcopy(stored)
    report = ReadReport()
    decrypt_body(work, policy, keyring, key_holder(), report)
    if report.failures:
        return None, report.failures[0].split(": ", 1)[-1] if ": " in report.failures[0] else report.failures[0]
    if _has_markers(work):
        return None, "ciphertext the policy does not cover"
    return work, ""


def _seal(plain: dict, plan: Plan) -> tuple[dict | None, str]:
    try:
        encrypt_for_write(plain, plan.policy, plan.keyring, validate="off")
    except FhirError as exc:
        return None, str(exc)
    return plain, ""


def assess(stored: dict, plan: Plan) -> Assessment:
    """Classify a stored resource and, unless it is current or failed, build what to write instead."""
    kids = envelope_key_ids(stored)
    if not _has_markers(stored):
        if not _covered(stored, plan.policy):
            return Assessment(State.CURRENT, kids)
        body, why = _seal(copy.deepcopy(stored), plan)
        return Assessment(State.PLAINTEXT if body else State.FAILED, kids, body, why)
    plain, why = _decrypted(stored, plan.policy, plan.keyring)
    state = State.CURRENT
    if plain is None:
        if plan.previous is None:
            return Assessment(State.FAILED, kids, reason=why)
        plain, _ = _decrypted(stored, plan.previous, plan.keyring)
        if plain is None:
            return Assessment(State.FAILED, kids, reason=why)
        state = State.OLD_POLICY
    elif _stale_indexes(stored, plain, plan) or _stale_format(stored, plan.policy):
        state = State.OLD_POLICY
    if state is State.CURRENT:
        if kids & plan.retiring or (plan.to_primary and kids - {plan.keyring.primary_id}):
            state = State.OLD_KEY
        else:
            return Assessment(State.CURRENT, kids)
    body, why = _seal(plain, plan)
    return Assessment(state if body else State.FAILED, kids, body, why)


def _stale_indexes(stored: dict, plain: dict, plan: Plan) -> bool:
    """The stored blind-index identifiers differ from what the current policy computes from the plaintext."""
    rp = plan.policy.resources.get(stored.get("resourceType"))  # type: ignore[arg-type]
    expected = index_identifiers(plain, rp, plan.keyring.indexer) if rp is not None else []
    return _index_ids(stored) != sorted((i["system"], i["value"]) for i in expected)
