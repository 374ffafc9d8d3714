"""The OpenAI-compatible HTTP API in front of the engine (FastAPI; run it with uvicorn).

Routes: POST /v1/completions, POST /v1/chat/completions (streamed as server-sent events with
``"stream": true``), GET /v1/models, POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's
bodies), GET /health, GET /metrics (Prometheus). With an API key every /v1 route needs
``Authorization: Bearer <key>``. Every refusal is a 4xx with OpenAI's error body.

The engine runs on its own thread; each request's events cross into the event loop through an
``asyncio.Queue``. A client that goes away has its request cancelled, which frees its row at the next step.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.serve.engine import Engine
from lorakit.serve.errors import ServeError
from lorakit.serve.metrics import ServeMetrics
from lorakit.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
    error_body,
)
from lorakit.serve.requests import Event
from lorakit.serve.requests import Request as EngineRequest

DISCONNECT_POLL_SECONDS = 0.25


class _Refused(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def create_app(engine: Engine, metrics: ServeMetrics, *, api_key: str | None = None,
               max_queue: int = 256) -> FastAPI:
    """The app serving ``engine`` (created with ``observer=metrics``); the engine thread runs with the app."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="lorakit serve", lifespan=lifespan)
    # Encoding happens on the event loop while the engine thread decodes: one tokenizer copy each.
    tokenizer = copy.deepcopy(engine.tokenizer)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise _Refused(401, "invalid or missing API key: send 'Authorization: Bearer <key>'")

    @app.exception_handler(_Refused)
    async def _refused(_: Request, error: _Refused) -> JSONResponse:
        return JSONResponse(error_body(error.status, error.message, error.param), error.status, error.headers)

    @app.exception_handler(ServeError)
    async def _serve_error(_: Request, error: ServeError) -> JSONResponse:
        return JSONResponse(error_body(error.status, str(error), error.param), error.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
            loc = []
        else:
            message = f"{'.'.join(loc) or 'body'}: {first['msg']}"
        return JSONResponse(error_body(400, message, loc[0] if loc else None), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        body = error_body(error.status_code, str(error.detail))
        return JSONResponse(body, error.status_code, error.headers)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        created = int(time.time())
        base = {"id": engine.base_name, "object": "model", "created": created, "owned_by": "lorakit",
                "root": engine.base_name, "parent": None}
        adapters = [{"id": name, "object": "model", "created": created, "owned_by": "lorakit",
                     "root": str(engine.catalog.path(name)), "parent": engine.base_name}
                    for name in engine.catalog.names()]
        return {"object": "list", "data": [base, *adapters]}

    @app.post("/v1/load_lora_adapter", dependencies=[Depends(authorize)])
    async def load_lora_adapter(body: LoadAdapterRequest) -> Response:
        await run_in_threadpool(engine.load_adapter, body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=[Depends(authorize)])
    async def unload_lora_adapter(body: UnloadAdapterRequest) -> Response:
        engine.unload_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        if isinstance(body.prompt, str):
            ids = tokenizer(body.prompt).input_ids
        else:
            ids = list(body.prompt)
            vocab = len(tokenizer)
            if any(not 0 <= i < vocab for i in ids):
                raise _Refused(400, f"prompt token ids must be in 0..{vocab - 1}", "prompt")
        return await _serve(request, body, ids, default_max_tokens=16, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as error:  # jinja raises its own errors for messages a template refuses
            raise _Refused(400, f"the chat template refused these messages: {error}", "messages") from error
        ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        return await _serve(request, body, ids, default_max_tokens=max(1, engine.max_context - len(ids)),
                            chat=True)

    async def _serve(http: Request, body: CompletionRequest | ChatRequest, ids: list[int], *,
                     default_max_tokens: int, chat: bool) -> Response:
        if engine.queue_length >= max_queue:
            metrics.rejected(body.model, 429)
            raise _Refused(429, f"the server has {max_queue} requests waiting; retry shortly", None,
                           {"Retry-After": "1"})
        try:
            params = body.sampling(default_max_tokens)
        except ValueError as error:
            raise _Refused(400, str(error), "max_tokens") from error
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = EngineRequest(ids, body.model, params,
                            on_event=lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            engine.submit(job)
        except ServeError as error:
            metrics.rejected(body.model, error.status)
            if chat and error.param == "prompt":  # a chat request has messages, not a prompt
                error.param = "messages"
            raise
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        shape = _Shape(response_id, body.model, chat)
        first = await _next_event(http, events, job)
        if first is None:
            return Response(status_code=499)
        if first.error is not None:
            raise first.error
        if not body.stream:
            summary = Event(job.request_id)
            event: Event | None = first
            while True:
                summary.text += event.text
                if event.finished:
                    break
                event = await _next_event(http, events, job)
                if event is None:
                    return Response(status_code=499)
            return JSONResponse(shape.whole(summary.text, event))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(http, events, job, first, shape, include_usage),
                                 media_type="text/event-stream")

    async def _next_event(http: Request, events: asyncio.Queue[Event], job: EngineRequest) -> Event | None:
        """The request's next event, or None (request cancelled) once the client has gone away."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
            except TimeoutError:
                if await http.is_disconnected():
                    engine.cancel(job.request_id)
                    return None

    async def _stream(http: Request, events: asyncio.Queue[Event], job: EngineRequest, first: Event,
                      shape: _Shape, include_usage: bool) -> AsyncIterator[str]:
        finished = False
        try:
            if shape.chat:
                yield _sse(shape.chunk(None, None, role=True))
            event: Event | None = first
            while event is not None:
                if event.error is not None:
                    yield _sse(error_body(event.error.status, str(event.error), event.error.param))
                    break
                if event.text or event.finished:
                    yield _sse(shape.chunk(event.text, event.finish_reason))
                if event.finished:
                    finished = True
                    if include_usage:
                        yield _sse(shape.usage_chunk(event))
                    break
                event = await _next_event(http, events, job)
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away (the generator was cancelled or closed)
                engine.cancel(job.request_id)

    return app


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class _Shape:
    """OpenAI's response and chunk bodies for one request."""

    def __init__(self, response_id: str, model: str, chat: bool) -> None:
        self.id, self.model, self.chat, self.created = response_id, model, chat, int(time.time())

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    @staticmethod
    def _usage(event: Event) -> dict[str, int]:
        return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                "total_tokens": event.prompt_tokens + event.completion_tokens}

    def whole(self, text: str, last: Event) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": last.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [choice], "usage": self._usage(last)}

    def chunk(self, text: str | None, finish_reason: str | None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, last: Event) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [], "usage": self._usage(last)}
