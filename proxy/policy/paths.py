"""The one parser for the FHIRPath paths the proxy reads: policy element paths and search parameters.

Policy files (the :data:`POLICY` dialect)::

    name.given                                  dotted navigation
    identifier.where(system='https://...').value filter on clear sibling fields
    code.coding.where(system='x' and code='y')   several equalities joined by ``and``
    value.ofType(Quantity)                       one type of a choice element
    extension('https://...')                     extension by URL (also modifierExtension)

Anything else is rejected with a message naming the column, because a policy that
silently matched nothing would leave PHI in the clear.

R4 search parameter expressions (the :data:`SEARCH` dialect, used by
:mod:`proxy.policy.searchparams`, which handles their unions, parentheses and infix ``as``)
add indexers ``entry[0]`` (dropped: a path covers every item), ``.as(T)`` (as ``ofType``) and
``where(resolve() is T)`` (a :class:`Where` on the key ``resolve()``); ``extension()`` is not
part of them. Both go through the same tokens, string literals and parentheses, so a quoting
or nesting rule cannot differ between what a policy covers and what a search reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Child:
    name: str


@dataclass(frozen=True)
class Where:
    """Keep list items whose clear fields equal the given literals."""

    criteria: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class OfType:
    type: str


Step = Child | Where | OfType

RESOLVE = "resolve()"
"""The criterion key of ``where(resolve() is T)``: the reference points at a resource of type T."""


@dataclass(frozen=True)
class Dialect:
    """What one reader of paths accepts beyond dotted names and ``where``."""

    functions: frozenset[str]
    indexers: bool = False
    resolve_is: bool = False


POLICY = Dialect(frozenset({"where", "ofType", "extension", "modifierExtension"}))
SEARCH = Dialect(frozenset({"where", "ofType", "as"}), indexers=True, resolve_is=True)

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<call>(?P<fn>[A-Za-z]+)\()
    | (?P<name>[A-Za-z][A-Za-z0-9_]*(?:\[x\])?)
    | (?P<dot>\.)
    | (?P<index>\[\d+\])
    )""",
    re.VERBOSE,
)
_LITERAL = r"'((?:[^'\\]|\\.)*)'"
_STRING = re.compile(rf"\s*{_LITERAL}\s*")
_CRITERION = re.compile(rf"\s*([A-Za-z][A-Za-z0-9_]*)\s*=\s*{_LITERAL}\s*")
_TYPE_NAME = re.compile(r"\s*([A-Za-z]+)\s*")
_RESOLVE_IS = re.compile(r"\s*resolve\(\)\s+is\s+([A-Z][A-Za-z]*)\s*")


class PathSyntaxError(ValueError):
    def __init__(self, message: str, column: int) -> None:
        super().__init__(f"{message} (column {column + 1})")
        self.column = column


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def closing_paren(text: str, pos: int) -> int:
    """Index of the ``)`` that closes the ``(`` just before ``pos`` (nested parentheses and quoted
    strings, with their backslash escapes, skipped)."""
    depth = 1
    quoted = False
    i = pos
    while i < len(text):
        ch = text[i]
        if quoted and ch == "\\":
            i += 2
            continue
        if ch == "'":
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise PathSyntaxError("missing ')'", pos)


def _where(inner: str, pos: int, dialect: Dialect) -> Where:
    if dialect.resolve_is and (m := _RESOLVE_IS.fullmatch(inner)):
        return Where(((RESOLVE, m.group(1)),))
    criteria = []
    for part in re.split(r"\band\b", inner):
        m = _CRITERION.fullmatch(part)
        if not m:
            raise PathSyntaxError("where() supports only field='literal' joined by 'and'", pos)
        criteria.append((m.group(1), _unescape(m.group(2))))
    return Where(tuple(criteria))


def _parse_call(fn: str, text: str, pos: int, dialect: Dialect) -> tuple[list[Step], int]:
    if fn not in dialect.functions:
        raise PathSyntaxError(f"{fn}() is not supported", pos)
    end = closing_paren(text, pos)
    inner = text[pos:end]
    if fn in ("extension", "modifierExtension"):
        m = _STRING.fullmatch(inner)
        if not m:
            raise PathSyntaxError(f"{fn}() takes one quoted URL", pos)
        return [Child(fn), Where((("url", _unescape(m.group(1))),))], end + 1
    if fn in ("ofType", "as"):
        m = _TYPE_NAME.fullmatch(inner)
        if not m:
            raise PathSyntaxError(f"{fn}() takes one type name", pos)
        return [OfType(m.group(1))], end + 1
    return [_where(inner, pos, dialect)], end + 1


def parse_path(text: str, dialect: Dialect = POLICY, *, continued: bool = False) -> list[Step]:
    """Parse ``text`` into steps; raises :class:`PathSyntaxError`.

    ``continued``: ``text`` goes on from a step already parsed (``.text`` after a parenthesis), so
    it starts with ``.`` or an indexer, and may be empty."""
    steps: list[Step] = []
    pos = 0
    expect_name = not continued
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            if text[pos:].strip() == "":
                break
            raise PathSyntaxError("unexpected character", pos)
        if m.group("dot"):
            if expect_name:
                raise PathSyntaxError("unexpected '.'", pos)
            expect_name = True
            pos = m.end()
            continue
        if m.group("index"):
            if expect_name or not dialect.indexers:
                raise PathSyntaxError("unexpected character", m.start("index"))
            pos = m.end()
            continue
        if not expect_name:
            raise PathSyntaxError("expected '.'", pos)
        if m.group("call"):
            new, pos = _parse_call(m.group("fn"), text, m.end(), dialect)
            steps.extend(new)
        else:
            steps.append(Child(m.group("name")))
            pos = m.end()
        expect_name = False
    if continued and not expect_name:
        return steps
    if not steps or expect_name:
        raise PathSyntaxError("empty or incomplete path", pos)
    return steps


def format_steps(steps: list[Step] | tuple[Step, ...]) -> str:
    """Render steps back to policy syntax (used in explanations and error messages)."""
    out: list[str] = []
    for step in steps:
        if isinstance(step, Child):
            out.append(("." if out else "") + step.name)
        elif isinstance(step, OfType):
            out.append(f".ofType({step.type})")
        else:
            cond = " and ".join(f"{k}='{v}'" for k, v in step.criteria)
            out.append(f".where({cond})")
    return "".join(out)
