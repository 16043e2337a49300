"""Normalisation applied before blind indexing, identical on write and on search.

A blind index only matches equal inputs, so both sides must reduce a value to the same
canonical text. The rules mirror how FHIR servers compare plaintext:

* ``string`` parameters (names, addresses): Unicode NFKD, combining marks removed,
  case-folded, whitespace collapsed - FHIR string search is case- and accent-insensitive.
* ``token`` parameters: the code as written (token matching of codes is exact); for
  identifier values with ``normalize: digits`` only the digits (NIK and BPJS numbers
  are often written with spaces or dashes).
* ``date`` parameters: the day ``YYYY-MM-DD`` and, where asked, the year ``YYYY``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

_SPACE = re.compile(r"\s+")
EXACT = "exact:"
_DIGITS = re.compile(r"\D+")


def fold(text: str) -> str:
    if text.isascii():
        # NFKD leaves ASCII unchanged, ASCII has no combining marks and casefold() of ASCII
        # is lower(): the same result without a per-character pass (most Indonesian names)
        return _SPACE.sub(" ", text.lower()).strip()
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return _SPACE.sub(" ", stripped.casefold()).strip()


def digits(text: str) -> str:
    return _DIGITS.sub("", text)


NORMALISERS: dict[str, Callable[[str], str]] = {"fold": fold, "digits": digits, "exact": lambda text: text}


# Prefix tokens stop at this length; the whole part stays a token. Without a cap a part of n
# characters gave n tokens of n²/2 characters in all: one 200 000-character name exhausted the
# proxy's memory. Search values longer than this match only whole parts (see search.query_tokens).
PREFIX_MAX = 64


def string_tokens(text: str, prefix_min: int | None) -> list[str]:
    """Tokens for one string part (a family name, one given name, an address line).

    FHIR string search matches when a part *starts with* the search text, so with
    ``prefix_min`` every prefix of the folded part of at least that length is a token
    and ``name=Budi`` finds "Budiarto" as a plaintext server would, up to ``PREFIX_MAX``
    characters. Without it only the whole part matches.
    """
    part = fold(text)
    if not part:
        return []
    exact = EXACT + unicodedata.normalize("NFC", text)  # for :exact (case and accents matter)
    if prefix_min is None or len(part) <= prefix_min:
        return [part, exact]
    prefixes = [part[:n] for n in range(prefix_min, min(len(part), PREFIX_MAX) + 1)]
    return [*prefixes, part, exact] if len(part) > PREFIX_MAX else [*prefixes, exact]


def date_tokens(value: str, year: bool) -> list[str]:
    """``day:YYYY-MM-DD`` (when the date has a day) and ``year:YYYY`` (when asked)."""
    out = []
    if len(value) >= 10:
        out.append("day:" + value[:10])
    if year and len(value) >= 4:
        out.append("year:" + value[:4])
    return out
