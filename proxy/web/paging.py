"""Paging links as proxy links bound to the caller who searched.

A server's paging links (``next``, ``previous``, ``first``, ``last``) may carry no search values at
all - HAPI's ``?_getpages=<handle>`` names a result set kept at the server - so the checks the
proxy makes on a query (the caller's groups, its compartment) cannot be made on them again. The
proxy therefore hands out signed links of its own instead (``[base]/$fhircrypt-link/page/<token>``,
like Bulk export links): each names the upstream URL, the searched type and the subject of the
caller who made the search, and is followed only for that subject, with a fresh access decision
for that type, and only on the upstream's own origin. Every page is judged and decrypted like the
first. The ``self`` link stays a plain link to the proxy: it repeats the (rewritten) search.

A link also names the chained name parameters of the search as they were forwarded (chains, never
names), so that every page is post-filtered (``proxy.transform.namefilter``) even where the server's
link does not repeat the query (HAPI's ``_getpages``).
"""

from __future__ import annotations

from collections.abc import Iterator

import orjson

from proxy.outcome import FhirError
from proxy.transform.interactions import Interaction
from proxy.web.bulk import LINKS
from proxy.web.runtime import Runtime

PAGE = "page"
_NAVIGATION = frozenset({"next", "previous", "prev", "first", "last"})
PAGED = frozenset({"searchset", "history"})  # the Bundle types that page


def _unsigned(rt: Runtime, payload: dict) -> Iterator[dict]:
    """The navigation links of a searchset or history Bundle that point into the upstream's base."""
    if payload.get("resourceType") != "Bundle" or payload.get("type") not in PAGED:
        return
    links = payload.get("link")
    for link in links if type(links) is list else ():
        url = link.get("url") if type(link) is dict else None
        if link and link.get("relation") in _NAVIGATION and type(url) is str and url.startswith(rt.upstream_base):
            yield link


def sign_page_links(
    rt: Runtime, payload: dict, subject: str | None, it: Interaction, names: list[tuple[str, str]]
) -> None:
    """Replace the navigation links of a searchset or history Bundle that point into the upstream's
    base with proxy links bound to ``subject`` (in place), naming the search's chained name parameters
    ``names``; ``self`` is left alone."""
    for link in _unsigned(rt, payload):
        assert rt.client is not None
        url = str(rt.client.resolve(link["url"]))
        claim = orjson.dumps([subject, it.kind, it.level, it.resource_type, url, names])
        link["url"] = f"{rt.public_base}/{LINKS}/{PAGE}/{rt.keyring.link_signer.sign(f'{PAGE} {claim.decode()}')}"


def has_page_links(rt: Runtime, payload: dict) -> bool:
    """Whether :func:`sign_page_links` would sign a link of ``payload``."""
    return next(_unsigned(rt, payload), None) is not None


def open_page_link(rt: Runtime, token: str) -> tuple[str | None, Interaction, str, list[tuple[str, str]] | None]:
    """The subject the link was minted for, the interaction it continues, the upstream URL and the chained
    name parameters it names (None for a link minted before links named them); 404 for a link this proxy
    did not mint (or that expired)."""
    signed = rt.keyring.link_signer.open(token)
    if signed is None or not signed.startswith(PAGE + " "):
        raise FhirError(404, "not-found", "unknown or expired paging link")
    subject, kind, level, rtype, url, *rest = orjson.loads(signed[len(PAGE) + 1 :])
    names = [(name, value) for name, value in rest[0]] if rest else None
    return subject, Interaction(kind, level, rtype), url, names
