"""Parser for the FHIRPath subset used in policy files.

Supported::

    name.given                                  dotted navigation
    identifier.where(system='https://...').value filter on clear sibling fields
    code.coding.where(system='x' and code='y')   several equalities joined by ``and``
    value.ofType(Quantity)                       one type of a choice element
    extension('https://...')                     extension by URL (also modifierExtension)

Anything else is rejected with a message naming the column, because a policy that
silently matched nothing would leave PHI in the clear.
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

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<call>(?P<fn>where|ofType|extension|modifierExtension)\()
    | (?P<name>[A-Za-z][A-Za-z0-9_]*(?:\[x\])?)
    | (?P<dot>\.)
    )""",
    re.VERBOSE,
)
_STRING = re.compile(r"\s*'((?:[^'\\]|\\.)*)'\s*")
_CRITERION = re.compile(r"\s*([A-Za-z][A-Za-z0-9_]*)\s*=\s*'((?:[^'\\]|\\.)*)'\s*")


class PathSyntaxError(ValueError):
    def __init__(self, message: str, column: int) -> None:
        super().__init__(f"{message} (column {column + 1})")
        self.column = column


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _parse_call(fn: str, text: str, pos: int) -> tuple[list[Step], int]:
    end = _find_close(text, pos)
    inner = text[pos:end]
    if fn in ("extension", "modifierExtension"):
        m = _STRING.fullmatch(inner)
        if not m:
            raise PathSyntaxError(f"{fn}() takes one quoted URL", pos)
        return [Child(fn), Where((("url", _unescape(m.group(1))),))], end + 1
    if fn == "ofType":
        if not re.fullmatch(r"\s*[A-Za-z]+\s*", inner):
            raise PathSyntaxError("ofType() takes one type name", pos)
        return [OfType(inner.strip())], end + 1
    criteria = []
    for part in re.split(r"\band\b", inner):
        m = _CRITERION.fullmatch(part)
        if not m:
            raise PathSyntaxError("where() supports only field='literal' joined by 'and'", pos)
        criteria.append((m.group(1), _unescape(m.group(2))))
    return [Where(tuple(criteria))], end + 1


def _find_close(text: str, pos: int) -> int:
    quoted = False
    i = pos
    while i < len(text):
        ch = text[i]
        if ch == "\\" and quoted:
            i += 2
            continue
        if ch == "'":
            quoted = not quoted
        elif ch == ")" and not quoted:
            return i
        i += 1
    raise PathSyntaxError("missing ')'", pos)


def parse_path(text: str) -> list[Step]:
    """Parse ``text`` into steps; raises :class:`PathSyntaxError`."""
    steps: list[Step] = []
    pos = 0
    expect_name = True
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
        if not expect_name:
            raise PathSyntaxError("expected '.'", pos)
        if m.group("call"):
            new, pos = _parse_call(m.group("fn"), text, m.end())
            steps.extend(new)
        else:
            steps.append(Child(m.group("name")))
            pos = m.end()
        expect_name = False
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
