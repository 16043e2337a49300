"""``/readyz``: may this replica take traffic? Keys loaded, policy compiled, upstream reachable, not draining.

Kubernetes and load balancers poll it every few seconds on every replica; the upstream probe
result is therefore reused for ``readiness_cache`` seconds, so probes never multiply into load
on the FHIR server. The answer names each check and its state, never an exception message.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from proxy.outcome import FhirError
from proxy.web.runtime import RUNTIME, Runtime


@dataclass
class Readiness:
    """Per-worker state of the readiness checks."""

    draining: bool = False  # SIGTERM received: tell the load balancer to stop sending
    checked_at: float = float("-inf")
    upstream: str = "unknown"
    _lock: asyncio.Lock | None = None

    async def upstream_state(self, rt: Runtime) -> str:
        if time.monotonic() - self.checked_at < rt.settings.readiness_cache:
            return self.upstream
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one probe at a time; the others reuse its answer
            if time.monotonic() - self.checked_at >= rt.settings.readiness_cache:
                self.upstream = await _probe(rt)
                self.checked_at = time.monotonic()
        return self.upstream


READINESS: web.AppKey[Readiness] = web.AppKey("readiness")


_PROBE_FAILURES = {"timeout": "timeout", "security": "tls error"}


async def _probe(rt: Runtime) -> str:
    """Any HTTP answer below 500 from ``/metadata`` means the FHIR server is there (401 included).
    Sent through the upstream client, so with the proxy's own credential, never a caller's."""
    if rt.client is None:
        return "not started"
    try:
        async with rt.client.request(
            "GET",
            "metadata?_summary=true",
            headers={"Accept": "application/fhir+json"},
            timeout=aiohttp.ClientTimeout(total=min(rt.settings.upstream_timeout, 5.0)),
        ) as resp:
            await resp.read()
            return "ok" if resp.status < 500 else f"status {resp.status}"
    except FhirError as exc:
        return _PROBE_FAILURES.get(exc.reason, "unreachable")


def _keys(rt: Runtime) -> str:
    """Ready while the cached keys may serve: an outage of the key provider alone must not take every
    replica out of the load balancer at once (it is alerted on instead: docs/key-management.md)."""
    health = rt.keys.provider_health()
    return "ok" if health.serving else f"unavailable ({health.error})"


async def readiness(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    state = request.app[READINESS]
    checks = {
        "keys": _keys(rt),
        "policy": "ok" if rt.policy is not None else "not compiled",
        "upstream": await state.upstream_state(rt),
    }
    if state.draining:
        checks["shutdown"] = "draining"
    ready = all(v == "ok" for v in checks.values())
    body = {"status": "ready" if ready else "not ready", "checks": checks}
    if rt.policy is not None:
        body["policy"] = f"{rt.policy.name}@{rt.policy.digest[:12]}"
    return web.json_response(body, status=200 if ready else 503)
