"""Search URLs inside resources, rewritten like searches before the resource is stored.

A resource can carry a search in any string: a conditional reference (``"reference":
"Patient?identifier=...|<NIK>"``, resolved by the server in a transaction), a stored query
(``Subscription.criteria``, the ``entry.request.url`` and ``ifNoneExist`` of a stored Bundle,
``Bundle.link.url`` of a stored searchset, any ``uri``/``url`` element). Each is checked and
rewritten by the rules of a search of its type (``guard.check_search``): search values on
encrypted elements become blind-index tokens, and what cannot be handled is refused, so no
covered value is stored in a query. A string is taken for a search when it is, in full,
``[<absolute base>/]<ResourceType>[/_search]?<query>``; a ``reference`` holding ``?`` must be one.
"""

from __future__ import annotations

import re
from typing import Any

from proxy import fhirgrammar as fg
from proxy.outcome import FhirError
from proxy.policy.definitions import resource_types
from proxy.transform import guard, jsonnum
from proxy.transform.search import Searcher

_SEARCH_URL = re.compile(
    rf"(?P<prefix>(?:[A-Za-z][A-Za-z0-9+.\-]*://[^?#\s]*/)?(?P<type>{fg.TYPE_RE})(?:/_search)?)\?(?P<query>[^#\s]*)"
)


def rewrite_search_urls(resource: dict[str, Any], searcher: Searcher, where: str) -> None:
    """Rewrite, in place, every string of ``resource`` that is a search on a resource type."""
    serialised = jsonnum.dumps(resource)  # escapes neither '?' nor a key: a C-speed look first
    if b"?" not in serialised and b"ifNoneExist" not in serialised:
        return  # no search anywhere: most writes (the walk costs ten times the look)
    stack: list[tuple[object, str]] = [(resource, where)]
    while stack:
        item, at = stack.pop()
        if type(item) is dict:
            for key, value in item.items():
                if type(value) is str and "?" in value:
                    item[key] = _rewritten(key, value, searcher, f"{at}.{key}")
                elif type(value) is str and key == "ifNoneExist":
                    item[key] = _if_none_exist(item, value, searcher, f"{at}.{key}")
                elif type(value) in (dict, list):
                    stack.append((value, f"{at}.{key}"))
        elif type(item) is list:
            stack.extend((value, f"{at}[{i}]") for i, value in enumerate(item))


def _rewritten(key: str, value: str, searcher: Searcher, where: str) -> str:
    found = _SEARCH_URL.fullmatch(value)
    if found is None or found["type"] not in resource_types():
        if key == "reference":
            raise FhirError(
                400, "invalid", f"{where}: a conditional reference must start with a resource type", [where]
            )
        if key == "ifNoneExist":
            raise FhirError(400, "invalid", f"{where}: a query cannot hold '?'", [where])
        return value  # not a search
    if key == "reference" and found["prefix"] != found["type"]:
        raise FhirError(400, "invalid", f"{where}: a conditional reference must start with a resource type", [where])
    params = guard.check_search(found["type"], guard.parse_query(found["query"]), searcher, where)
    return f"{found['prefix']}?{guard.encode_query(params)}"


def _if_none_exist(request: dict[str, Any], query: str, searcher: Searcher, where: str) -> str:
    """A stored Bundle entry's ``ifNoneExist``: a query on the type its ``url`` names."""
    url = request.get("url")
    rtype = url.split("?", 1)[0].split("/", 1)[0] if type(url) is str else None
    if rtype not in resource_types():
        raise FhirError(400, "invalid", f"{where}: needs a url that names a resource type", [where])
    return guard.encode_query(guard.check_search(rtype, guard.parse_query(query), searcher, where))
