"""Errors aiohttp answers itself, before any handler runs, as FHIR OperationOutcomes.

A request aiohttp's HTTP parser rejects (a bad request line, a space or control byte in
the URL, an invalid header, a line or header block too long) never reaches fhircrypt's
handler: aiohttp answers ``400 text/plain`` and quotes the offending line, which may hold
a NIK or a name from a query string. fhircrypt's rule is that every refusal is an
OperationOutcome that names no values, so :class:`FhirErrorsRunner` gives each
connection's handler an error answer that follows it: the status aiohttp chose, and a
fixed message per status. aiohttp still logs the event; the JSON log formatter keeps
only the exception's type (see :mod:`proxy.logs`).
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from proxy.outcome import FhirError
from proxy.web.headers import SERVER

_MESSAGES = {
    400: ("invalid", "the HTTP request could not be parsed (request line, URL or headers)"),
    413: ("too-costly", "the HTTP request is too large"),
    414: ("too-costly", "the request URL is too long"),
    431: ("too-costly", "the request header fields are too large"),
    500: ("exception", "internal error in the proxy"),
    504: ("timeout", "the request took too long"),
}


def outcome_response(status: int) -> web.Response:
    """The OperationOutcome answer for an HTTP-level error with ``status``; the connection is closed."""
    code, text = _MESSAGES.get(status, ("invalid", "the HTTP request was refused"))
    resp = web.Response(
        status=status,
        body=orjson.dumps(FhirError(status, code, text).outcome()),
        content_type="application/fhir+json",
        charset="utf-8",
        headers={"Server": SERVER},  # no app, so no on_response_prepare: the header is set here
    )
    resp.force_close()
    return resp


class _FhirErrorsHandler(RequestHandler):
    """aiohttp's connection handler, answering the errors it handles itself with an OperationOutcome."""

    __slots__ = ()  # the same layout as RequestHandler (which has slots): see _Handlers

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: Any = None
    ) -> web.StreamResponse:
        # aiohttp's own method logs the error and raises if part of a response was already sent;
        # its text/plain answer (which may quote the request) is discarded
        super().handle_error(request, status, exc, message)
        return outcome_response(status)


class _Handlers:
    """The protocol factory a site serves with: aiohttp's server, with each new connection handler
    turned into a :class:`_FhirErrorsHandler`. aiohttp offers no hook for the handler class, and
    building the handler ourselves would copy ``web.Server``'s internals; changing the class of the
    instance it built (same slots, one overridden method) keeps all of aiohttp's own set-up."""

    def __init__(self, server: web.Server) -> None:
        self._server = server

    def __call__(self) -> RequestHandler:
        handler = self._server()
        handler.__class__ = _FhirErrorsHandler
        return handler

    def __getattr__(self, name: str) -> Any:  # the rest is the server's own (pre_shutdown, connections, ...)
        return getattr(self._server, name)


class FhirErrorsRunner(web.AppRunner):
    """``web.AppRunner`` whose sites answer unparseable requests with an OperationOutcome."""

    @property
    def server(self) -> Any:
        server = super().server
        return None if server is None else _Handlers(server)
