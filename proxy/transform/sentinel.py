"""The PHI sentinel: values that look like a person's identity in what the proxy forwards in the clear.

A policy encrypts what it names; an EMR types a NIK into a note, a phone number into a
display, the patient's name into an uncovered resource. The sentinel looks at every string
the proxy is about to forward in the clear (a written resource *after* encryption, so what is
left is exactly what the server receives; JSON Patch values; operation parameters; search
values forwarded unchanged) with structure-aware detectors:

``nik``    16 digits: a province code from Kemendagri's list, regency and district codes that
           are not 00, a birth date DDMMYY (women: day + 40) that exists, a serial that is not 0000
``bpjs``   13 digits beginning 000 (the JKN-KIS card number as printed on BPJS Kesehatan cards)
``ihs``    a SATUSEHAT patient IHS number: P and 11 digits
``phone``  an Indonesian number (08…, +62 8…, 62 8…) or an E.164 number (+ and 8-15 digits)
``email``  an e-mail address
``name``   a word of a name the same request carries in an element the policy encrypts
           (a name sealed in ``Patient.name`` must not travel in clear in ``Observation.note``)

Each hit is handled by the policy's ``sentinel`` setting for its detector
(``proxy.policy.sentinel``): ``refuse`` (a 400 naming the path and the detector, never the
value), ``encrypt`` (sealed in place while the resource is encrypted, see :func:`find` and
``proxy.transform.records``; a hit that cannot be sealed - in a resource of a type the policy does
not cover, a search value, a patch of an uncovered type - is refused), ``report`` (forwarded, and
passed to the listeners: the web layer counts each in its metrics and logs a request's hits in one
line, by detector and path, never with the value) or ``off``. This module is pure: it neither logs
nor counts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeAlias

from proxy.outcome import FhirError
from proxy.policy.sentinel import DETECTORS, SentinelSettings
from proxy.transform import markers as mk
from proxy.transform.jsontypes import JSON

LABELS = {
    "nik": "an Indonesian NIK",
    "bpjs": "a BPJS Kesehatan card number",
    "ihs": "a SATUSEHAT IHS number",
    "phone": "a phone number",
    "email": "an e-mail address",
    "name": "a name this request encrypts elsewhere",
}

# Kemendagri province codes (Permendagri 72/2019 and the 2022 Papua provinces 93-96).
PROVINCES = frozenset(
    {11, 12, 13, 14, 15, 16, 17, 18, 19, 21, 31, 32, 33, 34, 35, 36, 51, 52, 53, 61, 62, 63, 64, 65}
    | {71, 72, 73, 74, 75, 76, 81, 82, 91, 92, 93, 94, 95, 96}
)
_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # February: 29 only in years divisible by 4

# Candidates; each is confirmed by its structure below. A whole token only, so 16 digits inside a
# longer accession number, a decimal or a digit-dash-digit run never count; a label before it with a
# dash does not hide it ("NIK-3273…", "IHS-P0…").
_BEFORE = r"(?<![\w.,+])(?<!\d-)"
_SIXTEEN = re.compile(_BEFORE + r"(\d{16}|\d{4}([ .-])\d{4}\2\d{4}\2\d{4}|\d{6}([ .-])\d{6}\3\d{4})(?![\w]|[.,]\d)")
_BPJS = re.compile(_BEFORE + r"000\d{10}(?![\w]|[.,]\d)")
_IHS = re.compile(_BEFORE + r"P\d{11}(?![\w]|[.,]\d)")
_PHONE_ID = re.compile(r"(?<![\w+])(?:\+62[ -]?|62|0)8\d{1,3}(?:[ -]?\d{3,4}){1,3}(?!\w|[.,]\d)")
_PHONE_E164 = re.compile(r"(?<![\w+])\+[1-9]\d{0,3}(?:[ -]?\d{2,4}){2,5}(?!\w|[.,]\d)")
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_WORD = re.compile(r"[^\W\d_]{3,}")
# What every match of a numeric detector contains (16 or 13 digits, P + 11, grouped NIKs and phone
# numbers, +country, @): one C-level search, so dates, times, lab values and short codes skip the rest.
_PREFILTER = re.compile(r"\d{6}|\d{4}[ .-]\d{4}|\d{3}[ -]\d{3}|\+[1-9]|@")
_SEPARATORS = str.maketrans("", "", " .-+")


def valid_nik(digits: str) -> bool:
    """16 digits with the structure of a NIK: province, regency, district, birth date, serial."""
    if len(digits) != 16 or not digits.isdigit():
        return False
    if int(digits[0:2]) not in PROVINCES or digits[2:4] == "00" or digits[4:6] == "00" or digits[12:] == "0000":
        return False
    day, month, year = int(digits[6:8]), int(digits[8:10]), int(digits[10:12])
    if day > 40:
        day -= 40  # women
    if not 1 <= month <= 12 or not 1 <= day <= _DAYS[month - 1]:
        return False
    return not (month == 2 and day == 29 and year % 4)


def _phone(text: str) -> bool:
    for m in _PHONE_ID.finditer(text):
        digits = m.group(0).translate(_SEPARATORS)
        national = digits[2:] if digits.startswith("62") else digits[1:]
        if 9 <= len(national) <= 12:
            return True
    return any(8 <= len(m.group(0).translate(_SEPARATORS)) <= 15 for m in _PHONE_E164.finditer(text))


def _nik(text: str) -> bool:
    return any(valid_nik(m.group(0).translate(_SEPARATORS)) for m in _SIXTEEN.finditer(text))


_NUMERIC: dict[str, Callable[[str], object]] = {
    "nik": _nik,
    "bpjs": _BPJS.search,
    "ihs": _IHS.search,
    "phone": _phone,
    "email": _EMAIL.search,
}


def detect(text: str, names: frozenset[str] = frozenset(), order: tuple[str, ...] = DETECTORS) -> str | None:
    """The first detector of ``order`` that recognises something in ``text`` (None: nothing)."""
    numeric = _PREFILTER.search(text) is not None
    if not numeric and not names:
        return None  # most strings: codes, words, dates without a long number
    for detector in order:
        if detector == "name":
            if names and not names.isdisjoint(_WORD.findall(text.casefold())):
                return detector
        elif numeric and _NUMERIC[detector](text):
            return detector
    return None


@dataclass(frozen=True)
class Hit:
    path: str  # FHIRPath-like location, or the parameter's name; never the value
    detector: str


Listener = Callable[[Hit], None]
_LISTENERS: list[Listener] = []


def add_listener(listener: Listener) -> None:
    """Called with every reported hit (the web layer counts them in its metrics)."""
    _LISTENERS.append(listener)


def handle(cfg: SentinelSettings, path: str, detector: str) -> None:
    """Refuse, or report, one hit in what is forwarded in the clear."""
    action = cfg.action(detector)
    if action == "off":
        return
    if action == "refuse":
        raise FhirError(
            400,
            "security",
            f"{path}: the value looks like {LABELS[detector]} but the policy leaves this element in the "
            f"clear (sentinel.{detector}: refuse); encrypt the element in the policy or remove the value",
            [path],
        )
    if action == "encrypt":  # still in the clear after encryption: nowhere to seal it
        raise FhirError(
            400,
            "security",
            f"{path}: the value looks like {LABELS[detector]} and cannot be sealed here (sentinel.{detector}: "
            "encrypt seals values only in written resources of the types the policy covers, not in other "
            "types, search values, patches of uncovered types or operation parameters); remove the value",
            [path],
        )
    hit = Hit(path[:300], detector)
    for listener in _LISTENERS:
        listener(hit)


def check_text(cfg: SentinelSettings, path: str, text: str) -> None:
    """One value forwarded as it is (a search parameter's)."""
    check_value(cfg, text, path)


def names_of(cfg: SentinelSettings, resources: Iterable[JSON]) -> frozenset[str]:
    """Words of the names in the elements the policy encrypts, read before encryption."""
    if cfg.action("name") == "off":
        return frozenset()
    words: set[str] = set()
    for resource in resources:
        for key in cfg.name_keys.get(resource.get("resourceType"), ()):  # type: ignore[arg-type]
            words.update(_name_words(resource.get(key)))
    return frozenset(words)


def check_resource(cfg: SentinelSettings, resource: JSON, where: str, names: frozenset[str] = frozenset()) -> None:
    """Every clear string of a resource as it will be forwarded (after encryption, so what the policy
    encrypts is ciphertext and everything left is what the server receives). ``names``: words of the
    names the request encrypts (:func:`names_of` before encryption) less those still readable in it
    afterwards (a policy that encrypts ``name.family`` only): those are not secrets."""
    if cfg.active:
        _walk(resource, _checker(cfg, where, names))


def check_value(cfg: SentinelSettings, value: object, where: str) -> None:
    """Any JSON value forwarded as it is (a JSON Patch, an operation's parameters, a search value)."""
    if cfg.active:
        _walk(value, _checker(cfg, where, frozenset()))


def _name_words(value: object) -> Iterable[str]:
    for name in value if type(value) is list else (value,):
        if type(name) is not dict:
            continue
        parts = [name.get("family"), name.get("text"), *(name.get("given") or ())]
        for part in parts:
            if type(part) is str:
                yield from (w.casefold() for w in _WORD.findall(part))


# Structure, not content: ids, references, canonical URLs, codes under a system, base64 data.
_SKIP_KEYS = frozenset({"resourceType", "id", "reference", "system", "url", "fullUrl", "meta", "data", "contentType"})
_SKIP_KEYS |= {"profile", "versionId", "lastUpdated", "language", "ifMatch", "ifNoneMatch", "ifModifiedSince"}
_OWN = mk.CANONICAL  # fhircrypt's envelope, ciphertext and blind-index identifiers
_DAR = mk.DAR_URL  # the masked marker next to each ciphertext

# (parent location, key or index): built per element, rendered only for a hit
Location: TypeAlias = "tuple[Location, str | int] | None"
# Called with each string: the text, its location, and where it lives - ``owner[key]``, or
# ``owner[key][index]`` in a repeating primitive (owner None: in no element, e.g. a list of lists)
Visit: TypeAlias = Callable[[str, Location, "JSON | None", str, "int | None"], None]


def _walk(root: object, visit: Visit, own_only: bool = False) -> None:
    """Every string in ``root`` except structure and fhircrypt's own markers (``own_only``: and
    except nested resources, which are sealed under their own envelopes). Iterative, and the
    location of a string is a linked tuple turned into text only when a detector fires: the walk
    visits every element of every write, the text is needed almost never."""
    stack: list[tuple[object, Location, tuple[JSON, str] | None]] = [(root, None, None)]
    while stack:
        node, at, owner = stack.pop()
        if type(node) is dict:
            if own_only and at is not None and "resourceType" in node:
                continue
            coded = "system" in node
            for key, value in node.items():
                kind = type(value)
                if kind is str:
                    if key not in _SKIP_KEYS and not (coded and key == "code"):
                        visit(value, (at, key), node, key, None)
                elif (kind is dict or kind is list) and key not in _SKIP_KEYS:
                    stack.append((value, (at, key), (node, key) if kind is list else None))
        elif type(node) is list:
            for i, item in enumerate(node):
                kind = type(item)
                if kind is dict:
                    marker = item.get("url") or item.get("system")
                    if type(marker) is str and (marker == _DAR or marker.startswith(_OWN)):
                        continue
                    stack.append((item, (at, i), None))
                elif kind is str:
                    visit(item, (at, i), owner[0] if owner else None, owner[1] if owner else "", i)
                elif kind is list:
                    stack.append((item, (at, i), None))
        elif type(node) is str:
            visit(node, None, None, "", None)


def _checker(cfg: SentinelSettings, where: str, names: frozenset[str]) -> Visit:
    order = cfg.order

    def visit(text: str, at: Location, owner: JSON | None, key: str, index: int | None) -> None:
        detector = detect(text, names, order)
        if detector is not None:
            handle(cfg, _render(where, at), detector)

    return visit


@dataclass(frozen=True)
class Place:
    """A hit of an encrypt detector in a resource being written: ``owner[key]``, or item ``index`` of
    the repeating primitive ``owner[key]``; ``path`` is its concrete path in the resource (``note[0].text``),
    the location its ciphertext is bound to."""

    owner: JSON
    key: str
    index: int | None
    path: str
    detector: str


def find(cfg: SentinelSettings, resource: JSON, names: frozenset[str], where: str) -> list[Place]:
    """The places of ``resource`` (nested resources left out) whose clear strings an encrypt detector
    recognises, to be sealed by the encryption of ``resource``. A hit that is no primitive element's value
    (a string in a list of lists, under a key that is no element name or is a ``_`` twin) is refused."""
    places: list[Place] = []
    order = tuple(d for d in cfg.sealing if d != "name" or names)  # no names in the request: nothing to find
    if not order:
        return places

    def visit(text: str, at: Location, owner: JSON | None, key: str, index: int | None) -> None:
        detector = detect(text, names, order)
        if detector is None:
            return
        path = _render("", at)[1:]
        if owner is None or key.startswith("_") or not _ELEMENT_NAME.fullmatch(key):
            handle(cfg, where + "." + path, detector)  # cannot be sealed: refused (an encrypt detector)
            return
        places.append(Place(owner, key, index, path, detector))

    _walk(resource, visit, own_only=True)
    return places


# JSON keys come from the client: one that is not shaped like a FHIR element name (letters, at most two
# digits in a row: valueBase64Binary) could itself be a value, and the path goes into errors and logs.
_ELEMENT_NAME = re.compile(r"_?[A-Za-z](?:[A-Za-z]|\d{1,2}(?!\d)){0,63}")


def _render(where: str, at: Location) -> str:
    parts: list[str] = []
    while at is not None:
        at, key = at
        if isinstance(key, int):
            parts.append(f"[{key}]")
        else:
            parts.append(f".{key}" if _ELEMENT_NAME.fullmatch(key) else ".?")
    return where + "".join(reversed(parts))
