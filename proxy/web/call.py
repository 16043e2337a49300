"""One request on its way through the proxy: the context every step of the pipeline reads and adds to.

The steps (``proxy.web.app.handle``) fill it in order - classified, authenticated and decided,
the request transformed, forwarded, the answer transformed - and the accounting middleware
(``proxy.web.accounting``) reads it at the end for the audit record, the metrics and the log.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from proxy.auth.decision import Decision
from proxy.transform import guard
from proxy.transform.interactions import Interaction
from proxy.transform.namefilter import NameQuery
from proxy.transform.search import Searcher
from proxy.web.auditing import Exchange
from proxy.web.runtime import Runtime


@dataclass
class Call:
    rt: Runtime  # the runtime as it was when the request arrived (a reload does not change it midway)
    request: web.Request
    request_id: str  # the correlation id: the client's X-Request-ID when usable, else the proxy's own
    started: float
    exchange: Exchange = field(default_factory=Exchange)  # what the audit record is made of
    status: int = 500  # what is counted, logged and audited
    segments: list[str] = field(default_factory=list)  # the path below the FHIR base
    it: Interaction | None = None
    decision: Decision | None = None  # made once, by proxy.auth.decision, before anything is forwarded
    searcher: Searcher | None = None
    forwarding: guard.Forwarding | None = None  # what goes upstream instead of the client's query
    body: bytes | None = None  # the request body as it goes upstream (encrypted, rewritten)
    upstream_url: str | None = None  # a proxy paging link's upstream URL, forwarded as it is
    page_names: list[tuple[str, str]] | None = None  # the chained name parameters that paging link names
    entry_names: dict[int, NameQuery] = field(default_factory=dict)  # a batch's chained name searches, by entry

    @property
    def decided(self) -> Decision:
        assert self.decision is not None, "no step may run before the access decision"
        return self.decision

    @property
    def interaction(self) -> Interaction:
        assert self.it is not None
        return self.it


CALL = web.RequestKey("fhircrypt_call", Call)  # where the accounting middleware puts the request's Call


def call_of(request: web.Request) -> Call:
    return request[CALL]
