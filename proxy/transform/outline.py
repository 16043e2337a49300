"""The outline of an answer the policy does not act on: only the members the proxy judges it by.

An answer that holds nothing the policy acts on (``bodies.untouched``) goes to the client as the
upstream's own bytes, but it is still judged: the access screen looks at the type of every
resource in it, the audit records their ids, and a Bundle's navigation links are checked (signed
or dropped). None of that reads anything else, yet a full parse builds every string, list and
dict of the body - for a 100-entry searchset most of the proxy's CPU per request. msgspec decodes
typed structures and skips the members a structure does not name without building them, several
times faster than a full parse.

The outline keeps, at every place :func:`proxy.transform.bodies.nested_resources` looks for a
resource (``contained``, ``Bundle.entry.resource`` and ``.response.outcome``, ``Parameters``
``parameter.resource`` and ``part``), the members ``resourceType``, ``id`` and ``type``, a
Bundle's ``link`` and its entries' ``response.location``, as the same plain dicts and lists a full
parse gives. Anything that does not fit that shape (an ``entry`` that is not a list of objects, a
resource that is not an object) or that is not valid JSON and UTF-8 yields None, and the caller
parses the whole body instead: the outline is a faster way to the same judgement, never a
different one. Duplicate members resolve as in orjson (the last one counts).

Only for callers judged by resource type alone (``Decision.judges_content`` false): a caller
confined to a patient compartment needs the references inside each resource.
"""

from __future__ import annotations

from typing import Any

import msgspec

_UNSET: Any = msgspec.UNSET


class _Outline(msgspec.Struct, omit_defaults=True):
    resourceType: Any = _UNSET
    id: Any = _UNSET
    type: Any = _UNSET
    link: Any = _UNSET
    contained: list[_Outline] = _UNSET
    entry: list[_Entry] = _UNSET
    parameter: list[_Parameter] = _UNSET


class _Response(msgspec.Struct, omit_defaults=True):
    location: Any = _UNSET
    outcome: _Outline = _UNSET


class _Entry(msgspec.Struct, omit_defaults=True):
    resource: _Outline = _UNSET
    response: _Response = _UNSET


class _Parameter(msgspec.Struct, omit_defaults=True):
    resource: _Outline = _UNSET
    part: list[_Parameter] = _UNSET


_DECODER = msgspec.json.Decoder(_Outline)


def outline(raw: bytes) -> dict[str, Any] | None:
    """The outline of the JSON object ``raw`` as plain dicts and lists, or None when ``raw`` does not
    fit the outline's shape or is not valid JSON (the caller then parses it whole)."""
    if not _utf8(raw):
        return None
    try:
        view: dict[str, Any] = msgspec.to_builtins(_DECODER.decode(raw))
    except (msgspec.DecodeError, RecursionError):
        return None
    return view


def outlines(raw: bytes, count: int) -> list[dict[str, Any]] | None:
    """The outlines of the ``count`` NDJSON lines of ``raw`` (none of them blank) decoded in one call, or
    None when a line does not fit, is not valid JSON or holds more than one value (the caller then takes
    them one by one)."""
    if not _utf8(raw):
        return None
    try:
        views: list[dict[str, Any]] = msgspec.to_builtins(_DECODER.decode_lines(raw))
    except (msgspec.DecodeError, RecursionError):
        return None
    return views if len(views) == count else None


def _utf8(raw: bytes) -> bool:
    """msgspec does not check the UTF-8 of the strings it skips; a full parse does."""
    if raw.isascii():
        return True
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True
