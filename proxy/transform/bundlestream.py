"""A FHIR Bundle's JSON cut into its top-level members and its entries while the bytes arrive.

A search page, a history or ``$everything`` can be far larger than any resource in it; read whole,
it costs memory in proportion to the page (today up to the 64 MiB response limit, several times
that as Python objects). Fed chunk by chunk, :class:`BundleSplitter` hands out each top-level
member and each ``entry`` element as soon as its last byte has arrived, as the same plain values
``jsonnum.loads`` gives, so that every entry can be judged, decrypted and written on by the code
that handles a whole body, and memory holds one chunk and one entry.

Tokenising is ijson's (its yajl2 C backend); this module only builds values from ijson's events,
with the bounds a whole-body parse gets from orjson: nesting (``MAX_DEPTH``), the bytes one member
or entry may span, duplicate top-level members (refused: the JSON would mean one thing to the proxy
and another to a client) and numbers a double cannot hold. Errors name what was wrong, never
content: ijson's own messages quote the input, so they are never passed on.

Numbers: ijson gives an ``int`` for a number without fraction or exponent and a ``Decimal``
otherwise. :func:`number` turns them into jsonnum's representation: the float where writing the
float gives back the number's digits and exponent, else a :class:`~proxy.transform.jsonnum.Number`
that writes the Decimal's digits, so precision (``1.50``) is never lost. The text is the one read,
except for exponent forms other than the float's shortest one (``1.5e3`` is written ``1.5E+3``, as
Java's BigDecimal would), plain texts of numbers whose shortest float text has an exponent
(``0.0000001`` and ``1e-7`` are the same digits and exponent: written ``1e-7``, as JavaScript servers
write it) and ``-0`` (ijson reads it as ``0``).
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any, Literal

import ijson
import orjson

from proxy.transform.jsonnum import Number

__all__ = ["ENTRIES", "ENTRIES_END", "ENTRY", "MAX_DEPTH", "MEMBER", "BundleSplitter", "SplitError", "number"]

MEMBER: Literal["member"] = "member"  # a top-level member other than the entry array: (key, value)
ENTRIES: Literal["entries"] = "entries"  # the top-level "entry" array opens
ENTRY: Literal["entry"] = "entry"  # one element of that array
ENTRIES_END: Literal["entries-end"] = "entries-end"  # the array closes
Part = tuple[str, Any]

MAX_DEPTH = 200  # as proxy.transform.bodies.MAX_DEPTH: the levels any body may nest (the Bundle itself is 1)
_INT64_MIN, _UINT64_END = -(1 << 63), 1 << 64  # orjson reads and writes integers in this range exactly


class SplitError(ValueError):
    """The upstream's bytes are not a JSON object the proxy can process; the message names no content."""


def number(value: int | Decimal) -> int | float | Number:
    """An ijson number as ``jsonnum.loads`` represents it (see the module docstring)."""
    if type(value) is int and _INT64_MIN <= value < _UINT64_END:
        return value
    try:
        as_float = float(value)
    except OverflowError:  # an integer: a Decimal becomes inf
        as_float = math.inf
    if not math.isfinite(as_float):
        raise SplitError("a number beyond a double's range")
    if not isinstance(value, Decimal):
        return Number(str(value))
    shortest = orjson.dumps(as_float).decode()
    if Decimal(shortest).as_tuple() == value.as_tuple():  # same sign, digits and exponent: orjson writes it so
        return as_float
    exponent = value.as_tuple().exponent
    return Number(format(value, "f") if type(exponent) is int and exponent <= 0 else str(value))


class BundleSplitter:
    """Feed bytes, take parts: ``(MEMBER, (key, value))``, ``(ENTRIES, None)``, ``(ENTRY, value)``,
    ``(ENTRIES_END, None)``, in document order. ``max_span``: the bytes one member before the entries,
    one entry, or everything after the last entry may span (the memory bound); ``close`` checks the
    document ended."""

    def __init__(self, max_span: int) -> None:
        self._events = ijson.sendable_list()
        self._coro = ijson.basic_parse_coro(self._events)
        self._max = max_span
        self._span = 0  # bytes fed since the last entry (or the start) while something is being built
        self._stack: list[Any] = []  # containers under construction
        self._keys: list[str | None] = []  # the pending key of each map in _stack
        self._member: str | None = None  # the top-level key whose value comes next
        self._seen: set[str] = set()
        self._level = 0  # 0 before the document, 1 inside the top object, 2 inside the entry array, -1 after

    def feed(self, chunk: bytes | memoryview) -> list[Part]:
        try:
            self._coro.send(chunk)
        except ijson.JSONError:
            raise SplitError("invalid JSON") from None
        self._span += len(chunk)
        parts = self._take()
        if self._span > self._max:
            raise SplitError(f"a member or entry larger than {self._max} bytes")
        return parts

    def close(self) -> list[Part]:
        try:
            self._coro.close()
        except ijson.JSONError:
            raise SplitError("invalid or incomplete JSON") from None
        parts = self._take()
        if self._level != -1:
            raise SplitError("incomplete JSON")
        return parts

    def _take(self) -> list[Part]:
        out: list[Part] = []
        stack, keys = self._stack, self._keys
        for event, value in self._events:
            if event == "map_key":
                if stack:
                    keys[-1] = value
                elif value in self._seen:
                    raise SplitError("a top-level member is repeated")
                else:
                    self._seen.add(value)
                    self._member = value
            elif event == "start_map" or event == "start_array":
                self._open(event == "start_map", out)
            elif event == "end_map" or event == "end_array":
                if stack:
                    keys.pop()
                    self._done(stack.pop(), out)
                elif self._level == 2:
                    self._level = 1
                    out.append((ENTRIES_END, None))
                else:
                    self._level = -1
            elif self._level == 0:
                raise SplitError("JSON that is not an object")
            else:
                self._done(number(value) if event == "number" else value, out)
        del self._events[:]
        return out

    def _open(self, is_map: bool, out: list[Part]) -> None:
        if self._level == 0:
            if not is_map:
                raise SplitError("JSON that is not an object")
            self._level = 1
            return
        if self._level == 1 and not self._stack and self._member == "entry" and not is_map:
            self._level = 2
            out.append((ENTRIES, None))
            return
        if self._level + len(self._stack) + 1 > MAX_DEPTH:
            raise SplitError(f"JSON nested more than {MAX_DEPTH} levels")
        self._stack.append({} if is_map else [])
        self._keys.append(None)

    def _done(self, value: Any, out: list[Part]) -> None:
        """A complete value: into its container, or out as a part."""
        stack = self._stack
        if stack:
            top = stack[-1]
            if type(top) is list:
                top.append(value)
            else:
                top[self._keys[-1]] = value
        elif self._level == 2:
            out.append((ENTRY, value))
            self._span = 0
        else:
            out.append((MEMBER, (self._member, value)))
