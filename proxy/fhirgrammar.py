"""The FHIR R4 lexical grammar the proxy checks against, written once.

Ids, resource types, references, operation and parameter names, dates and the proxy's own
codes are refused or recognised in many places (the URL classifier, the compartment, the
guard, the audit trail, the policy compiler). Each of them must agree: a reference the
compartment accepts but the audit builder refuses would lose an audit entry, an id shape the
guard allows but the classifier does not would be a hole between them. So the patterns live
here and nowhere else. Pure: only ``re``, importable from the core and the shells alike.

The ``*_RE`` strings are unanchored fragments for composing larger patterns; the compiled
names are anchored at both ends (``\\Z``, not ``$``, which would let a trailing newline through)
and meant for ``match``.
"""

from __future__ import annotations

import re

# --------------------------------------------------------------------------- fragments

ID_RE = r"[A-Za-z0-9\-.]{1,64}"
"""A logical or version id (R4 datatypes, ``id``): letters, digits, '-' and '.', at most 64."""

TYPE_RE = r"[A-Z][A-Za-z]{1,63}"
"""The shape of a resource type name (whether the type exists is for ``definitions.resource_types``)."""

HISTORY_RE = rf"(?:/_history/{ID_RE})?"
"""An optional version suffix of a reference or a Location."""

BASE_RE = r"(?:[A-Za-z][A-Za-z0-9+.\-]*://[^?#]*/)?"
"""An optional absolute service base in front of ``Type/id`` (any scheme, no query or fragment)."""

NAME_RE = r"[A-Za-z][A-Za-z0-9\-_.]{0,63}"
"""An operation or operation-parameter name (without ``$``)."""

SEARCH_PARAM_RE = r"[a-z][A-Za-z0-9\-_.]{0,63}"
"""A search parameter code as ``_include`` names it."""

DATE_RE = r"\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?"
"""A FHIR date, partial date or dateTime (year, month, day, time, zone: each optional after the last)."""

SEARCH_PREFIX_RE = r"(eq|ne|gt|lt|ge|le|sa|eb|ap)?"
"""The comparison prefix of an ordered search value."""

CODE_RE = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}"
"""A short machine code the proxy keeps in audit records and tombstones: roles, purposes, reasons,
operators. Never free text, so never a place for a value from a record."""

REQUEST_ID_RE = r"[A-Za-z0-9._\-]{1,64}"
"""A caller's X-Request-Id the proxy passes on and audits (anything else is replaced)."""

# --------------------------------------------------------------------------- anchored patterns

ID = re.compile(rf"^(?:{ID_RE})\Z")
TYPE = re.compile(rf"^(?:{TYPE_RE})\Z")
OPERATION = re.compile(rf"^(?:\${NAME_RE})\Z")
NAME = re.compile(rf"^(?:{NAME_RE})\Z")
PARAMETER = re.compile(rf"^(?:_?{NAME_RE})\Z")
REFERENCE = re.compile(rf"^(?:{TYPE_RE}/{ID_RE})\Z")
VERSIONED_REFERENCE = re.compile(rf"^(?:{TYPE_RE}/{ID_RE}{HISTORY_RE})\Z")
DATE = re.compile(rf"^(?:{DATE_RE})\Z")
CODE = re.compile(rf"^(?:{CODE_RE})\Z")
REQUEST_ID = re.compile(rf"^(?:{REQUEST_ID_RE})\Z")
