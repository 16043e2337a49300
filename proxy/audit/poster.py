"""A second audit destination: POST each AuditEvent to a FHIR server's ``/AuditEvent`` endpoint.

Used through :class:`proxy.audit.trail.AsyncAuditSink`, which queues, bounds and retries it like
the local trail. Shipping events off the proxy host is what protects the newest records against
someone who has taken over the host (and with it the trail's current key).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import aiohttp
import orjson

from proxy.audit.trail import AuditWriteError
from proxy.outcome import FhirError


class FhirAuditPoster:
    """Writes AuditEvents to ``<base_url>/AuditEvent`` one POST each, in order.

    ``request`` is ``aiohttp.ClientSession.request`` of a session the caller owns (TLS settings,
    connection pool), or ``UpstreamClient.request`` when the audit server is the upstream. Any
    non-2xx answer or transport error stops the batch; the sink keeps the unposted events and retries them.
    """

    def __init__(
        self,
        request: Callable,
        base_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.request = request
        self.url = base_url.rstrip("/") + "/AuditEvent"
        self.headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json", **(headers or {})}
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    async def post(self, event: dict) -> None:
        try:
            async with self.request(
                "POST", self.url, data=orjson.dumps(event), headers=self.headers, timeout=self.timeout
            ) as resp:
                await resp.read()
                if not 200 <= resp.status < 300:
                    raise AuditWriteError(f"POST {self.url} answered {resp.status}")
        except (aiohttp.ClientError, TimeoutError, FhirError) as exc:
            raise AuditWriteError(f"POST {self.url} failed: {type(exc).__name__}") from exc

    async def write_batch(self, events: Sequence[dict]) -> None:
        for i, event in enumerate(events):
            try:
                await self.post(event)
            except AuditWriteError as exc:
                raise AuditWriteError(str(exc), written=i) from exc
