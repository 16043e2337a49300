"""Page through every resource of one type in ``_lastUpdated`` order, resumably.

Each page is ``GET <type>?_sort=_lastUpdated&_lastUpdated=ge<since>&_lastUpdated=lt<until>
&_count=<n>``: a keyset cursor rather than the server's own paging links, because it
survives restarts (an offset or a server-side cursor does not) and is unaffected by the
resources the run itself updates. Those move to the end of the order; ``until`` keeps
them out, so each is not read a second time: it is the server's own time when the walk
of the type began (the first searchset Bundle's ``meta.lastUpdated``, stamped by the
server itself, not by a load balancer in front of it) plus ``MARGIN`` for the clocks of
the nodes of a clustered server. Resources written after that went through
the proxies (or must be migrated by another run: see docs/migration.md). A server that
does not stamp its search Bundles gets no bound, and the walk reads its own writes
again at the end, finding them current.

Ties: many resources can share one ``lastUpdated`` (a transaction stamps all its
entries alike). Servers do not reliably sort by a second key — Medplum's sorts by the
*last* ``_sort`` key given, so ``_sort=_lastUpdated,_id`` is sorted by id — so the
tie-break is done here: the cursor keeps the ids already handled at ``since`` and skips
them. When a whole page is ties already handled (more than a page of resources share
the instant), the walk lists that instant alone (``ge<t>&le<t>&_sort=_id``, following
the server's next links) in passes until a pass finds nothing new, then continues with
``gt<t>``. Medplum's in-memory server matches no resource for ``eq<instant>``, hence
``ge``+``le``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta

from proxy.migrate.checkpoint import Cursor
from proxy.migrate.upstream import Upstream, UpstreamDown

MARGIN = timedelta(seconds=10)


def _last_updated(resource: dict) -> str:
    meta = resource.get("meta")
    value = meta.get("lastUpdated") if type(meta) is dict else None
    if type(value) is not str:
        raise UpstreamDown(f"{resource.get('resourceType')}/{resource.get('id')} has no meta.lastUpdated to page by")
    return value


def _bound(bundle: dict) -> str | None:
    """``until`` from the server's stamp on a searchset Bundle, or None when there is none."""
    stamp = (bundle.get("meta") or {}).get("lastUpdated")
    try:
        when = datetime.fromisoformat(stamp) + MARGIN  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _entries(bundle: dict | None, rtype: str) -> tuple[list[dict], str | None]:
    """The matched resources of a searchset page and its next link."""
    if type(bundle) is not dict or bundle.get("resourceType") != "Bundle":
        raise UpstreamDown(f"search of {rtype} did not return a Bundle")
    out = []
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") if type(entry) is dict else None
        mode = (entry.get("search") or {}).get("mode", "match") if type(entry) is dict else None
        if type(resource) is dict and resource.get("resourceType") == rtype and mode == "match":
            out.append(resource)
    nxt = next((link.get("url") for link in bundle.get("link") or [] if link.get("relation") == "next"), None)
    return out, nxt


async def _search(up: Upstream, url: str, rtype: str) -> tuple[list[dict], str | None, str | None]:
    """The page's matches, its next link and the bound its stamp gives."""
    status, body = await up.request("GET", url)
    if status != 200:
        raise UpstreamDown(f"search of {rtype}: HTTP {status}")
    found, nxt = _entries(body, rtype)
    return found, nxt, _bound(body)  # type: ignore[arg-type]


async def pages(up: Upstream, rtype: str, cursor: Cursor, size: int) -> AsyncIterator[tuple[list[dict], Cursor]]:
    """Yield (resources not yet handled, the cursor once they are) until the type is exhausted."""
    while not cursor.done:
        query = f"{rtype}?_sort=_lastUpdated&_count={size}"
        if cursor.since:
            query += f"&_lastUpdated={'gt' if cursor.after else 'ge'}{_quote(cursor.since)}"
        if cursor.until:
            query += f"&_lastUpdated=lt{_quote(cursor.until)}"
        found, nxt, stamp = await _search(up, query, rtype)
        until = cursor.until or stamp
        seen = set(cursor.seen) if not cursor.after else set()
        fresh = [r for r in found if not (_last_updated(r) == cursor.since and r.get("id") in seen)]
        if fresh:
            last = _last_updated(fresh[-1])
            ties = {r["id"] for r in fresh if _last_updated(r) == last}
            if last == cursor.since and not cursor.after:
                ties |= seen
            cursor = Cursor(last, sorted(ties), False, nxt is None, until)
            yield fresh, cursor
        elif found and nxt is not None:  # a full page of ties already handled
            async for batch, moved in _tie_group(up, rtype, cursor, size):
                cursor = moved
                yield batch, cursor
        else:
            cursor = Cursor(cursor.since, cursor.seen, cursor.after, True, until)
            yield [], cursor


async def _tie_group(up: Upstream, rtype: str, cursor: Cursor, size: int) -> AsyncIterator[tuple[list[dict], Cursor]]:
    """Every resource last updated exactly at ``cursor.since``, in passes until one finds nothing new."""
    since = cursor.since or ""
    seen = set(cursor.seen)
    while True:
        url: str | None = (
            f"{rtype}?_lastUpdated=ge{_quote(since)}&_lastUpdated=le{_quote(since)}&_sort=_id&_count={size}"
        )
        progressed = False
        while url:
            found, url, _ = await _search(up, url, rtype)
            fresh = [r for r in found if r.get("id") not in seen and _last_updated(r) == since]
            if fresh:
                progressed = True
                seen |= {r["id"] for r in fresh}
                yield fresh, Cursor(since, sorted(seen), False, False, cursor.until)
        if not progressed:
            yield [], Cursor(since, [], True, False, cursor.until)
            return


def _quote(instant: str) -> str:
    return instant.replace("+", "%2B")


async def history(up: Upstream, rtype: str, size: int) -> AsyncIterator[list[dict]]:
    """Every version in the type's ``_history`` (newest first), for the retirement scan's ``--history``.

    Follows the server's ``next`` links; a server that gives none (Medplum) is paged with
    ``_offset``. New writes during the scan shift offsets towards duplicates, never gaps,
    and duplicates are dropped by (id, versionId). A full page without a next link whose
    offset page brings nothing new means the server ignores ``_offset``: the scan stops
    with an error rather than claim it saw everything.
    """
    url: str | None = f"{rtype}/_history?_count={size}"
    seen: set[tuple[object, object]] = set()  # (id, versionId) as the server sent them
    offset = 0
    while url:
        status, body = await up.request("GET", url)
        if status != 200 or type(body) is not dict or body.get("resourceType") != "Bundle":
            raise UpstreamDown(f"history of {rtype}: HTTP {status}")
        entries = [e for e in body.get("entry") or [] if type(e) is dict]
        versions = [e["resource"] for e in entries if type(e.get("resource")) is dict]
        new = [v for v in versions if (v.get("id"), (v.get("meta") or {}).get("versionId")) not in seen]
        seen |= {(v.get("id"), (v.get("meta") or {}).get("versionId")) for v in new}
        if new:
            yield new
        nxt = next((link.get("url") for link in body.get("link") or [] if link.get("relation") == "next"), None)
        if nxt:
            url = nxt
        elif len(entries) < size:
            url = None
        elif offset and not new:
            raise UpstreamDown(f"history of {rtype} cannot be paged (no next link, _offset ignored)")
        else:
            offset += size
            url = f"{rtype}/_history?_count={size}&_offset={offset}"
