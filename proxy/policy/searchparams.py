"""Read-only access to the R4 search parameter table (``r4_search_params.json``).

The table is derived from the official R4 SearchParameter Bundle by
``scripts/derive_search_params.py`` (see its docstring for the file format). It is loaded
once and used to decide whether a search parameter touches an element that a policy
encrypts: :func:`element_paths` reduces a parameter's FHIRPath expressions to element
paths relative to the resource, to be compared by prefix with the policy's paths.

Only the FHIRPath shapes that R4 uses for search parameters are understood::

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

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

from proxy.policy import definitions as defs

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
def table() -> dict:
    raw = resources.files("proxy.policy").joinpath("r4_search_params.json").read_bytes()
    return json.loads(raw)


def _param(code: str, row: list, resource_type: str) -> SearchParam:
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

_NAME = re.compile(r"\.([a-z][A-Za-z0-9_]*)")
_INDEX = re.compile(r"\[\d+\]")
_TYPE_CALL = re.compile(r"\.(?:as|ofType)\(\s*([A-Za-z]+)\s*\)")
_WHERE = re.compile(r"\.where\(")
_INFIX_AS = re.compile(r"\s+as\s+([A-Za-z]+)\s*$")
_ROOT = re.compile(r"[A-Z][A-Za-z]*")
_RELATIVE_ROOT = re.compile(r"[a-z][A-Za-z0-9_]*")
_EQUALS = re.compile(r"\s*([a-z][A-Za-z0-9_]*)\s*=\s*'([^'\\]*)'\s*")
_RESOLVE_IS = re.compile(r"\s*resolve\(\)\s+is\s+([A-Z][A-Za-z]*)\s*")


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


def _close(text: str, pos: int) -> int:
    """Index of the ``)`` matching the ``(`` just before ``pos``."""
    depth = 1
    quoted = False
    for i in range(pos, len(text)):
        ch = text[i]
        if quoted:
            quoted = ch != "'"
        elif ch == "'":
            quoted = True
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return i
    raise _Unknown


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

    def where(self, inner: str) -> None:
        if not self.path:
            raise _Unknown
        prefix = ".".join(self.path)
        m = _RESOLVE_IS.fullmatch(inner)
        if m:
            self.criteria.append((f"{prefix}.resolve()", m.group(1)))
            return
        for part in re.split(r"\band\b", inner):
            m = _EQUALS.fullmatch(part)
            if not m:
                raise _Unknown
            self.criteria.append((f"{prefix}.{m.group(1)}", m.group(2)))

    def steps(self, text: str) -> None:
        """Consume ``.name``, ``[n]``, ``.where(..)``, ``.as(T)``/``.ofType(T)`` up to the end."""
        pos = 0
        while pos < len(text):
            if m := _TYPE_CALL.match(text, pos):
                self.select(m.group(1))
            elif m := _WHERE.match(text, pos):
                end = _close(text, m.end())
                self.where(text[m.end() : end])
                pos = end + 1
                continue
            elif m := _NAME.match(text, pos):
                self.path.append(m.group(1))
            elif m := _INDEX.match(text, pos):
                pass
            else:
                raise _Unknown
            if m.end() < len(text) and text[m.end()] == "(":  # any other function call
                raise _Unknown
            pos = m.end()

    def result(self) -> ParamPath:
        return ParamPath(tuple(self.path), tuple(self.criteria), self.choice_type, self.choice_step)


def _parse(text: str, start: ParamPath, relative: bool) -> ParamPath:
    """Parse one union alternative: rooted at the resource type, or ``relative`` to ``start``."""
    text = text.strip()
    if text.startswith("("):
        end = _close(text, 1)
        builder = _Builder(_parse(text[1:end], start, relative))
        builder.steps(text[end + 1 :].rstrip())
        return builder.result()
    if m := _INFIX_AS.search(text):
        builder = _Builder(_parse(text[: m.start()], start, relative))
        builder.select(m.group(1))
        return builder.result()
    if relative and text.startswith("%resource."):  # composite component read from the resource root
        builder = _Builder(ParamPath(()))
        builder.steps(text[len("%resource") :])
        return builder.result()
    builder = _Builder(start)
    root = (_RELATIVE_ROOT if relative else _ROOT).match(text)
    if root is None:
        raise _Unknown
    if relative:
        builder.path.append(root.group(0))
    builder.steps(text[root.end() :])
    return builder.result()


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
    except _Unknown:
        return None
    return list(dict.fromkeys(out))
