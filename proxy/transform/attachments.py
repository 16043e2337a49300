"""Attachments whose content lives outside the proxy (``Attachment.url`` to another host).

The proxy can encrypt ``Attachment.data`` and ``Binary`` because their bytes pass through
it; a URL to another host (an object store, a PACS, a telemedicine recording service)
points at content the proxy never sees and cannot protect. The policy decides
(``attachments: {external_urls: refuse}``) whether writes may carry such URLs. Relative
URLs (``Binary/123``), ``urn:`` references inside a transaction and URLs under the proxy's
own base stay allowed: their content goes through the proxy.
"""

from __future__ import annotations

from functools import cache

from proxy.outcome import FhirError
from proxy.policy.definitions import table
from proxy.transform.bodies import nested_resources
from proxy.transform.jsontypes import JSON


@cache
def attachment_paths(resource_type: str) -> frozenset[tuple[str, ...]]:
    """JSON key paths (list positions left out) that hold Attachments in ``resource_type``."""
    paths = set()
    for path, (types, *_rest) in table()["resources"].get(resource_type, {}).items():
        if "Attachment" in types:
            keys = path.split(".")
            if keys[-1].endswith("[x]"):
                keys[-1] = keys[-1][:-3] + "Attachment"
            paths.add(tuple(keys))
    return frozenset(paths)


def external_urls(resource: JSON, public_base: str) -> list[str]:
    """Paths of Attachments in ``resource`` whose ``url`` points outside the proxy (extensions included)."""
    wanted = attachment_paths(str(resource.get("resourceType")))
    rtype = resource.get("resourceType")
    found: list[str] = []
    stack: list[tuple[object, tuple[str, ...]]] = [(resource, ())]
    while stack:
        item, keys = stack.pop()
        if type(item) is list:
            stack.extend((value, keys) for value in item)
            continue
        if type(item) is not dict:
            continue
        if (keys in wanted or (keys and keys[-1] == "valueAttachment")) and _external(item.get("url"), public_base):
            found.append(f"{rtype}.{'.'.join(keys)}.url")
        for key, value in item.items():
            if key != "contained" and type(value) in (dict, list):  # contained resources are checked on their own
                stack.append((value, (*keys, key)))
    return sorted(set(found))


def _external(url: object, public_base: str) -> bool:
    if type(url) is not str or "://" not in url:
        return False  # relative (Binary/123), urn:uuid:, or absent
    return not url.startswith(public_base.rstrip("/") + "/")


def refuse_external(resource: JSON, public_base: str) -> None:
    """The policy says ``external_urls: refuse``: no Attachment in the write (or nested in it) may point away."""
    found = [
        path
        for r in (resource, *(r for r, _ in nested_resources(resource, "")))
        for path in external_urls(r, public_base)
    ]
    if found:
        raise FhirError(
            400,
            "business-rule",
            f"{found[0]}: the attachment's content is outside the proxy, where it cannot be encrypted; "
            "upload it as a Binary through the proxy and refer to it (the policy's attachments.external_urls)",
            found[:5],
        )
