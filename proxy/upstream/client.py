"""The one HTTP client to the upstream FHIR server; every upstream request of the proxy and its tools.

It owns what every such request must get right, so no route can get it wrong on its own:

- URLs: only the upstream's own origin (scheme, host, port) is ever fetched. The upstream chooses
  some URLs itself (Bulk status and file links, paging links); one naming another origin, carrying
  user information or another scheme is refused with a 502 OperationOutcome and never requested,
  so the upstream cannot turn the proxy against the hospital network or a third party.
- Credentials: the proxy's own (``Credential``), never the caller's token, unless the operator
  explicitly chose ``forward_caller_token``. Whatever ``Authorization`` a caller of this module
  puts into ``headers`` is dropped.
- TLS: the upstream's CA, the proxy's client certificate (mutual TLS), the SNI name; rebuilt by
  ``reload`` on SIGHUP while requests in flight finish on the old pool.
- Limits and errors: pool size and timeouts; transport failures become 502/504, bodies are read
  with a bound (or their head only, for a caller that processes the rest while it streams), redirects
  are never followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Mapping

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from proxy.outcome import FhirError
from proxy.tlsprofile import harden
from proxy.upstream.credentials import Credential

DEFAULT_PORTS = {"http": 80, "https": 443}

log = logging.getLogger("fhircrypt")


def upstream_tls(base: str, ca: str | None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext | None:
    """Towards an https upstream: verified against ``ca`` (or the system CAs), hostname checked, with the
    proxy's client certificate when given (mutual TLS). None for plain http."""
    if not base.startswith("https://"):
        return None
    ctx = harden(ssl.create_default_context(cafile=ca))
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def origin(url: URL) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an absolute http(s) URL without user information; None for anything else."""
    scheme = (url.scheme or "").lower()
    if scheme not in DEFAULT_PORTS or not url.host or url.user is not None or url.password is not None:
        return None
    return scheme, url.host.lower().rstrip("."), url.port or DEFAULT_PORTS[scheme]


CHUNK = 1 << 16  # bytes read from the upstream at a time


async def read_head(stream: aiohttp.StreamReader, limit: int) -> tuple[bytes, bool]:
    """The stream's first bytes, stopping as soon as they exceed ``limit``, and whether that was all of it
    (False: the rest is still in ``stream``, for a caller that processes it while it arrives)."""
    chunks, total = [], 0
    async for chunk in stream.iter_chunked(CHUNK):
        total += len(chunk)
        chunks.append(chunk)
        if total > limit:
            return b"".join(chunks), False
    return b"".join(chunks), True


async def read_limited(stream: aiohttp.StreamReader, limit: int) -> bytes | None:
    """The whole stream, or None as soon as it exceeds ``limit`` bytes."""
    data, whole = await read_head(stream, limit)
    return data if whole else None


class UpstreamClient:
    """Requests to one upstream FHIR base. ``open`` before use and ``close`` at the end (or ``async with``)."""

    def __init__(
        self,
        base: str,
        *,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
        credential: Credential | None = None,
        forward_caller_token: bool = False,
        timeout: float = 30.0,
        connect_timeout: float | None = None,
        connections: int = 100,
        max_response: int = 64 * 1024 * 1024,
    ) -> None:
        self.base = base.rstrip("/")
        self.base_url = URL(self.base)
        found = origin(self.base_url)
        if found is None:
            raise ValueError("the upstream must be an http(s) URL without user information")
        self.origin = found
        self.server_name = server_name
        self.credential = credential
        self.forward_caller_token = forward_caller_token
        self.timeout = aiohttp.ClientTimeout(total=timeout, connect=connect_timeout)
        self.connections = connections
        self.max_response = max_response
        self._tls = tls
        self.session: aiohttp.ClientSession | None = None
        self._retired: list[aiohttp.ClientSession] = []

    def _new_session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self.connections, ssl=self._tls or True)
        return aiohttp.ClientSession(
            timeout=self.timeout, connector=connector, auto_decompress=True, skip_auto_headers=("Accept-Encoding",)
        )

    def open(self) -> UpstreamClient:
        if self.session is None:
            self.session = self._new_session()
        return self

    def reload(self, tls: ssl.SSLContext | None) -> None:
        """A new pool with the TLS files as they are now; the old one closes once no request can use it."""
        old, self._tls = self.session, tls
        self.session = self._new_session()
        if old is not None:
            self._retired.append(old)
            loop = asyncio.get_running_loop()
            grace = (self.timeout.total or 60.0) + 1
            loop.call_later(grace, lambda: loop.create_task(old.close()))

    async def close(self) -> None:
        for session in (*self._retired, self.session):
            if session is not None:
                await session.close()
        if self.credential is not None:
            await self.credential.close()

    async def __aenter__(self) -> UpstreamClient:
        return self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def owns(self, url: str) -> bool:
        """Whether ``url`` is on the upstream's origin (so must go through this client and its credential)."""
        return origin(URL(url)) == self.origin

    def resolve(self, target: str | URL) -> URL:
        """``target`` (absolute, origin-relative ``/...`` or relative to the base) as an absolute URL on the
        upstream's origin; any other URL is a 502 and is never requested. ``str`` targets are taken as
        already percent-encoded, as they came from the client or the upstream."""
        url = target if isinstance(target, URL) else URL(target, encoded=True)
        if not url.scheme and not url.is_absolute():  # a path; "file:..." or "//host/..." are not
            text = str(url)
            url = self.base_url.join(url) if text.startswith("/") else URL(f"{self.base}/{text}", encoded=True)
        if origin(url) != self.origin:
            raise FhirError(502, "forbidden", "the upstream named a URL outside its own origin: it is not followed")
        return url

    async def _authorization(self, caller_authorization: str | None) -> str | None:
        if self.forward_caller_token and caller_authorization:
            return caller_authorization
        return await self.credential.authorization() if self.credential is not None else None

    @contextlib.asynccontextmanager
    async def request(
        self,
        method: str,
        target: str | URL,
        *,
        headers: Mapping[str, str] | None = None,
        caller_authorization: str | None = None,
        with_credentials: bool = True,
        **kwargs,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One request on the upstream's origin; timeouts and connection errors (also while the body is
        read inside the block) become 504/502. ``with_credentials`` False: a pre-signed link, sent bare."""
        url = self.resolve(target)
        out: CIMultiDict[str] = CIMultiDict(headers or {})
        out.popall("Authorization", None)
        authorization = await self._authorization(caller_authorization) if with_credentials else None
        if authorization:
            out["Authorization"] = authorization
        if self.server_name:
            kwargs.setdefault("server_hostname", self.server_name)
        session = self.open().session
        assert session is not None
        try:
            async with session.request(method, url, allow_redirects=False, headers=out, **kwargs) as resp:
                if resp.status == 401 and self.credential is not None and authorization != caller_authorization:
                    self.credential.refused()  # the proxy's own token was refused: the next request gets a new one
                yield resp
        except TimeoutError as exc:
            _log_failure(url, exc)
            raise FhirError(504, "timeout", "the upstream FHIR server did not answer in time") from None
        except aiohttp.ClientSSLError as exc:
            _log_failure(url, exc)
            raise FhirError(502, "security", "the upstream's TLS connection does not verify") from None
        except aiohttp.ClientError as exc:
            _log_failure(url, exc)
            raise FhirError(502, "transient", "the upstream FHIR server cannot be reached") from None

    async def read(self, resp: aiohttp.ClientResponse, already: bytes = b"") -> bytes | None:
        """The response body, or None past ``max_response``; ``already``: its first bytes, read by ``read_head``."""
        if len(already) > self.max_response:
            return None
        rest = await read_limited(resp.content, self.max_response - len(already))
        return already + rest if rest is not None else None

    async def read_head(self, resp: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
        """The body's first bytes past ``limit`` (at most ``max_response``), and whether that was all of it."""
        return await read_head(resp.content, min(limit, self.max_response))


def _log_failure(url: URL, exc: BaseException) -> None:
    """Which upstream failed and how, for the operator: host, port and error class only (the path and
    query may hold PHI or blind-index tokens; the client gets no host at all)."""
    cause = getattr(exc, "os_error", None)  # aiohttp's connector errors wrap the OSError (refused, DNS, ...)
    log.warning(
        "upstream unreachable",
        extra={
            "event": "upstream-unreachable",
            "upstream": f"{url.host}:{url.port}",
            "error": type(exc).__name__ + (f" ({type(cause).__name__})" if cause is not None else ""),
        },
    )
