"""The migration's HTTP client to the FHIR server: rate-limited, with bounded retries of transient errors.

The migration talks to the upstream directly (it holds the keys and runs inside the
hospital), through the same :class:`proxy.upstream.client.UpstreamClient` as the proxy: only
the upstream's own origin is requested (a paging link elsewhere stops the run), with an
optional bearer token from the environment. A request that still fails after the retries
raises ``UpstreamDown``: the run stops without advancing its checkpoint past the page in
flight, so resuming repeats it.
"""

from __future__ import annotations

import asyncio

import orjson
from aiolimiter import AsyncLimiter

from proxy.outcome import FhirError
from proxy.transform import jsonnum
from proxy.upstream.client import UpstreamClient, upstream_tls
from proxy.upstream.credentials import StaticBearer

FHIR_JSON = "application/fhir+json"
TRANSIENT = frozenset({429, 500, 502, 503, 504})


class UpstreamDown(Exception):
    """The upstream did not answer usefully after the retries (message names the request, no content)."""


class Upstream:
    def __init__(
        self,
        base: str,
        rate: float | None = None,
        token: str | None = None,
        ca_file: str | None = None,
        timeout: float = 60.0,
        attempts: int = 4,
        connections: int = 16,
    ) -> None:
        self.base = base.rstrip("/")
        self._limiter = AsyncLimiter(rate, 1.0) if rate else None
        self._client = UpstreamClient(
            self.base,
            tls=upstream_tls(self.base, ca_file),
            credential=StaticBearer(token) if token else None,
            timeout=timeout,
            connections=connections,
        )
        self._attempts = attempts

    async def __aenter__(self) -> Upstream:
        self._client.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.close()

    async def request(
        self, method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict | None]:
        """One request (absolute URL or a path under the base); returns the status and the JSON body."""
        try:
            target = self._client.resolve(url)
        except FhirError as exc:
            raise UpstreamDown(f"{method}: {exc}") from None
        hdrs = {"Accept": FHIR_JSON, **(headers or {})}
        if body is not None:
            hdrs["Content-Type"] = FHIR_JSON
        status = 0
        for attempt in range(self._attempts):
            if attempt:
                await asyncio.sleep(min(0.25 * 2**attempt, 5.0))
            if self._limiter is not None:
                await self._limiter.acquire()
            try:
                async with self._client.request(method, target, data=body, headers=hdrs) as resp:
                    status, raw = resp.status, await self._client.read(resp)
                if raw is None:
                    raise UpstreamDown(f"{method} {url.split('?', 1)[0]}: the answer exceeds the response size limit")
            except FhirError:
                status = 0
                continue
            if status in TRANSIENT:
                continue
            try:
                return status, jsonnum.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                return status, None
        what = f"HTTP {status}" if status else "no connection"
        raise UpstreamDown(f"{method} {url.split('?', 1)[0]}: {what} after {self._attempts} attempts")

    async def read(self, rtype: str, rid: str) -> dict | None:
        """The current version, or None when it is gone (deleted or never existed)."""
        status, body = await self.request("GET", f"{rtype}/{rid}")
        if status in (404, 410):
            return None
        if status != 200 or type(body) is not dict:
            raise UpstreamDown(f"GET {rtype}/{rid}: HTTP {status}")
        return body

    async def update(self, rtype: str, rid: str, body: bytes, version: str) -> int:
        """PUT only over the version that was read: a concurrent writer makes it fail with 412 (or 409)."""
        status, _ = await self.request("PUT", f"{rtype}/{rid}", body, {"If-Match": f'W/"{version}"'})
        return status

    async def count(self, rtype: str) -> int | None:
        """How many resources of the type exist (for the progress bar); None when the server will not say."""
        status, body = await self.request("GET", f"{rtype}?_summary=count")
        total = body.get("total") if status == 200 and type(body) is dict else None
        return total if type(total) is int else None
