"""The migration's HTTP client to the FHIR server: rate-limited, with bounded retries of transient errors.

The migration talks to the upstream directly (it holds the keys and runs inside the
hospital); an optional bearer token for the upstream comes from the environment. A
request that still fails after the retries raises ``UpstreamDown``: the run stops
without advancing its checkpoint past the page in flight, so resuming repeats it.
"""

from __future__ import annotations

import asyncio
import ssl

import aiohttp
import orjson
from aiolimiter import AsyncLimiter

from proxy.transform import jsonnum

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
        self._headers = {"Accept": FHIR_JSON}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._ssl: ssl.SSLContext | bool = True
        if self.base.startswith("https://"):
            self._ssl = ssl.create_default_context(cafile=ca_file)
            self._ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._attempts = attempts
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Upstream:
        connector = aiohttp.TCPConnector(limit=self._connections, ssl=self._ssl)
        self._session = aiohttp.ClientSession(timeout=self._timeout, connector=connector)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self, method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict | None]:
        """One request (absolute URL or a path under the base); returns the status and the JSON body."""
        if not url.startswith(("http://", "https://")):
            url = f"{self.base}/{url}"
        hdrs = {**self._headers, **(headers or {})}
        if body is not None:
            hdrs["Content-Type"] = FHIR_JSON
        assert self._session is not None, "use Upstream as an async context manager"
        status = 0
        for attempt in range(self._attempts):
            if attempt:
                await asyncio.sleep(min(0.25 * 2**attempt, 5.0))
            if self._limiter is not None:
                await self._limiter.acquire()
            try:
                async with self._session.request(method, url, data=body, headers=hdrs) as resp:
                    status, raw = resp.status, await resp.read()
            except (aiohttp.ClientError, TimeoutError):
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
