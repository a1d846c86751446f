"""A client that leaves cancels what its request was waiting for: preparation, generation."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from fastapi import Request


class ClientDisconnected(Exception):
    pass


async def unless_disconnected(request: Request, work: Awaitable):
    """Run `work`; if the client goes away first, cancel it (its streams abort in the worker)."""

    async def wait_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(wait_disconnect())
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        watcher.cancel()
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()
