"""The background task that re-verifies the cached keys with the key provider.

Provider SDKs (PKCS#11, boto3, hvac) block, so each refresh runs in a worker thread; the
event loop, and with it every request, only ever reads the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web

from proxy.keymgmt.keycache import KeyCache
from proxy.web.runtime import RUNTIME

log = logging.getLogger("fhircrypt")


async def refresh_keys(cache: KeyCache) -> None:
    """Refresh forever, every ``refresh_interval`` seconds; logs codes and safe messages only."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(cache.bounds.refresh_interval)
        ok = await loop.run_in_executor(None, cache.refresh)
        health = cache.provider_health()
        if not ok:
            log.warning(
                "key provider verification failed; serving from cache",
                extra={
                    "event": "key-refresh-failed",
                    "provider": health.provider,
                    "error": health.error,
                    "detail": health.detail,
                    "keys_age": health.keys_age,
                    "max_age": health.max_age,
                },
            )


async def refresh_keys_ctx(app: web.Application):
    cache = app[RUNTIME].keys
    task = asyncio.create_task(refresh_keys(cache)) if cache.refreshable else None
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
