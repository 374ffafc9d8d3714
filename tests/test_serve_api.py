"""The HTTP API on a live uvicorn server (127.0.0.1, tiny model): the official openai client, auth, every
bad input, disconnects, overload, dynamic load/unload and combinations."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import pytest
import uvicorn
from serve_fixtures import merged_greedy, tokenizer, write_adapter, write_adapters

from lorakit import LoraConfig
from lorakit.models.tiny import tiny_llama
from lorakit.serve.server import ServeOptions, build_app

KEY = "sekret-key"


@contextmanager
def live_server(options: ServeOptions, model=None) -> Iterator[tuple[str, object]]:
    """(base URL, engine) of a server on a free port of 127.0.0.1, stopped on exit."""
    app, engine = build_app(options, model if model is not None else tiny_llama(), tokenizer())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = write_adapters(tmp_path_factory.mktemp("served"), ["a", "c", "d"])
    write_adapter(root / "big", LoraConfig(r=16, target_modules=["q_proj"], init_lora_weights=False), 5)
    broken = root / "broken"
    shutil.copytree(root / "a", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    return root


@pytest.fixture(scope="module")
def server(folder):
    options = ServeOptions(model="tiny", adapters=str(folder), api_key=KEY, max_batch=8, max_loras=2,
                           max_lora_rank=8)
    with live_server(options) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def _post(url: str, body: object, *, key: str | None = KEY, raw: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(url, content=raw, headers={**headers, "Content-Type": "application/json"})
    return httpx.post(url, json=body, headers=headers, timeout=30)


def _ids(prompt: str) -> list[int]:
    return tokenizer()(prompt).input_ids


def _text(ids: list[int]) -> str:
    return tokenizer().decode(ids, skip_special_tokens=True)


def test_openai_client_completions_streamed_and_not(client, folder):
    expected = _text(merged_greedy(_ids("hello there"), 10, {folder / "a": 1.0}))
    whole = client.completions.create(model="a", prompt="hello there", max_tokens=10, temperature=0)
    assert whole.choices[0].text == expected
    assert whole.usage.prompt_tokens == len(_ids("hello there"))
    assert whole.usage.completion_tokens == 10 or whole.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="a", prompt="hello there", max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    base = client.completions.create(model="tiny", prompt="hello there", max_tokens=10, temperature=0)
    assert base.choices[0].text == _text(merged_greedy(_ids("hello there"), 10))


def test_openai_client_chat_streamed_and_not(client, folder):
    messages = [{"role": "user", "content": "hi!"}]
    encoded = tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = list(encoded["input_ids"])
    expected = _text(merged_greedy(prompt, 12, {folder / "d": 1.0}))
    whole = client.chat.completions.create(model="d", messages=messages, max_tokens=12, temperature=0)
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == len(prompt)
    stream = client.chat.completions.create(model="d", messages=messages, max_tokens=12, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected


def test_models_lists_base_and_adapters(client):
    names = [m.id for m in client.models.list().data]
    assert names[0] == "tiny" and {"a", "c", "d", "big", "broken"} <= set(names)


def test_auth(server):
    url = server[0]
    for key in (None, "wrong"):
        response = _post(url + "/v1/completions", {"model": "a", "prompt": "x"}, key=key)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    load = _post(url + "/v1/load_lora_adapter", {"lora_name": "z", "lora_path": "/"}, key=None)
    assert load.status_code == 401
    assert httpx.get(url + "/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize(("body", "raw", "status", "param", "words"), [
    (None, '{"model": "a", "prompt": ', 400, None, "JSON"),
    ({"model": "a", "prompt": "x", "max_tokens": "many"}, None, 400, "max_tokens", "integer"),
    ({"model": "a", "prompt": "x", "max_tokenz": 3}, None, 400, "max_tokenz", "Extra"),
    ({"model": "a", "prompt": 5}, None, 400, "prompt", ""),
    ({"model": "nope", "prompt": "x"}, None, 404, "model", "does not exist"),
    ({"model": "a", "prompt": "x", "max_tokens": 0}, None, 400, "max_tokens", ">= 1"),
    ({"model": "a", "prompt": "x", "max_tokens": 10_000}, None, 400, "max_tokens", "context"),
    ({"model": "a", "prompt": "y" * 300}, None, 400, "prompt", "context"),
    ({"model": "big", "prompt": "x"}, None, 400, "model", "max-lora-rank"),
    ({"model": "broken", "prompt": "x"}, None, 400, "model", "failed to load"),
    ({"model": "a*0.5+d*0.5", "prompt": "x"}, None, 400, "model", "DoRA"),
    ({"model": "a*x", "prompt": "x"}, None, 400, "model", "adapter*weight"),
    ({"model": "a", "prompt": "x", "temperature": -1}, None, 400, "temperature", ""),
    ({"model": "a", "prompt": "x", "n": 2}, None, 400, "n", ""),
    ({"model": "a", "prompt": [1, 999]}, None, 400, "prompt", "token ids"),
])
def test_bad_input_is_a_4xx_with_an_openai_error_body(server, body, raw, status, param, words):
    response = _post(server[0] + "/v1/completions", body, raw=raw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"]


def test_bad_chat_input(server):
    url = server[0] + "/v1/chat/completions"
    assert _post(url, {"model": "a", "messages": []}).status_code == 400
    response = _post(url, {"model": "a", "messages": [{"role": "wizard", "content": "x"}]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    long = _post(url, {"model": "a", "messages": [{"role": "user", "content": "y" * 300}]})
    assert long.status_code == 400 and long.json()["error"]["param"] == "messages"
    assert "context" in long.json()["error"]["message"]


def test_a_failing_adapter_fails_only_its_requests(client, server):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="broken", prompt="x", max_tokens=3)
    fine = client.completions.create(model="c", prompt="x", max_tokens=3, temperature=0)
    assert fine.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(server[0] + "/health").status_code == 200


def test_dynamic_load_and_unload(client, server, tmp_path):
    url = server[0]
    path = write_adapter(tmp_path / "new", LoraConfig(r=4, target_modules=["k_proj", "up_proj"],
                                                      init_lora_weights=False), 11)
    response = _post(url + "/v1/load_lora_adapter", {"lora_name": "fresh", "lora_path": str(path)})
    assert response.status_code == 200, response.text
    assert "fresh" in [m.id for m in client.models.list().data]
    text = client.completions.create(model="fresh", prompt="abc", max_tokens=8, temperature=0).choices[0].text
    assert text == _text(merged_greedy(_ids("abc"), 8, {path: 1.0}))
    again = _post(url + "/v1/load_lora_adapter", {"lora_name": "fresh", "lora_path": str(path)})
    assert again.status_code == 400 and "already" in again.json()["error"]["message"]
    missing = _post(url + "/v1/load_lora_adapter", {"lora_name": "other", "lora_path": str(tmp_path)})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "lora_path"
    assert _post(url + "/v1/unload_lora_adapter", {"lora_name": "fresh"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="fresh", prompt="abc", max_tokens=8)
    assert _post(url + "/v1/unload_lora_adapter", {"lora_name": "fresh"}).status_code == 404


def test_combination_request_equals_combine_adapters(client, folder):
    text = client.completions.create(model="a*0.7+c*0.3", prompt="hello", max_tokens=8,
                                     temperature=0).choices[0].text
    assert text == _text(merged_greedy(_ids("hello"), 8, {folder / "a": 0.7, folder / "c": 0.3}))


def test_metrics(client, server):
    for _ in range(2):  # the first finds "a" in a slot or loads it; the second finds it there (a hit)
        client.completions.create(model="a", prompt="metrics", max_tokens=4, temperature=0)
    with pytest.raises(openai.NotFoundError):  # counted as a 404 whatever ran before
        client.completions.create(model="no-such-adapter", prompt="metrics", max_tokens=4)
    text = httpx.get(server[0] + "/metrics").text
    for name in ('lorakit_requests_total{model="a",status="ok"}', "lorakit_generation_tokens_total",
                 "lorakit_time_to_first_token_seconds_bucket", "lorakit_inter_token_latency_seconds_count",
                 "lorakit_running_requests", "lorakit_waiting_requests",
                 'lorakit_adapter_slot_total{outcome="hit"}',
                 "lorakit_adapter_load_seconds_count", 'status="404"'):
        assert name in text, name


def _stream_first_chunk(url: str, body: dict) -> tuple[httpx.Client, httpx.Response, Iterator[str]]:
    http = httpx.Client(timeout=30)
    response = http.send(http.build_request("POST", url + "/v1/completions", json={**body, "stream": True}),
                         stream=True)
    lines = response.iter_lines()
    while not next(lines).startswith("data: "):
        pass
    return http, response, lines  # dropping the line iterator would close the stream


def _wait(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_disconnect_frees_the_row_and_overload_answers_429(folder):
    options = ServeOptions(model="tiny", adapters=str(folder), max_batch=1, max_queue=1, max_lora_rank=8)
    # a long context, so the first request is still running when the client leaves
    long = {"model": "a", "prompt": "x", "max_tokens": 8000, "ignore_eos": True, "temperature": 0}
    with live_server(options, tiny_llama(max_position_embeddings=8192)) as (url, engine):
        first_client, first, _lines = _stream_first_chunk(url, long)
        assert len(engine.running) == 1
        short = {**long, "max_tokens": 3}
        queued = threading.Thread(target=lambda: _post(url + "/v1/completions", short, key=None))
        queued.start()
        _wait(lambda: engine.queue_length == 1)  # max_batch=1: the second request waits
        refused = _post(url + "/v1/completions", long, key=None)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        first.close()  # the client goes away mid-stream
        first_client.close()
        queued.join(timeout=30)  # the queued request got the freed row and finished
        assert not queued.is_alive()
        _wait(lambda: not engine.running)
        metrics = httpx.get(url + "/metrics").text
        assert 'lorakit_requests_total{model="a",status="cancelled"} 1.0' in metrics
        assert 'status="429"' in metrics
