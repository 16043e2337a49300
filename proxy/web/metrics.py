"""Prometheus metrics. Labels come only from closed sets: interaction kinds, R4 resource type names
(the URL's type is checked against the R4 list before it is used), HTTP status codes and the
OperationOutcome issue codes of refusals - never ids, query values, subjects or paths.

With several workers, prometheus_client's multiprocess mode is used: the supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` before any worker imports this module, each worker writes its
samples to memory-mapped files there, and whichever worker answers ``/metrics`` reports the sum
over all live workers (gauges: the sum over live workers, too).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from proxy.keymgmt.providers import KeyProvider

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_OVERHEAD = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

REQUESTS = Counter(
    "fhircrypt_requests", "FHIR requests answered, by interaction and HTTP status", ["interaction", "status"]
)
IN_FLIGHT = Gauge("fhircrypt_requests_in_flight", "FHIR requests being handled", multiprocess_mode="livesum")
UPSTREAM_LATENCY = Histogram(
    "fhircrypt_upstream_latency_seconds",
    "time the upstream took per forwarded request",
    ["interaction"],
    buckets=_LATENCY,
)
OVERHEAD = Histogram(
    "fhircrypt_proxy_overhead_seconds",
    "time spent in the proxy per request, excluding the upstream exchange",
    ["interaction"],
    buckets=_OVERHEAD,
)
ELEMENTS = Counter("fhircrypt_elements", "elements encrypted, decrypted or masked", ["operation"])
REFUSALS = Counter("fhircrypt_refusals", "requests refused by the proxy, by OperationOutcome issue code", ["reason"])
SENTINEL = Counter(
    "fhircrypt_sentinel_reports",
    "values forwarded in clear elements that a PHI sentinel detector recognised (sentinel: report), by detector",
    ["detector"],
)
NAME_FILTERED = Counter(
    "fhircrypt_name_search_removed",
    "search matches of a chained name search removed after decryption because their name does not match",
)
INTEGRITY_FAILURES = Counter(
    "fhircrypt_integrity_failures", "encrypted elements or records that failed verification and were withheld"
)
KEY_PROVIDER_CALLS = Counter(
    "fhircrypt_key_provider_calls",
    "calls to the key provider (HSM, KMS, Vault), by operation and result",
    ["operation", "result"],
)
AUDIT_BACKLOG = Gauge(
    "fhircrypt_audit_backlog", "audit records queued and not yet written", multiprocess_mode="livesum"
)
RELOADS = Counter("fhircrypt_reloads", "SIGHUP reloads of policy and certificates", ["result"])


class CountedProvider:
    """A key provider whose calls are counted in ``fhircrypt_key_provider_calls_total``.

    Why: keys are unwrapped once and cached, so after start-up a worker calls its provider only
    for the background re-verification every ``key_refresh_interval``, never per request. The
    counter shows that (the benchmark's soak reports it), and shows an operator what the HSM or
    KMS is asked (KMS calls are billed), without the providers knowing about metrics."""

    def __init__(self, inner: KeyProvider) -> None:
        self._inner = inner
        self.type = inner.type

    def _call(self, operation: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            out = fn(*args)
        except Exception:
            KEY_PROVIDER_CALLS.labels(operation, "error").inc()
            raise
        KEY_PROVIDER_CALLS.labels(operation, "ok").inc()
        return out

    def wrap(self, key: bytes, context: Mapping[str, str] | None = None) -> bytes:
        return self._call("wrap", self._inner.wrap, key, context)

    def unwrap(self, wrapped: bytes, context: Mapping[str, str] | None = None) -> bytes:
        return self._call("unwrap", self._inner.unwrap, wrapped, context)

    def check(self) -> None:
        self._call("check", self._inner.check)

    def describe(self) -> dict[str, str]:
        return self._inner.describe()


async def metrics_handler(request: web.Request) -> web.Response:
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def worker_exited(pid: int) -> None:
    """Drop a dead worker's live gauges (called by the supervisor)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)
