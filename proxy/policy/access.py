"""Access rules: which element groups a caller may decrypt.

The ``access`` section of a policy maps token claims to groups::

    access:
      roles_claim: realm_access.roles       # where roles are in the token (Keycloak)
      smart_scopes: required                 # or: ignore (roles alone decide)
      rules:
        - name: physician
          when: {role: physician}            # conditions are ANDed; a list means any of
          groups: [identity, demographics, clinical]
          write: [clinical]                  # what it may set (default: what it may read)
        - name: patient-app
          when: {context: patient}           # a SMART patient/ read scope
          groups: [demographics, clinical]
      break_glass:
        when: {role: emergency-physician}
        groups: [identity, demographics, clinical]
        reason_header: X-Break-Glass-Reason  # required on each break-glass request

Each SMART scope applies with its own context (SMART App Launch v2): a rule's groups
apply through the contexts of the caller's read scopes the rule matches (a rule with a
``context`` condition only through those contexts, any other rule through all of them).
Groups that apply through a ``patient/`` scope are decrypted only inside the launch
patient's compartment, so a ``patient/`` scope never widens what a ``user/`` rule grants
elsewhere, and a resource type readable only through ``patient/`` scopes is confined to
the compartment. :mod:`proxy.auth.decision` turns these grants into the one decision per
request that every route obeys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.auth.caller import Caller
from proxy.policy.loader import Node, NodeList, PolicyError

CONDITIONS = ("role", "client_id", "fhir_user_type", "purpose", "context")
CONTEXTS = ("patient", "user", "system")


@dataclass(frozen=True)
class Rule:
    name: str
    when: tuple[tuple[str, frozenset[str]], ...]
    groups: frozenset[str]  # decrypted for the caller
    write: frozenset[str]  # the caller may set (default: the groups it can read)

    def matches(self, caller: Caller) -> bool:
        return bool(self.contexts(caller, frozenset(CONTEXTS)))

    def contexts(self, caller: Caller, available: frozenset[str]) -> frozenset[str]:
        """The scope contexts (of ``available``) through which this rule's groups apply to the
        caller; empty when the rule does not match. A ``context`` condition narrows them."""
        for kind, wanted in self.when:
            if kind == "role":
                ok = bool(caller.roles & wanted)
            elif kind == "client_id":
                ok = caller.client_id in wanted
            elif kind == "fhir_user_type":
                ok = caller.fhir_user_type in wanted
            elif kind == "purpose":
                ok = bool(set(caller.purpose_of_use) & wanted)
            else:  # context: only through the caller's read scopes of these contexts
                available = available & wanted & frozenset(s.context for s in caller.scopes if s.read)
                ok = bool(available)
            if not ok:
                return frozenset()
        return available


@dataclass(frozen=True)
class AccessPolicy:
    roles_claim: str
    smart_scopes: str  # required | ignore
    rules: tuple[Rule, ...]
    break_glass: Rule | None
    reason_header: str

    def grants(self, caller: Caller) -> CallerGrants:
        everywhere = frozenset(CONTEXTS)
        glass = bool(self.break_glass and caller.break_glass_reason and self.break_glass.matches(caller))
        applying = [(r, r.contexts(caller, everywhere)) for r in self.rules]
        if glass:
            applying.append((self.break_glass, everywhere))  # type: ignore[arg-type]
        applying = [(r, c) for r, c in applying if c]
        by_context = tuple(
            (
                ctx,
                frozenset().union(*(r.groups for r, c in applying if ctx in c)),
                frozenset().union(*(r.write for r, c in applying if ctx in c)),
            )
            for ctx in CONTEXTS
        )
        return CallerGrants(
            caller,
            frozenset().union(*(r.groups for r, _ in applying)),
            tuple(r.name for r, _ in applying if r is not self.break_glass),
            glass,
            self.smart_scopes == "required",
            frozenset().union(*(r.write for r, _ in applying)),
            by_context,
        )


@dataclass(frozen=True)
class CallerGrants:
    """What one caller may decrypt and write, resource by resource.

    ``groups`` and ``write_groups`` are the unions over every context (audit, and callers whose
    scopes are not checked); with SMART scopes required, what applies to one resource comes from
    the contexts of the caller's scopes that cover its type (:meth:`for_resource`).
    """

    caller: Caller
    groups: frozenset[str]
    rules: tuple[str, ...]
    break_glass: bool
    scopes_required: bool
    write_groups: frozenset[str] = frozenset()
    by_context: tuple[tuple[str, frozenset[str], frozenset[str]], ...] = ()  # (context, read, write groups)

    def contexts(self, resource_type: str, access: str) -> frozenset[str]:
        """Contexts of the caller's scopes allowing ``access`` (read, write, delete) on the type."""
        return frozenset(s.context for s in self.caller.scopes if getattr(s, access) and s.covers(resource_type))

    def context_groups(self, contexts: frozenset[str] | set[str], write: bool = False) -> frozenset[str]:
        """The groups that apply through any of ``contexts``."""
        return frozenset().union(*(w if write else g for c, g, w in self.by_context if c in contexts))

    def for_resource(self, resource: dict[str, Any]) -> frozenset[str]:
        """The groups decrypted in ``resource``: ``patient/`` grants only inside the own compartment."""
        return self._groups_in(resource, "read")

    def write_groups_for(self, resource: dict[str, Any]) -> frozenset[str]:
        """The groups the caller may write in ``resource``, by the same contexts as :meth:`for_resource`."""
        return self._groups_in(resource, "write")

    def _groups_in(self, resource: dict[str, Any], access: str) -> frozenset[str]:
        write = access == "write"
        if not self.scopes_required:
            return self.write_groups if write else self.groups
        rtype = resource.get("resourceType")
        if not isinstance(rtype, str):
            return frozenset()
        contexts = set(self.contexts(rtype, access))
        if "patient" in contexts and not self.in_own_compartment(resource):
            contexts.discard("patient")
        return self.context_groups(contexts, write)

    def has_scope(self, resource_type: str, access: str) -> bool:
        """A SMART scope allowing ``access`` (read, write, delete) on the type, in any context."""
        return not self.scopes_required or bool(self.contexts(resource_type, access))

    def reads_in_context(self, context: str) -> bool:
        """Whether any of the caller's scopes allows reading some type through ``context``."""
        return any(s.read and s.context == context for s in self.caller.scopes)

    def patient_only(self, resource_type: str, access: str) -> bool:
        """Every scope allowing ``access`` on the type is a patient/ scope: the compartment limits it."""
        return self.scopes_required and self.contexts(resource_type, access) == {"patient"}

    def in_own_compartment(self, resource: dict[str, Any]) -> bool:
        from proxy.policy.compartment import in_compartment

        return bool(self.caller.patient) and in_compartment(resource, self.caller.patient)  # type: ignore[arg-type]


def _names(value: object, source: str, node: Node, key: str) -> frozenset[str]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(i, str) and i for i in items):
        raise PolicyError(source, node.key_lines.get(key, node.line), key, "must be a name or a list of names")
    return frozenset(items)


def _rule(raw: object, source: str, where: str, groups: dict[str, str], name_required: bool) -> Rule:
    if not isinstance(raw, Node):
        raise PolicyError(source, None, where, "must be a mapping with when and groups")
    allowed = {"name", "when", "groups", "write"} if name_required else {"when", "groups", "write", "reason_header"}
    for key in raw:
        if key not in allowed:
            raise PolicyError(source, raw.key_lines.get(key), f"{where}.{key}", "unknown field")
    if name_required and not isinstance(raw.get("name"), str):
        raise PolicyError(source, raw.line, f"{where}.name", "required field missing")
    when = raw.get("when")
    if not isinstance(when, Node) or not when:
        raise PolicyError(
            source,
            raw.key_lines.get("when", raw.line),
            f"{where}.when",
            f"needs at least one condition ({', '.join(CONDITIONS)})",
        )
    conditions = []
    for kind, value in when.items():
        if kind not in CONDITIONS:
            raise PolicyError(
                source,
                when.key_lines.get(kind),
                f"{where}.when.{kind}",
                f"unknown condition (allowed: {', '.join(CONDITIONS)})",
            )
        names = _names(value, source, when, kind)
        if kind == "context" and not names <= set(CONTEXTS):
            raise PolicyError(
                source, when.key_lines.get(kind), f"{where}.when.context", f"must be {', '.join(CONTEXTS)}"
            )
        conditions.append((kind, names))
    group_names = raw.get("groups")
    if not isinstance(group_names, NodeList) or not group_names:
        raise PolicyError(source, raw.key_lines.get("groups", raw.line), f"{where}.groups", "must list groups")
    for g in group_names:
        if g not in groups:
            raise PolicyError(source, group_names.line, f"{where}.groups", f"unknown group '{g}'")
    write_names = raw.get("write", group_names)
    if not isinstance(write_names, list) or any(g not in groups for g in write_names):
        raise PolicyError(source, raw.key_lines.get("write", raw.line), f"{where}.write", "must list known groups")
    return Rule(str(raw.get("name", "break-glass")), tuple(conditions), frozenset(group_names), frozenset(write_names))


def compile_access(raw: object, source: str, groups: dict[str, str]) -> AccessPolicy | None:
    if raw is None:
        return None
    if not isinstance(raw, Node):
        raise PolicyError(source, None, "access", "must be a mapping")
    for key in raw:
        if key not in ("roles_claim", "smart_scopes", "rules", "break_glass"):
            raise PolicyError(source, raw.key_lines.get(key), f"access.{key}", "unknown field")
    scopes = raw.get("smart_scopes", "required")
    if scopes not in ("required", "ignore"):
        raise PolicyError(
            source, raw.key_lines.get("smart_scopes"), "access.smart_scopes", "must be required or ignore"
        )
    rules_raw = raw.get("rules")
    if not isinstance(rules_raw, NodeList):
        raise PolicyError(source, raw.key_lines.get("rules", raw.line), "access.rules", "must be a list")
    rules = tuple(_rule(r, source, f"access.rules[{i}]", groups, True) for i, r in enumerate(rules_raw))
    glass_raw = raw.get("break_glass")
    glass = _rule(glass_raw, source, "access.break_glass", groups, False) if glass_raw is not None else None
    header = (glass_raw or {}).get("reason_header", "X-Break-Glass-Reason") if glass_raw else "X-Break-Glass-Reason"
    return AccessPolicy(str(raw.get("roles_claim", "roles")), scopes, rules, glass, str(header))
