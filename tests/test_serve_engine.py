"""The serving engine: every request's greedy tokens equal generating it alone with its adapter merged."""

from __future__ import annotations

import time

import pytest
import torch
from serve_fixtures import merged_greedy, tokenizer, write_adapter, write_adapters

import lorakit
from lorakit import LoraConfig
from lorakit.models.tiny import tiny_llama
from lorakit.serve.adapters import AdapterCatalog
from lorakit.serve.engine import Engine, EngineObserver
from lorakit.serve.errors import ServeError
from lorakit.serve.requests import Request
from lorakit.serve.sampling import SamplingParams

PROMPTS = ["hello world", "abc", "the quick brown fox", "zz", "lorem ipsum dolor sit", "x", "ab ab", "q"]


class Recorder(EngineObserver):
    def __init__(self) -> None:
        self.slots: list[str] = []
        self.batches: list[int] = []

    def slot(self, outcome: str) -> None:
        self.slots.append(outcome)

    def batch(self, running: int, waiting: int) -> None:
        self.batches.append(running)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return write_adapters(tmp_path_factory.mktemp("adapters"))


def _engine(folder, **options) -> Engine:
    return Engine(tiny_llama(), tokenizer(), catalog=AdapterCatalog(folder), **options)


def _greedy(prompt: str, model: str | None, max_tokens: int) -> Request:
    return Request(tokenizer()(prompt).input_ids, model, SamplingParams(max_tokens=max_tokens, temperature=0))


def test_mixed_batch_equals_each_request_alone_merged(adapters):
    """Ranks 2-8, rsLoRA over all linear layers, DoRA and base rows, finishing at different steps."""
    observer = Recorder()
    engine = _engine(adapters, max_batch=8, max_loras=4, max_lora_rank=8, observer=observer)
    names = ["a", None, "b", "d", "c", "a", "d", None]
    lengths = [12, 7, 20, 5, 15, 9, 3, 11]
    requests = [_greedy(p, n, k) for p, n, k in zip(PROMPTS, names, lengths)]
    results = engine.generate(requests)
    distinct = set()
    for request, name, length, result in zip(requests, names, lengths, results):
        expected = merged_greedy(request.prompt_ids, length, {adapters / name: 1.0} if name else None)
        assert result.token_ids == expected, f"{name}: {result.token_ids} != {expected}"
        assert result.finish_reason == ("stop" if len(expected) < length else "length")
        assert result.text == tokenizer().decode(expected, skip_special_tokens=True)
        distinct.add(tuple(expected))
    assert len(distinct) >= 6  # the adapters really change the tokens, so the check can tell them apart
    assert max(observer.batches) >= 6  # and the rows did share the batch


def test_requests_join_a_running_batch_between_steps(adapters):
    """A request submitted while others decode joins at once (continuous batching) and stays exact."""
    engine = _engine(adapters, max_batch=4, max_loras=4, max_lora_rank=8)
    first = _greedy(PROMPTS[2], "b", 20)
    done: dict[str, list[int]] = {}
    tokens: dict[str, list[int]] = {first.request_id: []}

    def on_event(event):
        tokens[event.request_id].extend(event.token_ids)
        if event.finished:
            done[event.request_id] = tokens[event.request_id]

    first.on_event = on_event
    engine.submit(first)
    _step_until(engine, lambda: len(tokens[first.request_id]) >= 4)  # the adapter loads on its own thread
    late = _greedy(PROMPTS[0], "d", 6)
    late.on_event = on_event
    tokens[late.request_id] = []
    engine.submit(late)
    _step_until(engine, lambda: len(engine.running) == 2)
    # joined while the first still runs
    assert len(tokens[first.request_id]) < 20 and first.request_id not in done
    while len(done) < 2:
        engine.step()
    assert done[late.request_id] == merged_greedy(late.prompt_ids, 6, {adapters / "d": 1.0})
    assert done[first.request_id] == merged_greedy(first.prompt_ids, 20, {adapters / "b": 1.0})


def _step_until(engine: Engine, condition) -> None:
    for _ in range(2000):
        if condition():
            return
        if not engine.step():
            time.sleep(0.001)
    raise AssertionError("condition not reached")


def test_slots_are_evicted_least_recently_used_and_reloaded(adapters):
    observer = Recorder()
    engine = _engine(adapters, max_batch=2, max_loras=2, max_lora_rank=8, max_cpu_loras=1, observer=observer)
    order = ["a", "b", "a", "c", "b", "d", "a"]
    for name in order:  # one at a time, so at most one slot is pinned
        result = engine.generate([_greedy("hello", name, 4)])[0]
        assert result.token_ids == merged_greedy(tokenizer()("hello").input_ids, 4, {adapters / name: 1.0})
    # a, b load; a hits; c evicts b (LRU); b evicts a; d evicts c; a evicts b
    assert observer.slots == ["miss", "miss", "hit", "eviction", "miss", "eviction", "miss", "eviction",
                              "miss", "eviction", "miss"]
    assert len(engine.host) == 1


def test_more_adapters_than_slots_wait_for_a_free_slot(adapters):
    engine = _engine(adapters, max_batch=8, max_loras=2, max_lora_rank=8)
    names = ["a", "b", "c", "d", "a", "c"]
    requests = [_greedy(PROMPTS[i], n, 6 + i) for i, n in enumerate(names)]
    results = engine.generate(requests)
    for request, name, result in zip(requests, names, results):
        assert result.token_ids == merged_greedy(request.prompt_ids, request.params.max_tokens,
                                                 {adapters / name: 1.0})


def test_combination_equals_combine_adapters(adapters):
    engine = _engine(adapters, max_loras=2, max_lora_rank=16)
    request = _greedy(PROMPTS[0], "a*0.7+c*-0.5", 10)
    result = engine.generate([request])[0]
    combined = {adapters / "a": 0.7, adapters / "c": -0.5}
    assert result.token_ids == merged_greedy(request.prompt_ids, 10, combined)
    assert result.token_ids != merged_greedy(request.prompt_ids, 10, {adapters / "a": 1.0})


def test_sampling_is_reproducible_per_seed_whatever_the_batch(adapters):
    def sample(with_others: bool) -> list[int]:
        engine = _engine(adapters, max_loras=4, max_lora_rank=8)
        params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.8, seed=7)
        request = Request(tokenizer()("hello").input_ids, "a", params)
        others = [_greedy(p, "b", 8) for p in PROMPTS[:3]] if with_others else []
        return engine.generate([*others, request])[-1].token_ids

    assert sample(False) == sample(True)


def test_stop_strings_end_the_output(adapters):
    engine = _engine(adapters)
    full = engine.generate([_greedy("hello", "a", 12)])[0].text
    stop = full[3:5]
    request = Request(tokenizer()("hello").input_ids, "a",
                      SamplingParams(max_tokens=12, temperature=0, stop=[stop]))
    result = engine.generate([request])[0]
    assert result.finish_reason == "stop" and result.text == full[: full.index(stop)]


def test_bad_requests_raise_serve_errors(adapters, tmp_path):
    engine = _engine(adapters, max_lora_rank=4)
    with pytest.raises(ServeError, match="does not exist") as error:
        engine.submit(_greedy("hi", "nope", 3))
    assert error.value.status == 404
    with pytest.raises(ServeError, match="context"):
        engine.submit(_greedy("hi", None, engine.max_context))
    with pytest.raises(ServeError, match="empty"):
        Request([], None)
    # rank 8 above --max-lora-rank 4: only that request fails, the others run
    results = engine.generate([_greedy("hi", "b", 3), _greedy("hi", "a", 3)])
    assert results[0].finish_reason == "error" and "max-lora-rank" in str(results[0].error)
    assert results[1].finish_reason == "length"
    # an adapter that does not fit the base model
    wide = lorakit.inject(tiny_llama(hidden_size=48), LoraConfig(r=2, target_modules=["q_proj"]), "x")
    lorakit.save_adapter(wide, tmp_path / "wide", adapter_name="x")
    with pytest.raises(ServeError, match="does not fit"):
        engine.load_adapter("wide", str(tmp_path / "wide"))
    assert "wide" not in engine.catalog.names()


def test_cancel_frees_the_row(adapters):
    engine = _engine(adapters)
    events = []
    request = _greedy("hello", "a", 50)
    request.on_event = events.append
    engine.submit(request)
    _step_until(engine, lambda: len(engine.running) == 1)
    engine.cancel(request.request_id)
    engine.step()
    assert not engine.running and events[-1].finish_reason == "cancelled"
    assert not engine.slots.pins  # its slot is free to evict again


def test_unload_and_reload(adapters, tmp_path):
    engine = _engine(adapters)
    prompt = "hello"
    engine.generate([_greedy(prompt, "a", 5)])
    engine.unload_adapter("a")
    engine.step()
    with pytest.raises(ServeError, match="does not exist"):
        engine.submit(_greedy(prompt, "a", 5))
    # the same name, another adapter: the old slot's weights must not be reused
    write_adapter(tmp_path / "a2", LoraConfig(r=4, target_modules=["k_proj"], init_lora_weights=False), 9)
    engine.load_adapter("a", str(tmp_path / "a2"))
    result = engine.generate([_greedy(prompt, "a", 5)])[0]
    assert result.token_ids == merged_greedy(tokenizer()(prompt).input_ids, 5, {tmp_path / "a2": 1.0})


def test_bf16_base_runs(adapters):
    engine = Engine(tiny_llama().to(torch.bfloat16), tokenizer(), catalog=AdapterCatalog(adapters))
    result = engine.generate([_greedy("hello", "d", 4), _greedy("abc", "a", 4)])
    assert all(r.finish_reason in ("length", "stop") and r.token_ids for r in result)


def test_gpt2_conv1d_layers(tmp_path):
    """transformers' Conv1D (weight stored (in, out)) takes slots too."""
    from lorakit.models.tiny import tiny_gpt2

    model = lorakit.inject(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn", "c_proj"],
                                                   init_lora_weights=False), "g")
    lorakit.save_adapter(model, tmp_path / "g", adapter_name="g")
    engine = Engine(tiny_gpt2(), tokenizer(), catalog=AdapterCatalog(tmp_path))
    requests = [_greedy("hello", "g", 8), _greedy("abcdef", None, 5), _greedy("xyz", "g", 10)]
    for request, result in zip(requests, engine.generate(requests)):
        alone = tiny_gpt2()
        if request.model is not None:
            lorakit.load_adapter(alone, tmp_path / "g", adapter_name="g")
            lorakit.merge(alone)
        ids = torch.tensor([request.prompt_ids])
        with torch.no_grad():
            out = alone.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
                                 max_new_tokens=request.params.max_tokens)
        expected = out[0, ids.shape[1]:].tolist()
        assert result.token_ids == expected


def test_prefill_budget_spreads_joining_requests_over_steps(adapters):
    engine = _engine(adapters, max_prefill_tokens=1)
    for prompt in PROMPTS[:3]:
        engine.submit(_greedy(prompt, None, 10))
    engine.step()
    assert len(engine.running) == 1 and len(engine.waiting) == 2  # one request per step, decoding goes on
    engine.step()
    assert len(engine.running) == 2


def test_requests_admitted_together_share_one_prefill_pass(adapters):
    """A step's admitted requests are prefilled in one left-padded forward; rows done at prefill (one
    token) leave, the others join the batch, and every row stays exact."""
    engine = _engine(adapters, max_batch=8, max_loras=4, max_lora_rank=8)
    forwards: list[tuple[int, int]] = []
    engine.model.register_forward_hook(lambda module, args, kwargs, out: forwards.append(
        tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    names = ["b", None, "d", "a", "c"]
    lengths = [1, 6, 1, 9, 4]
    prompts = [PROMPTS[4], PROMPTS[5], PROMPTS[0], PROMPTS[3], PROMPTS[2]]
    requests = [_greedy(p, n, k) for p, n, k in zip(prompts, names, lengths)]
    results = engine.generate(requests)
    width = max(len(r.prompt_ids) for r in requests)
    assert forwards[0] == (5, width)  # all five prompts in the first pass, left-padded to the longest
    assert all(shape[1] == 1 for shape in forwards[1:])  # then decoding steps only
    assert len(forwards) == max(lengths)
    for request, name, length, result in zip(requests, names, lengths, results):
        expected = merged_greedy(request.prompt_ids, length, {adapters / name: 1.0} if name else None)
        assert result.token_ids == expected, f"{name}: {result.token_ids} != {expected}"
