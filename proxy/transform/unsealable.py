"""Extensions the proxy cannot encrypt apart from their element: refused unless the policy names them.

``extensions.unlisted: encrypt`` (or ``refuse``) closes the extension lists of a covered type: an
extension under a URL the policy does not name is encrypted (or refused), never stored in the clear
(DESIGN.md, property 7). Two kinds of extension cannot be encrypted on their own:

* an extension of a **primitive element** (``"_gender": {"extension": [...]}``): a primitive has no
  child elements a policy path could name, so the extension goes with the value — sealed with it when
  the policy encrypts the element (``birthDate`` with its ``birthTime``), left in the clear when not;
* a **modifier extension** (``modifierExtension``): servers and clients must be able to read a
  modifier, so the policy never encrypts one (the compiler refuses such paths).

Such an extension that is still in the clear after the resource was encrypted - at the same places
the closed defaults cover: the resource, its backbone elements, and the elements of a complex data
type one level down (``proxy.policy.closed.extension_locations``) - is refused with a ``400`` naming
its path and URL, never its value, unless its URL is in ``extensions.clear``. fhircrypt's own marks
and ``data-absent-reason`` (a code saying why a value is absent, which is also the mask of a sealed
primitive) pass.
"""

from __future__ import annotations

from functools import cache

from proxy.outcome import FhirError
from proxy.policy.closed import RESERVED_PREFIX, Closure, canonical, extension_locations
from proxy.transform import markers as mk
from proxy.transform.jsontypes import JSON

_DAR = canonical(mk.DAR_URL)


def refuse_unsealable(resource: JSON, rtype: str, closure: Closure, where: str) -> None:
    """Raise a 400 for the first extension of ``resource`` (already encrypted) that the closed defaults
    cannot encrypt and the policy does not name (see the module docstring); nothing under ``allow``."""
    if closure.extensions == "allow":
        return
    for keys in _locations(rtype, closure.nested_extensions):
        for obj, path in _objects(resource, keys, where):
            for key, value in obj.items():
                if key == "modifierExtension":
                    _check(value, f"{path}.modifierExtension", closure, "modifier extension")
                elif key.startswith("_"):
                    twins = value if type(value) is list else [value]
                    for i, twin in enumerate(twins):
                        if type(twin) is dict:
                            at = f"{path}.{key}[{i}]" if type(value) is list else f"{path}.{key}"
                            _check(twin.get("extension"), f"{at}.extension", closure, "primitive extension")


@cache
def _locations(rtype: str, nested: bool) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(p.split(".")) if p else () for p in extension_locations(rtype) if nested or not p)


def _objects(resource: JSON, keys: tuple[str, ...], where: str) -> list[tuple[JSON, str]]:
    """The objects at ``keys`` below ``resource`` (through lists), with their paths."""
    level = [(resource, where)]
    for key in keys:
        deeper: list[tuple[JSON, str]] = []
        for obj, path in level:
            value = obj.get(key)
            if type(value) is dict:
                deeper.append((value, f"{path}.{key}"))
            elif type(value) is list:
                deeper += [(item, f"{path}.{key}[{i}]") for i, item in enumerate(value) if type(item) is dict]
        level = deeper
    return level


def _check(extensions: object, path: str, closure: Closure, kind: str) -> None:
    for i, ext in enumerate(extensions if type(extensions) is list else ()):
        url = ext.get("url") if type(ext) is dict else None
        if type(url) is str and (url.startswith(RESERVED_PREFIX) or _named(canonical(url), closure)):
            continue
        at = f"{path}[{i}]"
        named = f"'{url[:200]}'" if type(url) is str else "none"
        remedy = (
            "a modifier extension is never encrypted (servers and clients must be able to read it)"
            if kind == "modifier extension"
            else "it is stored with its element, which the policy leaves in the clear: encrypt the element"
        )
        raise FhirError(
            400,
            "security",
            f"{at}: {kind} URL {named} is not named by the policy and cannot be encrypted on its own "
            f"(extensions.unlisted: {closure.extensions}); {remedy}, name the URL in extensions.clear, "
            "or remove the extension",
            [at],
        )


def _named(url: str, closure: Closure) -> bool:
    return url == _DAR or url in closure.clear_urls
