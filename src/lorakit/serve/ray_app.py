"""`lorakit serve --ray`: the OpenAI-compatible server on several replicas, routed by adapter (Ray Serve).

Two deployments:

* ``LorakitReplica`` (``replicas`` copies): each runs the whole `lorakit serve` application in-process --
  the engine (continuous batching of many adapters at once) and the FastAPI app of `lorakit.serve.app`,
  so validation, error bodies, sampling and server-sent events are exactly `lorakit serve`'s. A request is
  handed to that app as an ASGI call (`lorakit.serve.asgi_call`), streamed back chunk by chunk.
* ``LorakitIngress`` (one copy, the HTTP entry): reads the ``model`` field and calls a replica through
  Ray Serve's model multiplexing (``handle.options(multiplexed_model_id=model)``), so requests for an
  adapter go to a replica that already holds it while each replica keeps batching the adapters it holds.
  The base model's requests carry no id and go to any replica. Every answer carries the header
  ``x-lorakit-replica`` (the replica that served it).

A replica that dies (killed, out of memory) is restarted by Ray Serve; a request it held is retried once on
another replica when nothing had been sent to the client yet, and otherwise ends with a 503 (or, for a
stream already under way, an error event and ``[DONE]``). Every wait has a timeout (504).

Start it with ``lorakit serve --ray --replicas 2 --model M --adapters DIR`` or with Ray's own CLI:
``serve run lorakit.serve.ray_app:build model=M adapters=DIR replicas=2``. On a multi-node Ray cluster,
``RAY_ADDRESS`` (or ``serve run --address``) names the cluster and ``--adapters`` must be a folder every
node can read at the same path (a shared file system). See docs/distributed.md.
"""

# No ``from __future__ import annotations``: Ray ships the deployment classes to the replicas by value,
# and FastAPI there must find the route's ``Request`` annotation as an object, not a name to look up.
import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

from lorakit.serve.asgi_call import asgi_call
from lorakit.serve.protocol import error_body
from lorakit.serve.server import ServeOptions, base_model_name

logger = logging.getLogger("lorakit.serve")

REPLICA_HEADER = "x-lorakit-replica"
# What the ingress passes on to a replica's app (authorization: the replica checks the API key itself).
_FORWARDED = ("authorization", "content-type", "accept")
_DYNAMIC_ADAPTER_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")


@dataclasses.dataclass
class RayOptions:
    """The scale-out options of `lorakit serve --ray`.

    Attributes:
        replicas: replicas of the engine (each loads the base model once).
        adapters_per_replica: adapters a replica keeps in Ray's multiplexing cache (its affinity set);
            default: the engine's ``max_loras`` slots.
        replica_cpus, replica_gpus: Ray resources each replica asks for.
        request_timeout_s: longest wait for one replica call before answering 504.
        address: a Ray cluster to join (None: ``RAY_ADDRESS`` or a new local instance).
    """

    replicas: int = 2
    adapters_per_replica: int | None = None
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    request_timeout_s: float = 300.0
    address: str | None = None


class _Resident:
    """What Ray's multiplexing cache holds per adapter: its name (the engine keeps the weights)."""

    def __init__(self, key: str | None) -> None:
        self.key = key


def replica_class(options: ServeOptions, adapters_per_replica: int) -> type:
    """The replica deployment's class (the multiplexing capacity is fixed at class definition)."""
    from ray import serve

    class LorakitReplica:
        def __init__(self) -> None:
            from lorakit.serve.server import build_app

            self.app, self.engine = build_app(options)
            self.engine.start()  # the app's lifespan would start it; an in-process ASGI call has none
            self.name = serve.get_replica_context().replica_tag

        @serve.multiplexed(max_num_models_per_replica=adapters_per_replica)
        async def adapter(self, model_id: str) -> _Resident:
            # Validates the name (a 404 from the app otherwise); the engine loads weights on first use.
            return _Resident(self.engine.resolve(model_id))

        async def forward(self, method: str, path: str, body: bytes, headers: dict[str, str]):
            """Serve one request with this replica's app: ``(status, headers)`` first, then the body."""
            from lorakit.serve.errors import ServeError

            model_id = serve.get_multiplexed_model_id()
            if model_id:
                with contextlib.suppress(ServeError):  # the app answers with its own 404 body
                    await self.adapter(model_id)
            async for item in asgi_call(self.app, method, path, body, headers):
                if isinstance(item, tuple):
                    status, answer_headers = item
                    yield status, {**answer_headers, REPLICA_HEADER: self.name}
                else:
                    yield item

        def check_health(self) -> None:
            thread = getattr(self.engine, "_thread", None)
            if thread is None or not thread.is_alive():
                raise RuntimeError("the lorakit engine thread is not running")

        def __del__(self) -> None:
            engine = getattr(self, "engine", None)
            if engine is not None:
                engine.stop()

    return LorakitReplica


def ingress_class(base_name: str, request_timeout_s: float) -> type:
    """The HTTP entry deployment's class: FastAPI in front of the replicas' handle."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from ray import serve
    from ray.exceptions import ActorUnavailableError, RayActorError

    app = FastAPI(title="lorakit serve (Ray Serve)")
    lost = (RayActorError, ActorUnavailableError)

    def refusal(status: int, message: str) -> JSONResponse:
        return JSONResponse(error_body(status, message), status)

    @serve.ingress(app)
    class LorakitIngress:
        def __init__(self, replicas: Any) -> None:
            self.replicas = replicas

        @app.get("/health")
        async def health(self) -> Response:
            return Response(status_code=200)

        @app.api_route("/{path:path}", methods=["GET", "POST"])
        async def route(self, path: str, request: Request) -> Response:
            path = "/" + path
            if path in _DYNAMIC_ADAPTER_PATHS:
                return refusal(
                    400,
                    "loading or unloading adapters at run time is not supported with --ray (a request "
                    "reaches one replica): put the adapter in the --adapters folder and restart",
                )
            body = await request.body()
            headers = {key: value for key, value in request.headers.items() if key.lower() in _FORWARDED}
            model, stream = _model_and_stream(body) if request.method == "POST" else (None, False)
            handle = self.replicas.options(stream=True)
            if model and model != base_name:
                handle = self.replicas.options(stream=True, multiplexed_model_id=model)
            if request.url.query:
                path += "?" + request.url.query
            for attempt in (1, 2):
                chunks = handle.forward.remote(request.method, path, body, headers)
                try:
                    status, answer_headers = await asyncio.wait_for(chunks.__anext__(), request_timeout_s)
                    if stream and status == 200:
                        return StreamingResponse(
                            _relay(chunks, request_timeout_s, lost),
                            status_code=status,
                            headers=_kept(answer_headers),
                            media_type=answer_headers.get("content-type"),
                        )
                    content = b"".join([c async for c in _with_timeout(chunks, request_timeout_s)])
                    return Response(content, status, headers=_kept(answer_headers))
                except lost as error:
                    chunks.cancel()
                    if attempt == 2:
                        return refusal(
                            503, f"the replica serving this request was lost ({type(error).__name__})"
                        )
                    logger.warning("lorakit serve --ray: a replica was lost, retrying the request once")
                except TimeoutError:
                    chunks.cancel()
                    return refusal(504, f"no answer from a replica within {request_timeout_s:g} s")
            raise AssertionError("unreachable")

    return LorakitIngress


def _model_and_stream(body: bytes) -> tuple[str | None, bool]:
    """The request's ``model`` and ``stream`` fields (None/False when the body is not what the API wants:
    the replica's app then answers with its own validation error)."""
    try:
        values = json.loads(body)
    except ValueError:
        return None, False
    if not isinstance(values, dict):
        return None, False
    model = values.get("model")
    return (model if isinstance(model, str) else None), values.get("stream") is True


def _kept(headers: dict[str, str]) -> dict[str, str]:
    # content-length and transfer-encoding belong to the inner response; Starlette sets its own.
    return {k: v for k, v in headers.items() if k.lower() not in ("content-length", "transfer-encoding")}


async def _with_timeout(chunks: Any, timeout_s: float) -> AsyncIterator[bytes]:
    while True:
        try:
            yield await asyncio.wait_for(chunks.__anext__(), timeout_s)
        except StopAsyncIteration:
            return


async def _relay(
    chunks: Any, timeout_s: float, lost: tuple[type[BaseException], ...]
) -> AsyncIterator[bytes]:
    """A stream's chunks; a replica lost (or silent) mid-stream ends it with an error event and [DONE]."""
    try:
        async for chunk in _with_timeout(chunks, timeout_s):
            yield chunk
    except (*lost, TimeoutError) as error:
        chunks.cancel()
        message = f"the replica serving this stream was lost ({type(error).__name__})"
        yield f"data: {json.dumps(error_body(503, message))}\n\ndata: [DONE]\n\n".encode()


def build_application(options: ServeOptions, ray_options: RayOptions) -> Any:
    """The Ray Serve application (ingress bound to the replicas), ready for ``serve.run``."""
    from ray import serve

    per_replica = ray_options.adapters_per_replica or options.max_loras
    replica = serve.deployment(
        replica_class(options, per_replica),
        name="LorakitReplica",
        num_replicas=ray_options.replicas,
        ray_actor_options={"num_cpus": ray_options.replica_cpus, "num_gpus": ray_options.replica_gpus},
        max_ongoing_requests=max(options.max_batch * 2, 8),
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=5.0,
    )
    ingress = serve.deployment(
        ingress_class(base_model_name(options.model), ray_options.request_timeout_s),
        name="LorakitIngress",
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(replica.bind())


def build(args: dict[str, Any]) -> Any:
    """Ray's application builder: ``serve run lorakit.serve.ray_app:build model=M adapters=DIR replicas=2``.

    Keys: `ServeOptions`' fields (model, adapters, max_batch, max_loras, ...) and `RayOptions`' (replicas,
    adapters_per_replica, replica_cpus, replica_gpus, request_timeout_s); values are converted to the
    field's type.

    Raises:
        ValueError: an unknown key.
    """
    serve_fields = {f.name: f for f in dataclasses.fields(ServeOptions)}
    ray_fields = {f.name: f for f in dataclasses.fields(RayOptions)}
    chosen: dict[str, dict[str, Any]] = {"serve": {}, "ray": {}}
    for key, value in args.items():
        name = key.replace("-", "_")
        if name in serve_fields:
            chosen["serve"][name] = _typed(ServeOptions, name, value)
        elif name in ray_fields and name != "address":
            chosen["ray"][name] = _typed(RayOptions, name, value)
        else:
            known = sorted({*serve_fields, *ray_fields} - {"address", "host", "port"})
            raise ValueError(
                f"unknown option {key!r} for lorakit.serve.ray_app:build; known: {', '.join(known)}"
            )
    return build_application(ServeOptions(**chosen["serve"]), RayOptions(**chosen["ray"]))


def _typed(cls: type, name: str, value: Any) -> Any:
    """``value`` (a string from ``serve run``'s key=value arguments) as the field's type."""
    declared = next(f.type for f in dataclasses.fields(cls) if f.name == name)
    annotation = getattr(declared, "__name__", str(declared))  # "float", "int | None", ...
    if value is None or not isinstance(value, str):
        return value
    if annotation.startswith("int"):
        return int(value)
    if annotation.startswith("float"):
        return float(value)
    return value


def start_ray_app(options: ServeOptions, ray_options: RayOptions) -> None:
    """Start (or join) Ray and deploy the application ``lorakit`` on ``options.host:options.port``.

    Returns once every replica is ready (Ray Serve's ``serve.run`` waits for them).
    """
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=ray_options.address, include_dashboard=False, configure_logging=False)
    serve.start(http_options={"host": options.host, "port": options.port})
    # Warnings only: Ray Serve's default INFO level writes a line per request and per replica call.
    serve.run(
        build_application(options, ray_options),
        name="lorakit",
        route_prefix="/",
        blocking=False,
        logging_config={"log_level": "WARNING"},
    )


def run_ray_server(options: ServeOptions, ray_options: RayOptions) -> None:
    """`start_ray_app`, then serve until interrupted (^C shuts the application down)."""
    from ray import serve

    try:
        start_ray_app(options, ray_options)
    except KeyboardInterrupt:  # ^C while the replicas start
        _stop(serve)
        return
    logger.warning(
        "lorakit serve --ray: http://%s:%d/v1 base model %s, %d replica(s)",
        options.host,
        options.port,
        base_model_name(options.model),
        ray_options.replicas,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        _stop(serve)


def _stop(serve: Any) -> None:
    """Take this application down (only it: a shared cluster may run others); a second ^C is ignored.

    A Ray instance this process started ends with it; a cluster joined through RAY_ADDRESS keeps running.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve.delete("lorakit")
