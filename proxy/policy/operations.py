"""The policy's ``operations`` block: which FHIR operations may carry what through the proxy.

Operation parameters are free-form: ``$match`` carries a whole Patient, ``$lastn`` a
code, a custom ``$report`` anything. The proxy cannot know which of them hold covered
values, so by default an operation may use only paging/control parameters and
``start``/``end``, and a body only when it carries no resource of an encrypted type and
no other parameter. The policy widens this per operation::

    operations:
      lastn: {parameters: [max, category]}       # forwarded as they are: they never hold covered values
      process-message: {body: encrypt}            # resources in the body encrypted like a create
      validate: {body: encrypt, parameters: [mode, profile]}
      my-export: {refuse: true}                   # never through the proxy
      my-report: {read_only: true}                # changes nothing: a read scope is enough

An operation that may change stored data (anything but the R4 operations defined with
``affectsState: false`` and those marked ``read_only``) needs an update scope on its type
(:func:`proxy.auth.decision.decide`).

``$graphql`` and ``$export`` cannot be configured here: GraphQL queries can reach any
element, and Bulk export has its own handling.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy import fhirgrammar as fg
from proxy.policy.loader import Node, PolicyError

_FIXED = frozenset({"graphql", "export"})
BODY_MODES = ("uncovered", "encrypt")


@dataclass(frozen=True)
class OperationRule:
    name: str
    parameters: frozenset[str] = frozenset()  # parameter names that never carry covered values
    body: str = "uncovered"  # "uncovered": no resource of an encrypted type; "encrypt": encrypt them
    refuse: bool = False
    read_only: bool = False  # changes nothing at the server: a read scope is enough (else an update scope)


def compile_operations(spec: object, source: str) -> dict[str, OperationRule]:
    if spec is None:
        return {}
    if not isinstance(spec, Node):
        raise PolicyError(source, None, "operations", "must be a mapping of operation name to settings")
    rules = {}
    for name, settings in spec.items():
        where = f"operations.{name}"
        line = spec.key_lines.get(name)
        if not fg.NAME.match(name.lstrip("$")) or name.lstrip("$") in _FIXED:
            raise PolicyError(source, line, where, "not a configurable operation name (write it without '$')")
        if not isinstance(settings, Node) or not set(settings) <= {"parameters", "body", "refuse", "read_only"}:
            raise PolicyError(source, line, where, "must be a mapping with parameters, body, refuse and/or read_only")
        params = settings.get("parameters", [])
        if not isinstance(params, list) or not all(isinstance(p, str) and fg.PARAMETER.match(p) for p in params):
            raise PolicyError(source, line, f"{where}.parameters", "must be a list of parameter names")
        body = settings.get("body", "uncovered")
        if body not in BODY_MODES:
            raise PolicyError(source, line, f"{where}.body", f"must be one of {', '.join(BODY_MODES)}")
        refuse, read_only = settings.get("refuse", False), settings.get("read_only", False)
        for key, value in (("refuse", refuse), ("read_only", read_only)):
            if not isinstance(value, bool):
                raise PolicyError(source, line, f"{where}.{key}", "must be true or false")
        op = name.lstrip("$")
        rules[op] = OperationRule(op, frozenset(params), body, refuse, read_only)
    return rules


def read_only(rules: dict[str, OperationRule]) -> frozenset[str]:
    """The operations the policy declares free of side effects."""
    return frozenset(name for name, rule in rules.items() if rule.read_only)
