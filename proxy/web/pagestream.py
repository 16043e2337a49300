"""Large search pages, histories and ``$everything`` answers, transformed entry by entry while they arrive.

An upstream answer larger than ``stream_threshold`` that is a searchset, history or collection Bundle
is not read whole: :class:`~proxy.transform.bundlestream.BundleSplitter` cuts it into its top-level
members and its entries, and each batch of entries (those one upstream chunk completed) is judged
by ``proxy.web.answers.judge`` inside a Bundle shell - screened, decrypted with the caller's
grants, audited, its upstream URLs rewritten - and written to the client. Memory holds the first
``stream_threshold`` bytes (read to choose the path), one chunk, the members before the entries
and one batch (``max_response`` bounds each entry), not the page; aiohttp's writes wait while the
client is slow, and the upstream is read no faster.

Once the headers are out the status cannot change, so the response promises only what is known
up front: the upstream's status and headers (ETag, Last-Modified), no Content-Length. What goes wrong
afterwards - the upstream breaks off, broken or too deeply nested JSON, an entry over the limit,
a canary with ``action: block``, an internal error - cuts the connection (``bulk.StreamAborted``): the
client sees a broken transfer, never a well-formed but truncated Bundle (the closing brackets go out
last). What the whole-body path reports in headers is said in the body instead: integrity failures
as a last entry holding an OperationOutcome (``search.mode`` ``outcome``); masked elements carry
their MASKED label in each resource as always, and the counts are in the audit record and metrics.
A searchset's ``total`` is written after the entries when the decision may screen them
(``answers.total_waits``), and only if none was removed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import aiohttp
from aiohttp import web

from proxy.outcome import FhirError, Issue, operation_outcome
from proxy.transform import guard
from proxy.transform.bundlestream import ENTRIES, ENTRIES_END, ENTRY, MEMBER, BundleSplitter, Part, SplitError
from proxy.upstream.client import CHUNK
from proxy.web import headers as hdr
from proxy.web.access import alarm
from proxy.web.answers import account_name_filter, answer_whole, judge, log_integrity, serialise, total_waits
from proxy.web.bulk import StreamAborted
from proxy.web.call import Call

log = logging.getLogger("fhircrypt")
STREAMED = frozenset({"searchset", "history", "collection"})  # the Bundle types answered entry by entry
_OPENED = object()  # the splitter's answer to "which Bundle is it?" once the entries began unnamed


async def answer(
    call: Call,
    forwarding: guard.Forwarding,
    resp: aiohttp.ClientResponse,
    head: bytes,
    status: int,
    ctype: str,
    headers,
) -> web.StreamResponse | None:
    """Stream the answer whose first bytes are ``head`` (the rest still in ``resp``); None when it is not
    a Bundle this module streams, for the caller to read it whole."""
    rt = call.rt
    if (
        status != 200
        or ctype not in hdr.JSON_TYPES
        or forwarding.raw_binary
        or call.interaction.kind == "capabilities"
        or "Bundle" in rt.policy.resources  # a stored-Bundle policy would judge the page itself: read whole
    ):
        return None
    splitter = BundleSplitter(rt.settings.max_response)
    whole = memoryview(head)  # fed in chunk-sized views, not copies
    pieces = [whole[at : at + CHUNK] for at in range(0, len(head), CHUNK)]
    parts: list[Part] = []
    bundle_type = None
    try:
        while pieces and bundle_type is None:
            parts += splitter.feed(pieces.pop(0))
            bundle_type = _bundle_type(parts, bool(pieces))
    except SplitError as exc:
        raise FhirError(502, "structure", f"the upstream answered with {exc}") from None
    if (
        type(bundle_type) is not str
        or bundle_type not in STREAMED
        or (bundle_type == "collection" and forwarding.subset is not None)
    ):
        return None  # not a page (or a subset on a collection, which applies to the Bundle itself)
    page = _Page(call, forwarding, status, headers, str(bundle_type))
    return await page.run(splitter, parts, pieces, resp)


def _bundle_type(parts: list[Part], more: bool) -> object:
    """The Bundle's ``type`` once ``resourceType`` and ``type`` came before the entries; None while
    undecided and ``more`` bytes wait; ``_OPENED`` when it cannot be a streamed Bundle."""
    members: dict[str, Any] = {}
    for kind, value in parts:
        if kind != MEMBER:
            return _OPENED
        members[value[0]] = value[1]
        if "resourceType" in members and "type" in members:
            return members["type"] if members["resourceType"] == "Bundle" else _OPENED
    return None if more else _OPENED


class _Page:
    """One streamed answer: the members before the entries, the batch, and what was written."""

    def __init__(self, call: Call, forwarding: guard.Forwarding, status: int, headers, bundle_type: str) -> None:
        self.call, self.forwarding, self.status, self.headers = call, forwarding, status, headers
        self.type = bundle_type
        self.head: dict[str, Any] = {}  # members before the entries, then (if no entry array) all of them
        self.tail: dict[str, Any] = {}  # members after the entries
        self.total: tuple[Any] | None = None  # a total held back until the entries are judged
        self.batch: list[Any] = []
        self.out: web.StreamResponse | None = None
        self.written = 0  # entries written
        self.removed = 0  # entries the access decision or the name filter removed
        self.hits: list[str] = []

    async def run(
        self, splitter: BundleSplitter, parts: list[Part], pieces: list[memoryview], resp: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        call = self.call
        try:
            await self._take(parts)
            for piece in pieces:
                await self._take(splitter.feed(piece))
            del pieces[:]
            while chunk := await self._read(resp):
                await self._take(splitter.feed(chunk))
            await self._take(splitter.close())
            return await self._finish()
        except Exception as exc:  # the status is sent: nothing but a cut connection may tell the client
            if self.out is None:
                if isinstance(exc, SplitError):
                    raise FhirError(502, "structure", f"the upstream answered with {exc}") from None
                raise  # before the first byte: refused as any answer would be
            reason = exc.reason if isinstance(exc, FhirError) else type(exc).__name__
            log.error(
                "answer aborted", extra={"event": "stream-aborted", "request_id": call.request_id, "reason": reason}
            )
            raise StreamAborted(reason) from None

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        """The upstream's next chunk (b"" at the end); the wait counts as the upstream's time in the metrics."""
        started = time.perf_counter()
        chunk = await resp.content.read(CHUNK)
        self.call.exchange.upstream_seconds += time.perf_counter() - started
        return chunk

    async def _take(self, parts: list[Part]) -> None:
        for kind, value in parts:
            if kind == ENTRY:
                self.batch.append(value)
            elif kind == MEMBER:
                key, member = value
                if key == "total" and total_waits({"type": self.type}, self.call):
                    self.total = (member,)
                else:
                    (self.tail if self.out is not None else self.head)[key] = member
            elif kind == ENTRIES:
                await self._open()
            elif kind == ENTRIES_END:
                await self._flush()
                await self._close_entries()
        await self._flush()

    def _shell(self, members: dict[str, Any]) -> dict[str, Any]:
        return {"resourceType": "Bundle", "type": self.type, **members}

    async def _open(self) -> None:
        """The entries begin: judge the members before them (a refusal here is still a clean 4xx/5xx),
        send the headers, write the Bundle up to ``"entry":[``."""
        call = self.call
        head = self.head
        await judge(call, self.forwarding, head, self.status, self.hits)
        self._alarm_if_blocking()
        out = web.StreamResponse(status=self.status, headers=self.headers)
        out.content_type, out.charset = hdr.FHIR_JSON, "utf-8"
        await out.prepare(call.request)
        self.out = out
        await out.write(serialise(call, head)[:-1] + b',"entry":[')

    async def _flush(self) -> None:
        """Judge the batch of entries in a Bundle shell and write what is left of it."""
        if not self.batch or self.out is None:
            return
        shell = self._shell({"entry": self.batch})
        self.batch = []
        self.removed += await judge(self.call, self.forwarding, shell, self.status, self.hits)
        self._alarm_if_blocking()
        entries = shell.get("entry")
        if type(entries) is list and entries:
            await self._write_entries(serialise(self.call, entries)[1:-1], len(entries))

    async def _write_entries(self, data: bytes, count: int) -> None:
        assert self.out is not None
        await self.out.write(b"," + data if self.written else data)
        self.written += count

    async def _close_entries(self) -> None:
        """The entries end: integrity failures so far become a last entry (the headers are long sent)."""
        report = self.call.exchange.report
        if report.failures:
            issue = Issue(
                "processing",
                f"{len(report.failures)} integrity check(s) failed: the elements concerned are masked",
                severity="warning",
            )
            outcome = {"resource": operation_outcome([issue]), "search": {"mode": "outcome"}}
            await self._write_entries(serialise(self.call, [outcome])[1:-1], 1)
            log_integrity(self.call)
        assert self.out is not None
        await self.out.write(b"]")

    async def _finish(self) -> web.StreamResponse:
        call = self.call
        if self.out is None:  # no entry array after all: the whole Bundle is in hand, answered whole
            if self.total is not None:
                self.head["total"] = self.total[0]
            return await answer_whole(call, self.forwarding, self.head, self.status, self.headers)
        tail = self._shell(self.tail)
        await judge(call, self.forwarding, tail, self.status, self.hits)
        if self.total is not None and not self.removed:
            tail["total"] = self.total[0]
        del tail["resourceType"], tail["type"]
        rest = serialise(call, tail)[1:-1]
        await self.out.write(b"," + rest + b"}" if rest else b"}")
        account_name_filter(call)
        if self.hits:
            alarm(call.rt, call.exchange, self.hits, call.request_id)
        await self.out.write_eof()
        return self.out

    def _alarm_if_blocking(self) -> None:
        """A canary decrypted for a caller the policy blocks: refused before its entry is written."""
        rt = self.call.rt
        if self.hits and rt.policy.canary_action == "block":
            alarm(rt, self.call.exchange, self.hits, self.call.request_id)
