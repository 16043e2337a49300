"""SMART App Launch scopes (v2 ``patient/Observation.rs`` and v1 ``user/*.read``).

Only what decryption needs is kept: which resource types a scope lets the caller read,
and in which context (patient, user, system). A scope that does not parse grants
nothing - it is dropped, never guessed at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy import fhirgrammar as fg

_V2 = re.compile(rf"^(patient|user|system)/(\*|{fg.TYPE_RE})\.(c?r?u?d?s?)(\?.*)?$")
_V1 = re.compile(rf"^(patient|user|system)/(\*|{fg.TYPE_RE})\.(read|write|\*)$")


@dataclass(frozen=True)
class Scope:
    context: str  # patient | user | system
    resource_type: str  # a type or "*"
    read: bool  # v2 r or s, v1 read or *
    write: bool = False  # v2 c or u, v1 write or *
    delete: bool = False  # v2 d, v1 write or *
    create: bool = False  # v2 c, v1 write or *
    update: bool = False  # v2 u, v1 write or *

    def covers(self, resource_type: str) -> bool:
        return self.resource_type in ("*", resource_type)


def parse_scope(text: str) -> Scope | None:
    m = _V2.match(text)
    if m and m.group(3):
        if m.group(4):  # v2 query-restricted scopes (?category=...) cannot be checked here: grant nothing
            return None
        ops = m.group(3)
        return Scope(
            m.group(1),
            m.group(2),
            "r" in ops or "s" in ops,
            "c" in ops or "u" in ops,
            "d" in ops,
            "c" in ops,
            "u" in ops,
        )
    m = _V1.match(text)
    if m:
        writes = m.group(3) in ("write", "*")
        return Scope(m.group(1), m.group(2), m.group(3) in ("read", "*"), writes, writes, writes, writes)
    return None


def parse_scopes(value: object) -> tuple[Scope, ...]:
    """The ``scope`` claim: a space-separated string (RFC 8693) or a list (some providers)."""
    items = value.split() if isinstance(value, str) else value if isinstance(value, list) else []
    return tuple(s for s in (parse_scope(i) for i in items if isinstance(i, str)) if s is not None)
