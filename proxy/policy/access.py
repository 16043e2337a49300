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

Groups are further limited by the SMART scopes: a resource type's groups are
decrypted only for callers with a read scope covering that type, and when every such
scope is a ``patient/`` scope, only for resources in the launch patient's compartment.
The proxy does not replace the upstream's access control; it decides what is
decrypted.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        for kind, wanted in self.when:
            if kind == "role":
                ok = bool(caller.roles & wanted)
            elif kind == "client_id":
                ok = caller.client_id in wanted
            elif kind == "fhir_user_type":
                ok = caller.fhir_user_type in wanted
            elif kind == "purpose":
                ok = bool(set(caller.purpose_of_use) & wanted)
            else:  # context
                ok = any(s.read and s.context in wanted for s in caller.scopes)
            if not ok:
                return False
        return True


@dataclass(frozen=True)
class AccessPolicy:
    roles_claim: str
    smart_scopes: str  # required | ignore
    rules: tuple[Rule, ...]
    break_glass: Rule | None
    reason_header: str

    def grants(self, caller: Caller) -> CallerGrants:
        matched = [r for r in self.rules if r.matches(caller)]
        groups = frozenset().union(*(r.groups for r in matched))
        write = frozenset().union(*(r.write for r in matched))
        glass = bool(self.break_glass and caller.break_glass_reason and self.break_glass.matches(caller))
        if glass:
            groups |= self.break_glass.groups  # type: ignore[union-attr]
            write |= self.break_glass.write  # type: ignore[union-attr]
        return CallerGrants(
            caller, groups, tuple(r.name for r in matched), glass, self.smart_scopes == "required", write
        )


@dataclass(frozen=True)
class CallerGrants:
    """The groups one caller may decrypt, resource by resource."""

    caller: Caller
    groups: frozenset[str]
    rules: tuple[str, ...]
    break_glass: bool
    scopes_required: bool
    write_groups: frozenset[str] = frozenset()

    def for_resource(self, resource: dict) -> frozenset[str]:
        if not self.groups:
            return self.groups
        return self.groups if self._scoped(resource, "read") else frozenset()

    def has_scope(self, resource_type: str, access: str) -> bool:
        """A SMART scope allowing ``access`` (read, write, delete) on the type, in any context."""
        return not self.scopes_required or any(
            getattr(s, access) and s.covers(resource_type) for s in self.caller.scopes
        )

    def patient_only(self, resource_type: str, access: str) -> bool:
        """Every scope allowing ``access`` on the type is a patient/ scope: the compartment limits it."""
        contexts = {s.context for s in self.caller.scopes if getattr(s, access) and s.covers(resource_type)}
        return self.scopes_required and contexts == {"patient"}

    def in_own_compartment(self, resource: dict) -> bool:
        from proxy.policy.compartment import in_compartment

        return bool(self.caller.patient) and in_compartment(resource, self.caller.patient)  # type: ignore[arg-type]

    def _scoped(self, resource: dict, access: str) -> bool:
        rtype = resource.get("resourceType")
        if not isinstance(rtype, str) or not self.has_scope(rtype, access):
            return False
        return not self.patient_only(rtype, access) or self.in_own_compartment(resource)


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
