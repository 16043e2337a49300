"""JSON for FHIR bodies that writes every number back exactly as it was read.

FHIR says a decimal's precision is significant (``1.50`` is not ``1.5``), but orjson
parses a number with a fraction or an exponent into a float and writes the float's
shortest form: ``1.50`` becomes ``1.5``, ``1e2`` becomes ``100.0``, an integer beyond
64 bits becomes a rounded float and ``-0`` becomes ``0``. ``loads`` keeps orjson's
speed for the bodies where that changes nothing, and otherwise parses again keeping
the text of each number that orjson would rewrite (``Number``); ``dumps`` writes that
text back unchanged. Everything that parses or serialises a FHIR resource on the
proxy's request, response and encryption paths goes through these two functions.

Deciding, per body, whether orjson is exact (``exact``):

1. orjson re-serialises the parsed body to the very same bytes. This is what servers,
   orjson itself and the proxy's own ciphertexts produce (compact JSON), and it proves
   every number survives: one ``orjson.dumps`` and a memory compare.
2. Otherwise (whitespace, other escapes, or a changed number) every number in value
   position, that is after ``:``, ``,`` or ``[``, is found by one regular expression on a
   ``bytes.translate`` copy (no whitespace, ``,`` and ``[`` written as ``:``, digits as
   ``0``), and each one that is not a plain short integer is checked by orjson's own round trip.
   Only if one would change is the slow path taken.

The slow path validates with orjson first, so exactly the same documents are accepted
or refused as before (UTF-8, NaN, nesting, surrogates), and then parses with the
standard library, whose ``parse_float``/``parse_int`` hooks see each number's text.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

__all__ = ["Number", "dumps", "exact", "loads"]


class Number(float):
    """A JSON number orjson would not write back as it was written; keeps that text.

    It is a float so that everything the proxy does with numbers (comparisons, the
    validation of writes, JSON Patch ``test``) keeps working; only ``dumps`` looks at
    ``text``. An integer beyond 64 bits is one too: its value is rounded, its text not.
    """

    __slots__ = ("text",)
    text: str

    def __new__(cls, text: str) -> Number:
        self = super().__new__(cls, text)
        self.text = text
        return self

    def __repr__(self) -> str:
        return self.text

    __str__ = __repr__

    def __reduce__(self) -> tuple[type[Number], tuple[str]]:
        return (Number, (self.text,))

    def __copy__(self) -> Number:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Number:
        return self


def _fragment(value: object) -> orjson.Fragment:
    if type(value) is Number:
        return orjson.Fragment(value.text)
    raise TypeError  # orjson reports the type, never the value


def dumps(value: object) -> bytes:
    """Compact JSON like ``orjson.dumps``, writing each ``Number`` with its original text."""
    return orjson.dumps(value, default=_fragment)


# Numbers in value position follow ":", "," or "[" (a top-level number is checked on its own). In a
# copy without whitespace (inside strings too: that only adds false alarms), with "," and "[" written
# as ":" and every digit and "-" as "0", each number starts with ":0", a literal the regex engine
# scans for fast (it matches character classes and whitespace runs slowly). A number ends before
# "," (now ":"), "]" or "}"; its text is read from the same offsets of a copy without whitespace only.
_MARKS = bytes.maketrans(b",[-123456789", b"::0000000000")
_WS = b" \t\n\r"
_VALUE = re.compile(rb":0[0.eE+]*(?=[:\]}])")
_MAX_PLAIN_INT = 18  # digits: orjson reads and writes such an integer exactly (int64 and uint64 hold 19)


def _changes(token: bytes) -> bool:
    """Whether orjson's parse-and-serialise changes this number's text."""
    if token.isdigit() and len(token) <= _MAX_PLAIN_INT:
        return False
    if token[:1] == b"-" and token[1:].isdigit() and len(token) <= _MAX_PLAIN_INT and token != b"-0":
        return False
    try:
        return orjson.dumps(orjson.loads(token)) != token
    except orjson.JSONDecodeError:
        return True  # not a JSON number after all (text inside a string): let the slow path decide


def _reserialises(raw: bytes, value: object) -> bool:
    try:
        return orjson.dumps(value) == raw
    except orjson.JSONEncodeError:
        return False  # too deep to serialise: the regular expressions decide


def _numbers_survive(raw: bytes) -> bool:
    if raw.lstrip(_WS)[:1] in (b"-", b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"8", b"9"):
        return not _changes(raw.strip(_WS))
    plain = None
    for m in _VALUE.finditer(raw.translate(_MARKS, _WS)):
        plain = plain or raw.translate(None, _WS)
        if _changes(plain[m.start() + 1 : m.end()]):
            return False
    return True


def exact(raw: bytes, value: object) -> bool:
    """Whether ``value`` (orjson's parse of ``raw``) serialises every number of ``raw`` unchanged.

    A false "no" only costs speed; a false "yes" would lose a digit, so when unsure: no.
    """
    return _reserialises(raw, value) or _numbers_survive(raw)


def _parse_int(text: str) -> int | Number:
    value = int(text)  # within a double's range: orjson has refused anything larger already
    if text == "-0" or not -(1 << 63) <= value < (1 << 64):  # orjson writes 0, or reads a float
        return Number(text)
    return value


def _parse_float(text: str) -> float | Number:
    value = float(text)
    return value if orjson.dumps(value) == text.encode() else Number(text)


_DECODER = json.JSONDecoder(parse_float=_parse_float, parse_int=_parse_int)


def loads(raw: bytes | bytearray | memoryview | str) -> Any:
    """Parse JSON like ``orjson.loads`` (same errors), keeping the text of numbers orjson would rewrite."""
    value = orjson.loads(raw)  # first, and always: the same documents are refused as before
    data = raw if type(raw) is bytes else raw.encode() if isinstance(raw, str) else bytes(raw)
    if exact(data, value):
        return value
    try:
        return _DECODER.decode(data.decode("utf-8"))
    except RecursionError:  # deeper than the standard library goes (orjson allows 1024 levels)
        raise orjson.JSONDecodeError("nested too deeply", "", 0) from None
