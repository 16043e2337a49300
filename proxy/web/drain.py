"""Draining on SIGTERM within one deadline: requests in flight finish or are cut, and the process exits in time.

aiohttp's own runner shutdown waits ``shutdown_timeout`` for the handlers, then "cancels" them by
failing the request's body stream - which does not stop a handler waiting for the upstream - and
waits ``shutdown_timeout`` again: twice the deadline the orchestrator's grace period was sized
for. So the proxy tracks the tasks of its requests itself, waits for them until the deadline
less a short grace, cancels what is left (each is logged as cut, not as a 500) and only then
lets aiohttp close the connections, which are idle by then.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

IN_FLIGHT = web.AppKey("in_flight", set[asyncio.Task[object]])
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def grace(deadline: float) -> float:
    """The part of the deadline kept for cancelling the requests still running and closing the connections."""
    return min(1.0, deadline / 5)


@web.middleware
async def track(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Register the task that runs this request, so that the drain can wait for it and cut it."""
    tasks = request.app[IN_FLIGHT]
    task = asyncio.current_task()
    assert task is not None  # aiohttp runs every handler in a task
    tasks.add(task)
    try:
        return await handler(request)
    finally:
        tasks.discard(task)


async def drain(app: web.Application, seconds: float, grace_s: float) -> int:
    """Wait up to ``seconds`` for the requests in flight (also those that start meanwhile), then cancel
    the ones still running and give them ``grace_s`` to unwind. Returns how many were cut."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    in_flight = app[IN_FLIGHT]
    while (running := set(in_flight)) and (remaining := deadline - loop.time()) > 0:
        await asyncio.wait(running, timeout=remaining)
    left = set(in_flight)
    for task in left:
        task.cancel()
    if left:
        await asyncio.wait(left, timeout=grace_s)
    return len(left)
