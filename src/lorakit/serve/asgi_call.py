"""Run one HTTP request through an ASGI application in-process, streaming the answer back.

`lorakit.serve.ray_app`'s replicas hand each request to `lorakit serve`'s own FastAPI app this way, so
validation, errors and server-sent events are exactly that app's, chunk by chunk (httpx's ASGI transport
would buffer a whole stream before returning it).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any


async def asgi_call(
    app: Any, method: str, path: str, body: bytes, headers: dict[str, str]
) -> AsyncIterator[Any]:
    """Run one HTTP request through the ASGI ``app``: yields ``(status, headers)`` then the body chunks.

    The app sees a client that disconnects when this generator is closed early, so a request abandoned
    by the ingress is cancelled in the engine (`lorakit.serve.app` watches for the disconnect).
    """
    path, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(key.lower().encode(), value.encode()) for key, value in headers.items()],
        "client": ("127.0.0.1", 0),
        "server": ("lorakit-replica", 80),
    }
    messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await messages.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await messages.put(None)

    task = asyncio.create_task(run())
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                raw = message.get("headers", [])
                yield message["status"], {key.decode(): value.decode() for key, value in raw}
            elif message["type"] == "http.response.body" and message.get("body"):
                yield message["body"]
        await task  # re-raise what the app raised
    finally:
        gone.set()
        if not task.done():
            try:
                await asyncio.wait_for(task, 5.0)
            except (TimeoutError, asyncio.CancelledError, Exception):
                task.cancel()
