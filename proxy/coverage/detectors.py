"""Which clear values look like PHI: the detector hook of ``fhircrypt coverage``.

A detector is any callable from a clear string to the name of what it looks like (``nik``,
``email``, ``phone``) or None. The scan only calls that hook, so the structure-aware PHI sentinel
of the proxy can replace ``simple_detector`` without changing the scan: pass its function as
``detector``. This simple set errs towards flagging (a report asks an operator to look, it refuses
nothing): a NIK is 16 digits whose first two are a province code 11-94; an e-mail address; a phone
number written Indonesian-style (0 8…, 62 8…) or in E.164 (+ and 8-15 digits).
"""

from __future__ import annotations

import re
from collections.abc import Callable

Detector = Callable[[str], str | None]

_NIK = re.compile(r"(?<!\d)(?:1[1-9]|[2-8]\d|9[0-4])\d{14}(?!\d)")
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_PHONE = re.compile(r"(?<![\w+])(?:\+[1-9](?:[\s-]?\d){7,14}|(?:62|0)[\s-]?8(?:[\s-]?\d){7,11})(?!\d)")


def simple_detector(value: str) -> str | None:
    """The name of the first simple detector that matches ``value``, or None."""
    if _NIK.search(value):
        return "nik"
    if "@" in value and _EMAIL.search(value):
        return "email"
    if _PHONE.search(value):
        return "phone"
    return None
