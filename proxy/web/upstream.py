"""Calls to the upstream: transport failures become OperationOutcomes, bodies are read with a bound."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp
import orjson
from yarl import URL

from proxy.outcome import FhirError
from proxy.transform import jsonnum

log = logging.getLogger("fhircrypt")


async def read_limited(stream: aiohttp.StreamReader, limit: int) -> bytes | None:
    """The whole stream, or None as soon as it exceeds ``limit`` bytes."""
    chunks, total = [], 0
    async for chunk in stream.iter_chunked(1 << 16):
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


@contextlib.asynccontextmanager
async def upstream_call(session: aiohttp.ClientSession, method: str, url, **kwargs) -> AsyncIterator:
    """``session.request`` whose timeouts and connection errors (also while reading) are 504/502."""
    try:
        async with session.request(method, url, allow_redirects=False, **kwargs) as resp:
            yield resp
    except TimeoutError as exc:
        _log_failure(url, exc)
        raise FhirError(504, "timeout", "the upstream FHIR server did not answer in time") from None
    except aiohttp.ClientError as exc:
        _log_failure(url, exc)
        raise FhirError(502, "transient", "the upstream FHIR server cannot be reached") from None


def _log_failure(url, exc: BaseException) -> None:
    """Which upstream failed and how, for the operator: host, port and error class only (the
    path and query may hold PHI or blind-index tokens; the client gets no host at all)."""
    target = URL(url)
    cause = getattr(exc, "os_error", None)  # aiohttp's connector errors wrap the OSError (refused, DNS, ...)
    log.warning(
        "upstream unreachable",
        extra={
            "event": "upstream-unreachable",
            "upstream": f"{target.host}:{target.port}",
            "error": type(exc).__name__ + (f" ({type(cause).__name__})" if cause is not None else ""),
        },
    )


def upstream_resource(raw: bytes, what: str = "the upstream answered with") -> dict:
    """A JSON object from the upstream, or a 502 naming what was wrong (never its content)."""
    try:
        value = jsonnum.loads(raw)
    except orjson.JSONDecodeError:
        raise FhirError(502, "structure", f"{what} invalid JSON") from None
    if type(value) is not dict:
        raise FhirError(502, "structure", f"{what} JSON that is not a FHIR resource")
    return value
