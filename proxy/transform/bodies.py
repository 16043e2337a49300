"""Find every resource in a FHIR JSON body and encrypt or decrypt it by its own type.

Resources can appear only in these R4 elements: the body itself, ``DomainResource.
contained``, ``Bundle.entry.resource``, ``Bundle.entry.response.outcome`` and
``Parameters.parameter.resource`` (and ``part``, recursively). Walking just those
keeps reads fast and still reaches every resource.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from proxy.auth.decision import Decision
from proxy.crypto.envelope import KeyLookup
from proxy.keymgmt.keyring import Keyring
from proxy.outcome import FhirError
from proxy.policy.compiler import CompiledPolicy, ResourcePolicy
from proxy.transform import jsonnum
from proxy.transform.indexes import index_identifiers
from proxy.transform.jsontypes import JSON
from proxy.transform.markers import CANONICAL
from proxy.transform.masked import has_masked_label
from proxy.transform.records import (
    Grants,
    ReadReport,
    ShapeError,
    UnlistedRefused,
    decrypt_resource,
    encrypt_resource,
    scrub_markers,
)
from proxy.transform.unsealable import refuse_unsealable
from proxy.transform.validation import Validation, validator


def nested_resources(resource: JSON, path: str) -> Iterator[tuple[JSON, str]]:
    """Resources held inside ``resource`` (not itself), with their FHIRPath-like locations."""
    for i, item in enumerate(_list(resource.get("contained"))):
        if type(item) is dict:
            yield item, f"{path}.contained[{i}]"
            yield from nested_resources(item, f"{path}.contained[{i}]")
    rtype = resource.get("resourceType")
    if rtype == "Bundle":
        for i, entry in enumerate(_list(resource.get("entry"))):
            if type(entry) is not dict:
                continue
            inner = entry.get("resource")
            if type(inner) is dict:
                yield inner, f"{path}.entry[{i}].resource"
                yield from nested_resources(inner, f"{path}.entry[{i}].resource")
            response = entry.get("response")
            if type(response) is dict and type(response.get("outcome")) is dict:
                yield response["outcome"], f"{path}.entry[{i}].response.outcome"
    elif rtype == "Parameters":
        yield from _parameter_resources(resource.get("parameter"), f"{path}.parameter")


def _parameter_resources(params: object, path: str) -> Iterator[tuple[JSON, str]]:
    for i, param in enumerate(_list(params)):
        if type(param) is not dict:
            continue
        inner = param.get("resource")
        if type(inner) is dict:
            yield inner, f"{path}[{i}].resource"
            yield from nested_resources(inner, f"{path}[{i}].resource")
        yield from _parameter_resources(param.get("part"), f"{path}[{i}].part")


def _list(value: object) -> list[Any]:
    return value if type(value) is list else []


# orjson parses 1024 levels but serialises only 254, and the proxy serialises everything it
# forwards or answers (a Bundle around a resource adds three levels): deeper bodies are refused.
MAX_DEPTH = 200


def too_deep(value: object, limit: int = MAX_DEPTH) -> bool:
    """Whether JSON ``value`` nests objects and arrays more than ``limit`` levels deep. Level by level,
    with no depth carried per item: every write's body is walked, a 50-entry transaction's thousands of
    objects."""
    level = [value]
    for _ in range(limit):
        deeper: list[object] = []
        for item in level:
            if type(item) is dict:
                deeper += [v for v in item.values() if type(v) is dict or type(v) is list]
            elif type(item) is list:
                deeper += [v for v in item if type(v) is dict or type(v) is list]
        if not deeper:
            return False
        level = deeper
    return True


def shape_refusal(where: str, exc: ShapeError) -> FhirError:
    """A covered location holding the wrong JSON type, or (under ``refuse``) an identifier system or
    extension URL the policy does not name: a 400 naming the path (and that system), never the value."""
    path = f"{where}.{exc.path}"
    if isinstance(exc, UnlistedRefused):
        named = f"'{exc.named[:200]}'" if exc.named is not None else "none"
        setting = "identifiers.unlisted_systems" if exc.what.startswith("identifier") else "extensions.unlisted"
        return FhirError(
            400, "security", f"{path}: {exc.what} {named} is not named by the policy ({setting}: refuse)", [path]
        )
    return FhirError(400, "structure", f"{path}: unexpected JSON type for an encrypted element", [path])


Wrap = tuple[str, bytes] | None  # (key id, key) wrapping a record's data key; None: the keyring's primary
WrapFor = Callable[[JSON], Wrap]  # the wrapping key chosen for one plaintext resource (per-patient keys)


def decrypt_body(
    body: JSON, policy: CompiledPolicy, keyring: KeyLookup, decision: Decision, report: ReadReport
) -> None:
    """Decrypt (or mask) every covered resource anywhere in a response body, in place.

    Only an access :class:`~proxy.auth.decision.Decision` says what is decrypted: it is asked
    before each resource is decrypted, so it looks only at what stays in the clear (type, ids,
    references - enough for patient compartments). Contained resources are part of their
    container and get its groups: a contained Patient's local id names nobody's compartment.
    """
    if type(decision) is not Decision:
        raise TypeError("decrypt_body needs the request's access decision")
    stack: list[tuple[JSON, object]] = [(body, _UNDECIDED)]
    while stack:
        resource, inherited = stack.pop()
        rtype = resource.get("resourceType")
        groups: Grants = decision.groups(resource) if inherited is _UNDECIDED else inherited  # type: ignore[assignment]
        rp = policy.resources.get(rtype) if type(rtype) is str else None
        if rp is not None:
            decrypt_resource(resource, rp, keyring, groups, policy.unenveloped, report)
        for item in _list(resource.get("contained")):
            if type(item) is dict:
                stack.append((item, groups))
        if rtype == "Bundle":
            for entry in _list(resource.get("entry")):
                if type(entry) is not dict:
                    continue
                if type(entry.get("resource")) is dict:
                    stack.append((entry["resource"], _UNDECIDED))
                response = entry.get("response")
                if type(response) is dict and type(response.get("outcome")) is dict:
                    stack.append((response["outcome"], _UNDECIDED))
        elif rtype == "Parameters":
            stack.extend((inner, _UNDECIDED) for inner in _parameter_tops(resource.get("parameter")))


_UNDECIDED = object()  # a resource judged on its own (not contained in another)


def _parameter_tops(params: object) -> Iterator[JSON]:
    """The resources of ``Parameters.parameter`` (and ``part``), not what those contain."""
    for param in _list(params):
        if type(param) is dict:
            if type(param.get("resource")) is dict:
                yield param["resource"]
            yield from _parameter_tops(param.get("part"))


_MARKER = (CANONICAL + "/StructureDefinition/").encode()  # the envelope, ciphertext and group extensions


def serialise_for_client(payload: object, report: ReadReport, where: str) -> bytes:
    """JSON for the client after ``decrypt_body`` (a body, or a list of a streamed page's entries);
    ciphertext the policy does not point at (an element removed from the policy, or placed by someone
    else) is removed and reported, never returned."""
    out = jsonnum.dumps(payload)
    if _MARKER in out:  # a marker URL, or only text naming it (a validator's message)
        removed = scrub_markers(payload)
        if removed:
            report.fail(where, f"{removed} ciphertext(s) outside the policy's elements removed")
            out = jsonnum.dumps(payload)
    return out


# JSON escapes that could spell a type name, fhircrypt's URL or the upstream's base so that a byte search
# misses them (``\u0050atient``, ``https:\/\/``); the others only write quotes, backslashes and control
# characters.
_HIDING_ESCAPES = (b"u", b"/")


def _hiding_escape(raw: bytes) -> bool:
    r"""Whether ``raw`` holds a ``\u`` or ``\/`` escape: one ``find`` per backslash (a narrative's ``\"``
    is common) is several times faster than searching for each two-byte escape across the whole body."""
    at = raw.find(b"\\")
    while at >= 0:
        if raw[at + 1 : at + 2] in _HIDING_ESCAPES:
            return True
        at = raw.find(b"\\", at + 2)  # past the escaped character: an escaped backslash escapes nothing more
    return False


_OWN_ARTEFACTS = CANONICAL.split("://", 1)[1].encode()  # envelope, ciphertext, tag and index systems
_RESOURCE_TYPE = re.compile(rb'"resourceType"\s*:\s*"([^"]*)"')


def untouched(raw: bytes, policy: CompiledPolicy) -> bool:
    """Whether a JSON body holds nothing the policy acts on, judged on its bytes before any parse: no
    resource of a covered type, none of fhircrypt's artefacts (ciphertext left where the policy no longer
    points is removed only on the parsing path), and no escape that could hide either. Such a body needs
    no decryption, masking or scrubbing and no re-serialisation. A false "no" costs only speed."""
    if _OWN_ARTEFACTS in raw or _hiding_escape(raw):  # stored ciphertext: found near the start
        return False
    covered = policy.resources
    return not covered or not any(t.decode("utf-8", "replace") in covered for t in _RESOURCE_TYPE.findall(raw))


def covers_any(value: object, policy: CompiledPolicy) -> bool:
    """Whether a resource of a covered type (or with a resourceType that is not a string) appears anywhere
    in ``value``, in any element and at any depth, so that no slot a resource could hide in is missed."""
    covered = policy.resources
    if not covered:
        return False
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            if "resourceType" in item:
                rtype = item["resourceType"]
                if type(rtype) is not str or rtype in covered:
                    return True
            stack.extend(v for v in item.values() if type(v) is dict or type(v) is list)
        elif type(item) is list:
            stack.extend(v for v in item if type(v) is dict or type(v) is list)
    return False


def encrypt_for_write(
    resource: JSON,
    policy: CompiledPolicy,
    keyring: Keyring,
    validate: Validation,
    wrap_for: WrapFor | None = None,
    names: frozenset[str] = frozenset(),
) -> None:
    """Validate and encrypt a resource a client wants to store (in place).

    Validation (``validate``: structure, full or off) is for what the server can no longer check once it is
    encrypted: a write that holds no resource of a covered type reaches the server as sent, and the server
    validates it.

    Resources nested inside it (contained, the entries of a stored Bundle, Parameters)
    are encrypted by their own type's policy, each with its own envelope, deepest first.
    ``wrap_for`` picks a patient key per resource; a nested resource without one of its
    own uses its container's. ``names``: words of the names the request encrypts (the sentinel's
    name detector seals them where they appear in clear elements, if it encrypts).
    """
    rtype = resource.get("resourceType")
    if has_masked_label(resource):
        raise FhirError(
            409,
            "conflict",
            f"{rtype} carries the MASKED security label: it was read with elements "
            "masked, and only an update of that resource can write it back",
            [f"{rtype}.meta.security"],
        )
    check = validator(validate)
    if check is not None and covers_any(resource, policy):  # otherwise the server receives, and validates, it
        check(resource)
    nested = list(nested_resources(resource, rtype if type(rtype) is str else "?"))
    top = wrap_for(resource) if wrap_for is not None else None
    for inner, where in reversed(nested):  # deepest first: an outer contained resource is sealed last
        inner_rp = policy.resources.get(inner.get("resourceType"))  # type: ignore[arg-type]
        if inner_rp is not None:
            wrap = (wrap_for(inner) if wrap_for is not None else None) or top
            _seal(inner, inner_rp, keyring, where, with_indexes=False, wrap=wrap, names=names)
            refuse_unsealable(inner, inner_rp.type, policy.closure, where)
    rp = policy.resources.get(rtype)  # type: ignore[arg-type]
    if rp is not None:
        _seal(resource, rp, keyring, rtype, with_indexes=True, wrap=top, names=names)  # type: ignore[arg-type]
        refuse_unsealable(resource, rp.type, policy.closure, rp.type)


def _seal(
    resource: JSON,
    rp: ResourcePolicy,
    keyring: Keyring,
    where: str,
    with_indexes: bool,
    wrap: Wrap,
    names: frozenset[str] = frozenset(),
) -> None:
    """Encrypt one resource; blind indexes only for the resource stored at the top (searches find those)."""
    try:
        index_ids = index_identifiers(resource, rp, keyring.indexer) if with_indexes else []
        encrypt_resource(resource, rp, keyring, wrap, names)
    except ShapeError as exc:
        raise shape_refusal(where, exc) from None
    if index_ids:
        existing = resource.get("identifier") or []
        if type(existing) is not list:
            raise FhirError(400, "structure", f"{where}.identifier must be a list", [f"{where}.identifier"])
        resource["identifier"] = [*existing, *index_ids]
