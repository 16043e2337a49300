"""What happens around every FHIR request, whatever its route: refusals as OperationOutcomes, the
audit record, the metrics and the log line.

An aiohttp middleware, so that the pipeline in ``proxy.web.app.handle`` only says what a request
does, and no step can forget to audit or can let a traceback (or a value inside an exception
message) reach the client. It engages on the FHIR route only: probes, metrics and discovery
are not interactions to audit.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from contextvars import ContextVar

import orjson
from aiohttp import web

from proxy.keymgmt.providers.base import KeyringError
from proxy.logs import REQUEST_ID
from proxy.outcome import FhirError
from proxy.transform import sentinel
from proxy.web import bulk, metrics
from proxy.web import headers as hdr
from proxy.web.auditing import record
from proxy.web.call import CALL, Call
from proxy.web.runtime import RUNTIME

log = logging.getLogger("fhircrypt")
FHIR_ROUTE = "fhir"  # the name of the route the middleware accounts for
CUT = 0  # the status logged, counted and audited ('no HTTP outcome') for a request cut before its answer
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The PHI sentinel's reported hits of the request in this task, logged in one line when it ends: a
# Bundle of 50 Patients may report hundreds, and a log record each cost more than finding them.
_SENTINEL_HITS: ContextVar[Counter[tuple[str, str]] | None] = ContextVar("sentinel_hits", default=None)
_LOGGED_PATHS = 20  # paths named in the line; the counts cover them all


def _gather(hit: sentinel.Hit) -> None:
    hits = _SENTINEL_HITS.get()
    if hits is None:  # outside a request this middleware accounts for: counted at once
        metrics.SENTINEL.labels(hit.detector).inc()
    else:  # counted, like logged, once per request (:func:`_report_sentinel_hits`)
        hits[hit.detector, hit.path] += 1


sentinel.add_listener(_gather)


def respond_error(err: FhirError, request_id: str) -> web.Response:
    headers = {"X-Request-ID": request_id, **err.headers}
    return web.Response(
        status=err.status,
        body=orjson.dumps(err.outcome()),
        headers=headers,
        content_type=hdr.FHIR_JSON,
        charset="utf-8",
    )


@web.middleware
async def account(request: web.Request, handler: _Handler) -> web.StreamResponse:
    if request.match_info.route.name != FHIR_ROUTE:
        return await handler(request)
    request_id = hdr.safe_request_id(request.headers.get("X-Request-ID")) or uuid.uuid4().hex
    call = Call(request.app[RUNTIME].snapshot(), request, request_id, time.perf_counter())
    request[CALL] = call
    REQUEST_ID.set(request_id)
    _SENTINEL_HITS.set(Counter())
    metrics.IN_FLIGHT.inc()
    try:
        response = await handler(request)
        call.status = response.status
        return response
    except bulk.StreamAborted:
        call.status = 502
        raise  # the response has started: aiohttp cuts the connection, so the client never sees a clean end
    except asyncio.CancelledError:  # cut (the drain deadline): no answer was sent, so no HTTP status
        call.status = CUT
        raise
    except FhirError as err:
        call.status = err.status
        if err.status >= 400:
            metrics.REFUSALS.labels(err.reason).inc()
            log.info(
                "refused",
                extra={
                    "event": "refused",
                    "request_id": request_id,
                    "status": err.status,
                    "reason": err.reason,
                    "interaction": call.it.label() if call.it else None,
                },
            )
        return respond_error(err, request_id)
    except KeyringError as exc:  # keys expired or a master key used up: messages carry no key material
        call.status = 503
        log.error("keys unavailable", extra={"event": "keys-unavailable", "request_id": request_id, "error": str(exc)})
        return respond_error(FhirError(503, "transient", str(exc), headers={"Retry-After": "30"}), request_id)
    except Exception as exc:  # never a traceback (or a value inside an exception message) to the client
        call.status = 500
        log.error(
            "internal error",
            extra={
                "event": "internal-error",
                "request_id": request_id,
                "error": type(exc).__name__,
                "trace": traceback.format_tb(exc.__traceback__),
            },
        )
        return respond_error(FhirError(500, "exception", "internal error in the proxy"), request_id)
    finally:
        _close(call)


def _close(call: Call) -> None:
    """The audit record, the metrics and the log line of one request."""
    rt, it, status, exchange = call.rt, call.it, call.status, call.exchange
    if rt.audit:
        policy = f"{rt.policy.name}@{rt.policy.digest[:12]}"
        record(rt.audit, policy, call.request_id, it, status, exchange, call.request.remote)
    seconds = time.perf_counter() - call.started
    label = it.label() if it else "unclassified"
    metrics.IN_FLIGHT.dec()
    metrics.REQUESTS.labels(label, str(status)).inc()
    metrics.OVERHEAD.labels(label).observe(max(seconds - exchange.upstream_seconds, 0.0))
    report = exchange.report
    if report.decrypted:
        metrics.ELEMENTS.labels("decrypted").inc(report.decrypted)
    if report.masked:
        metrics.ELEMENTS.labels("masked").inc(report.masked)
    if report.failures:
        metrics.INTEGRITY_FAILURES.inc(len(report.failures))
    metrics.AUDIT_BACKLOG.set(sum(sink.backlog for sink in rt.audit))
    _report_sentinel_hits(call.request_id)
    log.info(
        "request cut before its answer" if status == CUT else "request",
        extra={
            "event": "request",
            "request_id": call.request_id,
            "method": call.request.method,
            "interaction": label if it else None,
            "resource_type": it.resource_type if it else None,
            "status": status,
            **({"cut": "no answer was sent"} if status == CUT else {}),
            "ms": round(seconds * 1000, 2),
        },
    )


def _report_sentinel_hits(request_id: str) -> None:
    """The values the sentinel reported in this request, counted in the metric by detector and logged
    in one line: counts by detector, and the paths (never the values) with how often each was hit, the
    first ``_LOGGED_PATHS`` of them."""
    hits = _SENTINEL_HITS.get()
    if not hits:
        return
    detectors: Counter[str] = Counter()
    for (detector, _), n in hits.items():
        detectors[detector] += n
    for detector, n in detectors.items():
        metrics.SENTINEL.labels(detector).inc(n)
    log.warning(
        "sentinel",
        extra={
            "event": "sentinel",
            "request_id": request_id,
            "detectors": dict(detectors),
            "paths": [{"detector": d, "path": p, "count": n} for (d, p), n in list(hits.items())[:_LOGGED_PATHS]],
            "more_paths": max(len(hits) - _LOGGED_PATHS, 0),
        },
    )
