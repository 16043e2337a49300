"""The URLs and codes fhircrypt writes into stored resources (its at-rest vocabulary)."""

import re
from urllib.parse import unquote

from proxy.transform.jsontypes import JSON

CANONICAL = "https://fhircrypt.dev/fhir"
ENVELOPE_URL = CANONICAL + "/StructureDefinition/envelope"
CIPHERTEXT_URL = CANONICAL + "/StructureDefinition/ciphertext"
GROUP_URL = CANONICAL + "/StructureDefinition/sealed"  # format v2: one per access group, beside the envelope
TAG_SYSTEM = CANONICAL + "/CodeSystem/fhircrypt"
TAG_CODE = "encrypted"
STRAY_CODE = "sentinel-sealed"  # beside TAG_CODE: the sentinel sealed values in clear elements (records.py)
SHREDDED_CODE = "shredded"  # on reads only: the record's patient key was destroyed (crypto-shredding)

DAR_URL = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
DAR_SYSTEM = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
MASKED_SECURITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
NEUTRAL_DIV = '<div xmlns="http://www.w3.org/1999/xhtml"><p>Protected content (fhircrypt)</p></div>'


def dar_masked() -> JSON:
    return {"url": DAR_URL, "valueCode": "masked"}


def masked_concept() -> JSON:
    return {"coding": [{"system": DAR_SYSTEM, "code": "masked", "display": "Masked"}]}


def ciphertext_extension(ct: str) -> JSON:
    return {"url": CIPHERTEXT_URL, "valueString": ct}


def encrypted_form(ct: str) -> JSON:
    """An element that holds nothing but the mask marker and its ciphertext."""
    return {"extension": [dar_masked(), ciphertext_extension(ct)]}


def masked_form() -> JSON:
    """What a caller without the group gets; in format v2 also what is stored where an element sealed
    in its group's ciphertext was."""
    return {"extension": [dar_masked()]}


def sealed_form(ct: str | None) -> JSON:
    """The stored form of a sealed element: with its own ciphertext (v1, and values the sentinel
    sealed), or the mask marker alone (``None``: sealed in its group's ciphertext, format v2)."""
    return masked_form() if ct is None else encrypted_form(ct)


def group_extension(ct: str) -> JSON:
    return {"url": GROUP_URL, "valueString": ct}


def is_masked_concept(value: object) -> bool:
    """``dataAbsentReason`` holding the masked code: where a whole ``value[x]`` was sealed in its group."""
    codings = value.get("coding") if type(value) is dict else None
    return type(codings) is list and any(
        type(c) is dict and c.get("code") == "masked" and c.get("system") == DAR_SYSTEM for c in codings
    )


def has_mask_marker(obj: object) -> bool:
    """Whether ``obj``'s extensions hold the data-absent-reason ``masked`` marker."""
    exts = obj.get("extension") if type(obj) is dict else None
    return type(exts) is list and any(
        type(e) is dict and e.get("url") == DAR_URL and e.get("valueCode") == "masked" for e in exts
    )


def value_holder(item: JSON) -> str | None:
    """Where a *simple* extension keeps the markers when the whole extension is encrypted: inside its
    ``value[x]`` (``valueAddress`` holding only the marker extensions, ``_valueString`` for a primitive),
    so the stored extension keeps a value as its definition requires. None for a complex extension
    (sub-extensions, no value), whose markers stay on the extension itself."""
    keys = [k for k in item if k.startswith("value")]
    if len(keys) != 1 or "extension" in item:
        return None
    return keys[0] if type(item[keys[0]]) is dict else "_" + keys[0]


def held_markers(item: JSON, keep: tuple[str, ...]) -> str | None:
    """The key of a stored extension's value holder (see :func:`value_holder`), or None."""
    rest = [k for k in item if k not in keep]
    return rest[0] if len(rest) == 1 and rest[0].lstrip("_").startswith("value") else None


def neutral_narrative() -> JSON:
    return {"status": "generated", "div": NEUTRAL_DIV}


BLIND_INDEX_BASE = CANONICAL + "/blind-index/"  # index format v1: + <resource type>/<field id>/<search parameter>
INDEX_BASE = CANONICAL + "/i/"  # index format v2 (written): + <field id>/<search parameter>
INDEX_BASES = (BLIND_INDEX_BASE, INDEX_BASE)  # for str.startswith: an index identifier of either format


def index_system(label: str) -> str:
    """The v2 index system of a label ``<type>/<field id>/<parameter>``: the type is left out (the
    identifier sits in a resource of that type, and the type is in the token's key), to keep it short."""
    return INDEX_BASE + label.partition("/")[2]


_RESERVED = "fhircrypt.dev/fhir"  # CANONICAL without its scheme
CHAIN_MARK = "fhircrypt~"  # starts every name chain (transform/namechain.py); reserved like the namespace
_SLASHES = re.compile(r"/{2,}")


def mentions_reserved(text: str) -> bool:
    """Whether ``text`` names fhircrypt's namespace in any spelling a server might treat as the same:
    any letter case, percent-encoded, with repeated slashes or another scheme. Everything the proxy
    recognises as its own (blind-index systems, envelope and ciphertext URLs, tags) is compared this
    way, so that a variant the proxy does not recognise cannot match at the server either."""
    if "%" in text:
        text = unquote(text)
    text = text.lower()
    return _RESERVED in _SLASHES.sub("/", text) or CHAIN_MARK in text


def shredded_tag() -> JSON:
    return {"system": TAG_SYSTEM, "code": SHREDDED_CODE, "display": "crypto-shredded: the patient key was destroyed"}


def add_tag(resource: JSON, tag: JSON) -> None:
    meta = resource.get("meta")
    if type(meta) is not dict:
        meta = resource["meta"] = {}
    tags = meta.get("tag")
    meta["tag"] = [*(tags if type(tags) is list else ()), tag]
