"""Read-only access to the R4 search parameter table (``r4_search_params.json``).

The table is derived from the official R4 SearchParameter Bundle by
``scripts/derive_search_params.py`` (see its docstring for the file format). It is loaded
once and used to decide whether a search parameter touches an element that a policy
encrypts: :func:`element_paths` reduces a parameter's FHIRPath expressions to element
paths relative to the resource, to be compared by prefix with the policy's paths.

Only the FHIRPath shapes that R4 uses for search parameters are understood (the paths by
:mod:`proxy.policy.paths`, the one parser that also reads policy paths; the unions,
parentheses and infix ``as`` around them here)::

    Patient.name                              dotted navigation
    Bundle.entry[0].resource                  indexers (dropped: the path covers every item)
    Patient.telecom.where(system='phone')     equality filters, criterion ("telecom.system", "phone")
    Condition.subject.where(resolve() is Patient)   criterion ("subject.resolve()", "Patient")
    Condition.onset.as(Age)                   choice type (also .ofType(Age))
    (Observation.value as Quantity)           infix ``as`` in parentheses, optionally followed
    (Observation.value as CodeableConcept).text   by further navigation
    %resource.referenceSeq.chromosome         composite component read from the resource root

Anything else (``Patient.deceased.exists() and Patient.deceased != false``, parameters
without an expression such as ``_text``, ``_content``, ``_query``, ``_has``) yields
``None``: unknown, treat the parameter as touching every element.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

from proxy.policy import definitions as defs
from proxy.policy.paths import RESOLVE, SEARCH, Child, OfType, PathSyntaxError, Step, closing_paren, parse_path

TYPES = ("number", "date", "string", "token", "reference", "composite", "quantity", "uri", "special")


@dataclass(frozen=True)
class SearchParam:
    code: str
    type: str  # one of TYPES
    expressions: tuple[str, ...]  # FHIRPath alternatives rooted at the resource type; () if none
    targets: tuple[str, ...] = ()  # reference parameters: the resource types they may point to
    components: tuple[tuple[str, str], ...] = ()  # composite: (component parameter code, relative expression)


@dataclass(frozen=True)
class ParamPath:
    """One element a search parameter reads, relative to the resource.

    ``path`` holds element names (choice elements by their base name, ``value``). The
    ``criteria`` are ``(key, literal)`` pairs that narrow the items matched: ``key`` is the
    dotted path (from the resource) of the field compared, e.g. ``("telecom.system", "phone")``,
    or of the reference followed by ``.resolve()`` for a target type condition, e.g.
    ``("subject.resolve()", "Patient")``. ``choice_type`` is the type selected for the choice
    element ``path[choice_step]`` (``value`` as ``Quantity``), None when no type is selected.
    """

    path: tuple[str, ...]
    criteria: tuple[tuple[str, str], ...] = ()
    choice_type: str | None = None
    choice_step: int | None = None

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def json_path(self) -> tuple[str, ...]:
        """The path with the selected choice type spelt as in JSON (``valueQuantity``)."""
        if self.choice_type is None or self.choice_step is None:
            return self.path
        path = list(self.path)
        path[self.choice_step] = defs.choice_json_name(path[self.choice_step], self.choice_type)
        return tuple(path)


@cache
def table() -> dict[str, Any]:
    return defs.packaged_table("r4_search_params.json")


def _param(code: str, row: list[Any], resource_type: str) -> SearchParam:
    expressions = tuple(re.sub(r"^(\(*)Resource\b", rf"\g<1>{resource_type}", e) for e in row[1])
    targets = row[2] if len(row) > 2 else ()
    if targets == "*":
        targets = table()["anyTargets"]
    components = tuple((c, e) for c, e in row[3]) if len(row) > 3 else ()
    return SearchParam(code, row[0], expressions, tuple(targets), components)


@cache
def _params(resource_type: str) -> dict[str, SearchParam]:
    t = table()
    base = t["resources"][resource_type]
    rows = dict(t["common"]["Resource"])
    if base == "DomainResource":
        rows.update(t["common"]["DomainResource"])
    rows.update(t["params"][resource_type])
    return {code: _param(code, row, resource_type) for code, row in sorted(rows.items())}


def search_params(resource_type: str) -> dict[str, SearchParam]:
    """Every R4 search parameter of ``resource_type`` (common ones included), by code."""
    if resource_type not in table()["resources"]:  # checked first: the cache only holds real types
        return {}
    return dict(_params(resource_type))


def search_param(resource_type: str, code: str) -> SearchParam | None:
    if resource_type not in table()["resources"]:
        return None
    return _params(resource_type).get(code)


# ---------------------------------------------------------------- expressions

_ROOT = re.compile(r"[A-Z][A-Za-z]*")
_ELEMENT = re.compile(r"[a-z][A-Za-z0-9_]*")
_CRITERION_KEY = re.compile(rf"[a-z][A-Za-z0-9_]*|{re.escape(RESOLVE)}")
_INFIX_AS = re.compile(r"\s+as\s+([A-Za-z]+)\s*$")


class _Unknown(Exception):
    pass


def split_union(expression: str) -> list[str]:
    """Split a FHIRPath expression on its top-level ``|`` (outside parentheses and strings)."""
    parts: list[str] = []
    depth = 0
    quoted = False
    start = 0
    for i, ch in enumerate(expression):
        if quoted:
            quoted = ch != "'"
        elif ch == "'":
            quoted = True
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "|" and depth == 0:
            parts.append(expression[start:i].strip())
            start = i + 1
    parts.append(expression[start:].strip())
    return [p for p in parts if p]


def _choice_type(name: str) -> str:
    """The FHIR spelling of a type named in ``as``/``ofType`` (R4 writes ``DateTime`` once)."""
    if defs.is_primitive(name) or name in defs.table()["types"]:
        return name
    lowered = name[0].lower() + name[1:]
    if defs.is_primitive(lowered):
        return lowered
    raise _Unknown


class _Builder:
    def __init__(self, start: ParamPath) -> None:
        self.path = list(start.path)
        self.criteria = list(start.criteria)
        self.choice_type = start.choice_type
        self.choice_step = start.choice_step

    def select(self, type_name: str) -> None:
        if not self.path or self.choice_type is not None:
            raise _Unknown
        self.choice_type = _choice_type(type_name)
        self.choice_step = len(self.path) - 1

    def apply(self, steps: list[Step]) -> ParamPath:
        """Follow parsed steps: element names (lower case: anything else is no element), type
        selections and ``where`` criteria keyed by the dotted path of the field they compare."""
        for step in steps:
            if isinstance(step, Child):
                if not _ELEMENT.fullmatch(step.name):
                    raise _Unknown
                self.path.append(step.name)
            elif isinstance(step, OfType):
                self.select(step.type)
            else:
                if not self.path or not all(_CRITERION_KEY.fullmatch(key) for key, _ in step.criteria):
                    raise _Unknown
                prefix = ".".join(self.path)
                self.criteria.extend((f"{prefix}.{key}", value) for key, value in step.criteria)
        return ParamPath(tuple(self.path), tuple(self.criteria), self.choice_type, self.choice_step)


def _parse(text: str, start: ParamPath, relative: bool) -> ParamPath:
    """Parse one union alternative: rooted at the resource type, or ``relative`` to ``start``."""
    text = text.strip()
    if text.startswith("("):
        end = closing_paren(text, 1)
        inner = _parse(text[1:end], start, relative)
        return _Builder(inner).apply(parse_path(text[end + 1 :].rstrip(), SEARCH, continued=True))
    if m := _INFIX_AS.search(text):
        builder = _Builder(_parse(text[: m.start()], start, relative))
        builder.select(m.group(1))
        return builder.apply([])
    if relative and text.startswith("%resource."):  # composite component read from the resource root
        return _Builder(ParamPath(())).apply(parse_path(text[len("%resource") :], SEARCH, continued=True))
    steps = parse_path(text, SEARCH)
    root = steps[0]
    if not isinstance(root, Child) or not (_ELEMENT if relative else _ROOT).fullmatch(root.name):
        raise _Unknown
    return _Builder(start).apply(steps if relative else steps[1:])


def _parse_alternatives(expression: str, start: ParamPath, relative: bool) -> list[ParamPath]:
    parts = split_union(expression)
    if not parts:
        raise _Unknown
    return [_parse(part, start, relative) for part in parts]


def element_paths(param: SearchParam) -> list[ParamPath] | None:
    """The elements ``param`` reads, relative to the resource; None when unknown.

    A composite parameter reads its components' elements, relative to each of its
    expressions (``Observation.component`` + ``code`` -> ``component.code``). None means the
    expressions could not be reduced to paths: treat the parameter as touching everything.
    """
    out: list[ParamPath] = []
    try:
        if not param.expressions:
            raise _Unknown
        for expression in param.expressions:
            for base in _parse_alternatives(expression, ParamPath(()), relative=False):
                if param.type != "composite" or not param.components:
                    out.append(base)
                    continue
                start = ParamPath(base.path, base.criteria) if base.choice_type is None else None
                if start is None:
                    raise _Unknown
                for _code, component in param.components:
                    for path in _parse_alternatives(component, start, relative=True):
                        out.append(path)
    except (_Unknown, PathSyntaxError):
        return None
    return list(dict.fromkeys(out))
