"""Hypothesis strategies for FHIR R4 resources, derived from a compiled policy and the R4 element table.

Two generators, for two purposes:

* :func:`covered_resource` builds a resource of ANY type a policy covers and fills every
  element the compiled policy names (navigation hops, ``where()`` criteria, choices,
  ``extension('url')``, narratives, every ``Reference.display``) with a value of the
  element's R4 datatype, drawn from the element table the compiler itself uses. It also
  adds primitive extensions (``_birthDate``), repeating elements with ``null`` slots,
  resource extensions and contained resources. The result is not always valid FHIR
  (invariants, value sets), which is fine for the pure core: its round trip must be
  exact for any JSON shape the policy reaches.
* :func:`mutated_fixture` keeps a shipped, strictly valid fixture and replaces the
  string and date leaves of its covered elements with generated ones, so the real
  upstream accepts it and the proxy path can be exercised end to end.

Every generated string carries a needle (``nx`` + 12 random letters and digits), so
"no covered value at rest" is a substring check that cannot pass by accident.
"""

from __future__ import annotations

import copy
import html
import re
import unicodedata
from dataclasses import dataclass

import orjson
from hypothesis import strategies as st

from proxy.policy import definitions as defs
from proxy.policy.compiler import CompiledElement, Kind, ResourcePolicy

NEEDLE_PREFIX = "nx"
needle = st.from_regex(r"nx[a-z0-9]{12}", fullmatch=True)

# Letters, marks, digits, punctuation, symbols and spaces from the whole Unicode range,
# composed (NFC) or decomposed (NFD): both must come back byte for byte.
_TEXT_ALPHABET = st.characters(categories=("L", "M", "N", "P", "S", "Zs"), exclude_characters="\x00")
_NAMES = st.sampled_from(
    ["Siti Aminah", "Ñuñez", "Dvořák", "Nguyễn Thị Minh Khai", "Ṣọlá", "Zoë", "Ağaoğlu", "محمد", "王小明", "Łukasz"]
)
unicode_text = st.one_of(_NAMES, st.text(_TEXT_ALPHABET, min_size=1, max_size=24)).flatmap(
    lambda s: st.sampled_from([unicodedata.normalize("NFC", s), unicodedata.normalize("NFD", s)])
)


@st.composite
def marked_text(draw) -> str:
    """A FHIR string: arbitrary Unicode (NFC or NFD) around a needle, no leading/trailing space."""
    text = draw(unicode_text).strip() or "x"
    return f"{text} {draw(needle)}" if draw(st.booleans()) else f"{draw(needle)} {text}"


# Dates at the edges of what R4 allows: year 0001 and 9999, leap days, partial dates, offsets.
extreme_date = st.sampled_from(["0001-01-01", "9999-12-31", "2024-02-29", "1900-02-28", "2000", "1970-01"])
extreme_datetime = st.one_of(
    extreme_date,
    st.sampled_from(
        ["0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999+14:00", "2024-02-29T12:30:00-12:00", "1969-12-31T23:59:60Z"]
    ),
)
extreme_time = st.sampled_from(["00:00:00", "23:59:59", "12:00:00.5"])
extreme_int = st.sampled_from([0, 1, -1, 2147483647, -2147483648])
extreme_decimal = st.one_of(
    st.sampled_from([0.0, 1e-10, 9.87, -273.15, 1.7976931348623157e308, 123456789.123456]),
    st.integers(-(10**15), 10**15),
)


def _primitive(type_name: str) -> st.SearchStrategy:
    if type_name in ("string", "markdown"):
        return marked_text()
    if type_name in ("code", "id"):
        return needle
    if type_name in ("uri", "url", "canonical", "oid", "uuid"):
        return needle.map(lambda n: f"urn:x:{n}")
    if type_name == "boolean":
        return st.booleans()
    if type_name in ("integer", "unsignedInt", "positiveInt"):
        return extreme_int if type_name == "integer" else st.sampled_from([1, 7, 2147483647])
    if type_name == "decimal":
        return extreme_decimal
    if type_name == "date":
        return extreme_date
    if type_name in ("dateTime", "instant"):
        return extreme_datetime
    if type_name == "time":
        return extreme_time
    if type_name == "base64Binary":
        return needle.map(lambda n: n + "==")
    if type_name == "xhtml":
        return marked_text().map(lambda t: f'<div xmlns="http://www.w3.org/1999/xhtml">{html.escape(t)}</div>')
    raise ValueError(type_name)


_SKIP_CHILDREN = frozenset({"id", "modifierExtension"})
_MAX_DEPTH = 2


def _row_def(rows: dict, path: str) -> tuple[str, list] | None:
    for candidate in (path, path + "[x]"):
        if candidate in rows:
            return candidate, rows[candidate]
    return None


def _value(type_name: str, depth: int) -> st.SearchStrategy:
    """A JSON value of an R4 datatype: primitives directly, complex types from the element table."""
    if defs.is_primitive(type_name):
        return _primitive(type_name)
    if type_name in ("Extension",):
        return _extension()
    if type_name == "Narrative":
        return _narrative()
    if type_name in ("Reference",):
        reference = needle.map(lambda n: f"Patient/{n}")
        return st.fixed_dictionaries({"reference": reference}, optional={"display": marked_text()})
    rows = defs.elements(type_name)
    return _object(rows, "", depth)


def _object(rows: dict, prefix: str, depth: int) -> st.SearchStrategy:
    """An object whose children are the table rows directly below ``prefix``."""
    children = {}
    for path, row in rows.items():
        rel = path[len(prefix) :] if path.startswith(prefix) else None
        if rel is None or "." in rel or rel in _SKIP_CHILDREN or (rel == "extension" and depth > 0):
            continue
        types, _min, cmax = row[0], row[1], row[2]
        if not types or (depth >= _MAX_DEPTH and not all(defs.is_primitive(t) for t in types)):
            continue
        if rel.endswith("[x]"):
            children[rel] = st.sampled_from(types).flatmap(
                lambda t, base=rel[:-3]: _value(t, depth + 1).map(lambda v, t=t: (defs.choice_json_name(base, t), v))
            )
        else:
            one = _element_value(rows, path, types[0], depth + 1)
            children[rel] = st.lists(one, min_size=1, max_size=3) if cmax != 1 else one
    if not children:
        return marked_text().map(lambda t: {"text": t})
    return st.dictionaries(st.sampled_from(sorted(children)), st.just(None), min_size=1, max_size=4).flatmap(
        lambda keys: st.tuples(*(children[k] for k in sorted(keys))).map(lambda vals: _assemble(sorted(keys), vals))
    )


def _assemble(keys: list[str], values: tuple) -> dict:
    out: dict = {}
    for key, value in zip(keys, values, strict=True):
        if key.endswith("[x]"):
            name, v = value
            out[name] = v
        else:
            out[key] = value
    return out


def _element_value(rows: dict, path: str, type_name: str, depth: int) -> st.SearchStrategy:
    if type_name in defs.BACKBONE_TYPES:
        return _object(rows, path + ".", depth)
    return _value(type_name, depth)


def _extension() -> st.SearchStrategy:
    return st.fixed_dictionaries(
        {"url": needle.map(lambda n: f"https://ext.example/{n}")}, optional={"valueString": marked_text()}
    )


def _narrative() -> st.SearchStrategy:
    return marked_text().map(
        lambda t: {
            "status": "generated",
            "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><p>{html.escape(t)}</p></div>',
        }
    )


# --------------------------------------------------------------------------- placing values on covered paths


@dataclass(frozen=True)
class Step:
    """One hop of a covered path, with what the R4 table says about it."""

    key: str
    criteria: tuple[tuple[str, str], ...]
    repeating: bool
    rows: dict  # the table the next key is looked up in
    prefix: str  # path prefix of the next key in ``rows``


def _walk(rtype: str, el: CompiledElement) -> tuple[list[Step], dict, str] | None:
    """The hops of ``el`` with their cardinality, and where its terminal is defined."""
    rows, prefix = defs.elements(rtype), ""
    steps = []
    for hop in el.nav:
        found = _row_def(rows, prefix + hop.key)
        if found is None:
            return None
        path, row = found
        steps.append(Step(hop.key, hop.criteria, row[2] != 1, rows, prefix))
        if len(row) > 4 and row[4]:
            prefix = row[4] + "."
        elif not row[0] or row[0][0] in defs.BACKBONE_TYPES:
            prefix = path + "."
        else:
            rows, prefix = defs.elements(row[0][0]), ""
    return steps, rows, prefix


def _terminal_value(el: CompiledElement, rows: dict, prefix: str, rtype: str) -> st.SearchStrategy | None:
    """(json key, value) pairs to set on the parent for the covered terminal."""
    key = el.terminal.key
    if el.kind is Kind.NARRATIVE:
        return _narrative().map(lambda v: [(key, v)])
    if el.kind in (Kind.CHOICE, Kind.CHOICE_MASKED):
        base = key

        def one(choice: tuple[str, bool]) -> st.SearchStrategy:
            name, _prim = choice
            tname = name[len(base) :]
            tname = tname if not defs.is_primitive(tname[0].lower() + tname[1:]) else tname[0].lower() + tname[1:]
            return _value(tname, 1).map(lambda v: [(name, v)])

        return st.sampled_from(el.choices).flatmap(one)
    found = _row_def(rows, prefix + key)
    if found is None:
        return None
    path, row = found
    tname = row[0][0] if row[0] else "Element"
    if el.terminal.criteria:  # extension('url')
        url = dict(el.terminal.criteria)["url"]
        item = marked_text().map(lambda t: {"url": url, "valueString": t})
        return st.lists(item, min_size=1, max_size=2).map(lambda v: [(key, v)])
    single = _element_value(rows, path, tname, 1)
    if el.kind is Kind.PRIMITIVE:
        return _primitive_with_twin(key, single, repeating=row[2] != 1)
    return (st.lists(single, min_size=1, max_size=3) if row[2] != 1 else single).map(lambda v: [(key, v)])


def _primitive_with_twin(key: str, single: st.SearchStrategy, repeating: bool) -> st.SearchStrategy:
    """A primitive, sometimes with an extension on its ``_key`` twin; repeating ones with null slots."""
    twin = st.fixed_dictionaries({"extension": st.lists(_extension(), min_size=1, max_size=1)})
    if not repeating:
        return st.tuples(single, st.one_of(st.none(), twin)).map(
            lambda p: [(key, p[0])] + ([("_" + key, p[1])] if p[1] is not None else [])
        )
    slot = st.one_of(st.tuples(single, st.none()), st.tuples(single, twin), st.tuples(st.none(), twin))
    return st.lists(slot, min_size=1, max_size=3).map(
        lambda items: (
            [(key, [v for v, _ in items])] + ([("_" + key, [u for _, u in items])] if any(u for _, u in items) else [])
        )
    )


@st.composite
def _place(draw, resource: dict, rtype: str, el: CompiledElement) -> None:
    walked = _walk(rtype, el)
    if walked is None:
        return
    steps, rows, prefix = walked
    pairs_strategy = _terminal_value(el, rows, prefix, rtype)
    if pairs_strategy is None:
        return
    parents = [resource]
    for step in steps:
        nxt = []
        for parent in parents:
            existing = parent.get(step.key)
            if step.repeating:
                items = existing if isinstance(existing, list) else []
                for _ in range(draw(st.integers(1 if not items else 0, 2))):
                    items.append(dict(step.criteria))
                parent[step.key] = items
                nxt.extend(i for i in items if all(i.get(k) == v for k, v in step.criteria))
            else:
                if not isinstance(existing, dict):
                    existing = parent[step.key] = dict(step.criteria)
                nxt.append(existing)
        parents = nxt
    for parent in parents:
        if el.kind is Kind.CHOICE_MASKED and any(n in parent for n, _ in el.choices):
            continue
        if el.kind is Kind.CHOICE and any(n in parent for n, _ in el.choices):
            continue
        for k, v in draw(pairs_strategy):
            if k in parent and isinstance(parent[k], list) and isinstance(v, list):
                parent[k].extend(v)
            elif k not in parent:
                parent[k] = v


def unique_needles(resource: dict) -> dict:
    """Every needle occurrence replaced by a distinct one (shrinking makes them equal, hiding leaks)."""
    counter = iter(range(10**12))
    text = _NEEDLE_RE.sub(lambda m: f"nx{next(counter):012d}", orjson.dumps(resource).decode())
    return orjson.loads(text)


_NEEDLE_RE = re.compile(r"nx[a-z0-9]{12}")


def covered_resource(rp: ResourcePolicy, covered: dict[str, ResourcePolicy]) -> st.SearchStrategy:
    """A resource of type ``rp.type`` with values on a random, non-empty subset of its covered elements."""
    return _covered_resource(rp, covered).map(unique_needles)


@st.composite
def _covered_resource(draw, rp: ResourcePolicy, covered: dict[str, ResourcePolicy], contained: bool = True) -> dict:
    resource: dict = {"resourceType": rp.type, "id": draw(needle)}
    chosen = draw(st.lists(st.sampled_from(rp.elements), min_size=1, max_size=min(8, len(rp.elements)), unique=True))
    for el in chosen:
        draw(_place(resource, rp.type, el))
    if draw(st.booleans()):
        resource.setdefault("extension", []).append(draw(_extension()))
    if contained and draw(st.integers(0, 3)) == 0:
        inner_type = draw(st.sampled_from(sorted(covered)))
        inner = draw(_covered_resource(covered[inner_type], covered, contained=False))
        inner["id"] = "c1"
        resource["contained"] = [inner]
    return resource


# --------------------------------------------------------------------------- needles and clear parts


def string_leaves(value: object) -> list[str]:
    out: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            out.append(item)
    return out


def needles_in(value: object) -> set[str]:
    """The needles (``nx`` tokens) carried by the string leaves of ``value``."""
    found = set()
    for leaf in string_leaves(value):
        for word in leaf.replace("/", " ").replace(":", " ").replace("<", " ").replace(">", " ").split():
            if word.startswith(NEEDLE_PREFIX) and len(word) == 14:
                found.add(word)
    return found


def _covered_slots(resource: dict, rp: ResourcePolicy, covered: dict[str, ResourcePolicy]) -> list[tuple]:
    """(container, key) of every covered value in ``resource`` and its contained resources.

    Found independently of the core, from the compiled paths alone. An item kept partly
    in the clear (an extension's ``url`` discriminator) is returned with those keys.
    """
    out: list[tuple] = []
    for el in rp.elements:
        parents = [resource]
        for hop in el.nav:
            nxt = []
            for p in parents:
                v = p.get(hop.key)
                for item in v if isinstance(v, list) else [v]:
                    if isinstance(item, dict) and all(item.get(k) == x for k, x in hop.criteria):
                        nxt.append(item)
            parents = nxt
        names = [n for n, _ in el.choices] if el.kind in (Kind.CHOICE, Kind.CHOICE_MASKED) else [el.terminal.key]
        for p in parents:
            for name in names:
                for k in (name, "_" + name):
                    v = p.get(k)
                    if isinstance(v, list):
                        for i, item in enumerate(v):
                            if el.terminal.criteria and not (
                                isinstance(item, dict) and all(item.get(a) == b for a, b in el.terminal.criteria)
                            ):
                                continue
                            out.append((v, i, el.keep))
                    elif v is not None:
                        out.append((p, k, el.keep))
    for inner in resource.get("contained") or []:
        inner_rp = covered.get(inner.get("resourceType")) if isinstance(inner, dict) else None
        if inner_rp is not None:
            out.extend(_covered_slots(inner, inner_rp, covered))
    return out


def covered_values(resource: dict, rp: ResourcePolicy, covered: dict[str, ResourcePolicy]) -> list[object]:
    """The covered values themselves (live objects: mutating them mutates ``resource``)."""
    return [container[key] for container, key, _keep in _covered_slots(resource, rp, covered)]


def covered_needles(resource: dict, rp: ResourcePolicy, covered: dict[str, ResourcePolicy]) -> set[str]:
    """Needles of covered values that must not survive encryption (none that also sit in the clear part)."""
    inside = needles_in(
        [{a: b for a, b in v.items() if a not in keep} if isinstance(v, dict) else v
         for c, k, keep in _covered_slots(resource, rp, covered) for v in [c[k]]]
    )  # fmt: skip
    clear = copy.deepcopy(resource)
    for container, key, keep in _covered_slots(clear, rp, covered):
        value = container[key]
        container[key] = {a: b for a, b in value.items() if a in keep} if isinstance(value, dict) else None
    return inside - needles_in(clear)


# --------------------------------------------------------------------------- valid fixtures with generated values

_TEXT_KEYS = frozenset(
    {"text", "display", "family", "given", "prefix", "suffix", "line", "city", "district", "state", "description",
     "comment", "conclusion", "title", "valueString", "contentString", "patientInstruction", "summary", "unit"}
)  # fmt: skip
_DATE_KEYS = frozenset({"birthDate"})


@st.composite
def mutated_fixture(draw, fixture: dict, rp: ResourcePolicy, covered: dict[str, ResourcePolicy]) -> dict:
    """``fixture`` with the free-text and date leaves of its covered values replaced by generated ones.

    Only leaves whose R4 type is string (by name) or date are replaced, so the result
    stays valid for a strict server; narratives get a generated, escaped XHTML body.
    """
    resource = copy.deepcopy(fixture)
    for value in covered_values(resource, rp, covered):
        draw(_mutate(value))
    for key in _DATE_KEYS:
        if key in resource:
            resource[key] = draw(extreme_date.filter(lambda d: len(d) == 10))
    text = resource.get("text")
    if isinstance(text, dict):
        resource["text"] = draw(_narrative())
    return unique_needles(resource)


@st.composite
def _mutate(draw, value: object) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                if k in _TEXT_KEYS and isinstance(v, str):
                    item[k] = draw(marked_text())
                elif k in _TEXT_KEYS and isinstance(v, list) and all(isinstance(x, str) for x in v):
                    item[k] = [draw(marked_text()) for _ in v]
                elif k not in ("div",):
                    stack.append(v)
        elif isinstance(item, list):
            stack.extend(item)
