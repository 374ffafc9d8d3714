"""`lorakit serve --ray` on a local Ray instance: 2 replicas of a tiny model, routed by adapter.

One bounded Ray instance for the module (2 CPUs, no dashboard, loopback HTTP, a temporary folder); every
HTTP call has a timeout. Checked: outputs equal the merged-adapter oracle (the same as `lorakit serve`),
lorakit's own validation and error bodies come through, requests for one adapter stay on one replica
(``x-lorakit-replica``), and a replica killed while it streams is replaced, its stream ends cleanly and the
requests that follow succeed.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from distributed_support import free_port
from serve_fixtures import merged_greedy, tokenizer, write_adapters
from train_support import write_tiny_model

ray = pytest.importorskip("ray", reason="the ray extra (pip install lorakit[ray]) is not installed")
from ray import serve  # noqa: E402

from lorakit.serve.ray_app import REPLICA_HEADER, RayOptions, build, start_ray_app  # noqa: E402
from lorakit.serve.server import ServeOptions  # noqa: E402

TIMEOUT = httpx.Timeout(90.0)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    folder = tmp_path_factory.mktemp("ray")
    model = write_tiny_model(folder / "model")
    adapters = write_adapters(folder / "adapters", ["a", "b"])
    # Ray's sockets live under its temp folder; a short path keeps them under the Unix socket limit.
    ray_tmp = tempfile.mkdtemp(prefix="lkray")
    ray.init(
        num_cpus=2, include_dashboard=False, _temp_dir=ray_tmp, log_to_driver=False, configure_logging=False
    )
    try:
        port = free_port()
        options = ServeOptions(
            model=str(model), adapters=str(adapters), port=port, max_batch=4, max_loras=2, max_lora_rank=8
        )
        # What `lorakit serve --ray` runs (before it waits for ^C), in the Ray instance started above.
        start_ray_app(options, RayOptions(replicas=2, replica_cpus=0.5, request_timeout_s=60))
        yield {"url": f"http://127.0.0.1:{port}", "adapters": adapters}
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _complete(url: str, model: str, prompt: str, max_tokens: int) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT)


def _oracle(prompt: str, max_tokens: int, adapter: Path | None) -> str:
    ids = merged_greedy(tokenizer()(prompt).input_ids, max_tokens, {adapter: 1.0} if adapter else None)
    return tokenizer().decode(ids, skip_special_tokens=True)


def test_outputs_errors_and_adapter_affinity(served: dict) -> None:
    url, adapters = served["url"], served["adapters"]
    for model in ("a", "b", "model"):
        answer = _complete(url, model, "hello there", 8)
        assert answer.status_code == 200, answer.text
        expected = _oracle("hello there", 8, adapters / model if model != "model" else None)
        assert answer.json()["choices"][0]["text"] == expected, model
        assert answer.headers[REPLICA_HEADER]
    # lorakit serve's own validation and error bodies, from the replica's app.
    unknown = _complete(url, "zzz", "hi", 4)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    misspelt = httpx.post(
        url + "/v1/completions", json={"model": "a", "prompt": "x", "max_tokenz": 3}, timeout=TIMEOUT
    )
    assert misspelt.status_code == 400 and misspelt.json()["error"]["param"] == "max_tokenz"
    listed = httpx.get(url + "/v1/models", timeout=TIMEOUT).json()
    assert {m["id"] for m in listed["data"]} == {"model", "a", "b"}
    dynamic = httpx.post(
        url + "/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": "x"}, timeout=TIMEOUT
    )
    assert dynamic.status_code == 400 and "--adapters" in dynamic.json()["error"]["message"]

    time.sleep(2.0)  # the routers learn which replica holds which adapter
    for model in ("a", "b"):
        replicas = {_complete(url, model, f"x{i}", 2).headers[REPLICA_HEADER] for i in range(4)}
        assert len(replicas) == 1, (model, replicas)
    # A streamed chat reaches the same replica as the adapter's completions and is lorakit's SSE.
    body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as stream:
        lines = [line for line in stream.iter_lines() if line]
        assert stream.headers[REPLICA_HEADER] == _complete(url, "a", "y", 1).headers[REPLICA_HEADER]
    assert lines[0].startswith("data: {") and lines[-1] == "data: [DONE]"


def test_killed_replica_is_replaced_and_its_requests_end_cleanly(served: dict) -> None:
    url, adapters = served["url"], served["adapters"]
    victim = _complete(url, "a", "warm", 1).headers[REPLICA_HEADER]
    body = {
        "model": "a",
        "prompt": "count",
        "max_tokens": 200,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    killed = threading.Event()
    results: list[httpx.Response] = []
    # A plain request sent while the replica dies: answered (retried elsewhere) or a clean 503.
    racing = threading.Thread(
        target=lambda: (killed.wait(30), results.append(_complete(url, "a", "race", 30)))
    )
    racing.start()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as stream:
        assert stream.headers[REPLICA_HEADER] == victim
        lines = stream.iter_lines()
        first = next(line for line in lines if line)
        assert first.startswith("data: {")
        _kill_replica(victim)
        killed.set()
        rest = [line for line in lines if line]  # ends (no hang): completed, or an error event
    racing.join(120)
    assert not racing.is_alive()
    assert rest[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in rest)
    assert results[0].status_code in (200, 503), results[0].text
    if results[0].status_code == 200:
        assert results[0].json()["choices"][0]["text"] == _oracle("race", 30, adapters / "a")
    else:
        assert "lost" in results[0].json()["error"]["message"]

    # Requests after the loss succeed, and Ray Serve brings the replica count back to 2.
    after = _complete(url, "a", "hello there", 8)
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == _oracle(
        "hello there", 8, adapters / "a"
    )
    assert after.headers[REPLICA_HEADER] != victim
    deadline = time.monotonic() + 90
    while not (
        _running_replicas() == 2 and len(replicas := _replica_actors()) == 2 and victim not in str(replicas)
    ):
        assert time.monotonic() < deadline, "the killed replica was not replaced within 90 s"
        time.sleep(1.0)
    # and the replacement serves
    assert {_complete(url, "b", f"z{i}", 1).status_code for i in range(3)} == {200}


def test_serve_run_builder_reads_key_value_arguments() -> None:
    with pytest.raises(ValueError, match="unknown option 'replica'"):
        build({"model": "m", "replica": "2"})
    application = build({"model": "m", "replicas": "3", "replica_cpus": "0.25", "max_loras": "4"})
    assert application is not None


def _kill_replica(tag: str) -> None:
    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if tag in a["name"]]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)


def _replica_actors() -> list[str]:
    return [
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "LorakitReplica" in a["name"]
    ]


def _running_replicas() -> int:
    status = serve.status().applications["lorakit"].deployments["LorakitReplica"]
    return status.replica_states.get("RUNNING", 0)


def test_cli_serve_ray_passes_the_replica_options(monkeypatch: pytest.MonkeyPatch) -> None:
    import lorakit.cli.main as cli
    import lorakit.serve.ray_app as ray_app

    started: list[tuple[ServeOptions, RayOptions]] = []
    monkeypatch.setattr(ray_app, "run_ray_server", lambda options, scale: started.append((options, scale)))
    arguments = ["serve", "--ray", "--replicas", "3", "--adapters-per-replica", "5", "--model", "m"]
    assert cli.main([*arguments, "--replica-cpus", "0.5", "--port", "8123"]) == 0
    options, scale = started[0]
    assert (options.model, options.port) == ("m", 8123)
    assert (scale.replicas, scale.adapters_per_replica, scale.replica_cpus) == (3, 5, 0.5)


def test_asgi_call_streams_chunk_by_chunk_and_an_early_close_is_a_disconnect() -> None:
    import asyncio

    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    from lorakit.serve.asgi_call import asgi_call

    seen: list[str] = []

    async def endpoint(request):  # streams until the client goes away
        body = await request.body()

        async def chunks():
            try:
                for index in range(1000):
                    if await request.is_disconnected():
                        return
                    yield f"{body.decode()}{index};"
                    await asyncio.sleep(0.01)
            finally:  # reached by the disconnect (lorakit's app cancels the engine request here)
                seen.append("closed")

        return StreamingResponse(chunks(), headers={"x-test": "yes"})

    app = Starlette(routes=[Route("/s", endpoint, methods=["POST"])])

    async def scenario() -> list:
        stream = asgi_call(app, "POST", "/s?q=1", b"c", {"content-type": "text/plain"})
        received = [await stream.__anext__() for _ in range(3)]
        await stream.aclose()  # the ingress went away
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        return received

    received = asyncio.run(asyncio.wait_for(scenario(), 30))
    status, headers = received[0]
    assert status == 200 and headers["x-test"] == "yes"
    assert received[1:] == [b"c0;", b"c1;"]  # each chunk as the app sent it, not the stream at the end
    assert seen == ["closed"]
