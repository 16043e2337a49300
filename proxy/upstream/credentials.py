"""The proxy's own credential towards the upstream: a static bearer token or OAuth2 client credentials.

The upstream is not trusted with callers' tokens (it could replay them against the proxy), so by
default it sees this credential and never the caller's (``docs/threat-model.md``). A client
credentials token (RFC 6749 section 4.4) is cached and fetched again before it expires; the
token endpoint's answers are never logged or quoted, only their status.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from typing import Protocol
from urllib.parse import quote

import aiohttp
import orjson

from proxy.outcome import FhirError

DEFAULT_LIFETIME = 300.0  # seconds assumed when the token endpoint names no expires_in


class Credential(Protocol):
    async def authorization(self) -> str:
        """The ``Authorization`` header value for the next upstream request."""
        ...

    def refused(self) -> None:
        """The upstream answered 401 to this credential: a cached token is fetched again next time."""
        ...

    async def close(self) -> None: ...


class StaticBearer:
    """A long-lived token from a file or the environment (rotated by restarting or reloading)."""

    def __init__(self, token: str) -> None:
        if not token.strip():
            raise ValueError("the upstream bearer token is empty")
        self._header = f"Bearer {token.strip()}"

    async def authorization(self) -> str:
        return self._header

    def refused(self) -> None:
        return None

    async def close(self) -> None:
        return None


class ClientCredentials:
    """OAuth2 client credentials (client_secret_basic), the token kept until shortly before it expires."""

    def __init__(
        self,
        token_url: str,
        client_id: str,
        secret: str,
        scope: str | None = None,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.token_url = token_url
        basic = f"{quote(client_id, safe='')}:{quote(secret, safe='')}"  # RFC 6749 2.3.1: form-encoded first
        self._auth = {"Authorization": "Basic " + base64.b64encode(basic.encode()).decode()}
        self._form = {"grant_type": "client_credentials", **({"scope": scope} if scope else {})}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._clock = clock
        self._header: str | None = None
        self._refresh_at = float("-inf")
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None  # system CAs: the identity provider is not the upstream
        self.fetches = 0  # how many tokens were requested (for metrics and tests)

    async def authorization(self) -> str:
        if self._header is not None and self._clock() < self._refresh_at:
            return self._header
        async with self._lock:  # one fetch at a time; concurrent requests reuse its token
            if self._header is None or self._clock() >= self._refresh_at:
                self._header, lifetime = await self._fetch()
                self._refresh_at = self._clock() + max(lifetime - 60.0, lifetime / 2)
        return self._header

    def refused(self) -> None:
        self._header, self._refresh_at = None, float("-inf")  # revoked or rotated early at the provider

    async def _fetch(self) -> tuple[str, float]:
        refused = FhirError(502, "transient", "the proxy could not obtain its token for the upstream")
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        self.fetches += 1
        try:
            async with self._session.post(self.token_url, data=self._form, headers=self._auth) as resp:
                status, raw = resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError):
            raise refused from None
        try:
            body = orjson.loads(raw) if status == 200 else None
        except orjson.JSONDecodeError:
            body = None
        token = body.get("access_token") if type(body) is dict else None
        kind = body.get("token_type", "Bearer") if type(body) is dict else None
        if type(token) is not str or not token or type(kind) is not str or kind.lower() != "bearer":
            raise refused
        lifetime = body.get("expires_in", DEFAULT_LIFETIME)  # type: ignore[union-attr]
        if type(lifetime) not in (int, float) or lifetime <= 0:
            lifetime = DEFAULT_LIFETIME
        return f"Bearer {token}", float(lifetime)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
