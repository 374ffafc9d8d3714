"""The serving engine: one base model, many adapters, continuous batching across them (no HTTP here).

Every loop iteration (`Engine.step`):

1. takes new requests, cancellations and adapter unloads handed over by other threads;
2. admits waiting requests while the batch has room and the step's prefill budget lasts: a request whose
   adapter sits in a slot (hit) or can be written into a free or least-recently-used idle slot (miss, maybe
   eviction) is admitted; the step's admitted requests are prefilled together in one left-padded forward
   pass (each row with its own slot and positions) and join the running batch with one concatenation; an
   adapter not yet parsed is read from disk on a loader thread meanwhile, so one adapter loading never
   stalls the others' decoding;
3. runs one decoding step for every running row in one forward pass, each row with its own cache
   positions and its own adapter slot, samples each row with its own parameters, and drops the rows that
   finished.

Rows therefore join between decoding steps and leave when done; nothing waits for the batch to drain.
A row's greedy tokens are those of running its request alone with its adapter merged into the base, up to
float round-off in the last bits (the batched attention sees masked padding; LoRA is added unmerged).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import torch
from torch import nn

from lorakit.serve.adapters import AdapterCatalog, AdapterError, HostCache, involves, parse_combination
from lorakit.serve.errors import ServeError
from lorakit.serve.loader import AdapterLoader
from lorakit.serve.pool import AdapterPool, SlotModule, module_shape
from lorakit.serve.requests import Event, Request, collector
from lorakit.serve.sampling import cut_at_stop, safe_prefix, sample_token
from lorakit.serve.scheduler import PaddedBatch, SlotTable

LOAD_GRACE_SECONDS = 0.02  # how long a step waits for adapter files being read before admitting


class EngineObserver:
    """Hooks the engine calls (from its thread); a server records them as metrics. Defaults do nothing."""

    def request_finished(self, model: str, status: str, prompt_tokens: int,
                         completion_tokens: int) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def batch(self, running: int, waiting: int) -> None: ...
    def slot(self, outcome: str) -> None: ...  # "hit", "miss" or "eviction"
    def adapter_loaded(self, seconds: float) -> None: ...


class Engine:
    """Serve ``model`` (a causal LM in eval mode) with the adapters of ``catalog``.

    Args:
        base_name: the model name that means "no adapter".
        max_batch: running rows at most.
        max_loras: adapter slots (besides the base slot 0); max_lora_rank: their padded rank.
        max_cpu_loras: parsed adapters kept in host memory.
        max_prefill_tokens: prompt tokens prefilled per step at most (at least one request is admitted):
            joining requests are spread over steps, so running rows wait less between tokens.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, base_name: str = "base",
                 catalog: AdapterCatalog | None = None, max_batch: int = 16, max_loras: int = 8,
                 max_lora_rank: int = 16, max_cpu_loras: int = 32, max_prefill_tokens: int = 256,
                 observer: EngineObserver | None = None) -> None:
        if max_batch < 1 or max_prefill_tokens < 1:
            raise ValueError(f"max_batch and max_prefill_tokens must be >= 1, got {max_batch}, "
                             f"{max_prefill_tokens}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.base_name, self.max_batch, self.max_prefill_tokens = base_name, max_batch, max_prefill_tokens
        self.catalog = catalog if catalog is not None else AdapterCatalog()
        self.observer = observer or EngineObserver()
        weight = next(model.parameters())
        self.adapter_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.pool = AdapterPool(max_loras, max_lora_rank, dtype=self.adapter_dtype, device=weight.device)
        self.slots = SlotTable(max_loras)
        self.modules = {name: m for name, m in model.named_modules()
                        if isinstance(m, (nn.Linear, nn.Embedding)) or type(m).__name__ == "Conv1D"}
        self.max_context = int(getattr(model.config, "max_position_embeddings", 2048))
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.batch = PaddedBatch()
        self.running: list[Request] = []
        self.waiting: deque[Request] = deque()
        self._inbox: deque[Request] = deque()
        self._cancels: set[str] = set()
        self._forget: deque[str] = deque()
        self._wake = threading.Condition()
        self.loader = AdapterLoader(self.catalog, self.modules, max_lora_rank, self.adapter_dtype,
                                    max_cpu_loras, self.observer.adapter_loaded, self._notify)
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- what other threads call ---------------------------------------------------------------------

    def resolve(self, model_name: str | None) -> str | None:
        """The adapter key a model name stands for (None: the base model).

        Raises:
            AdapterError (404): no served adapter of that name, or a combination naming one.
        """
        if model_name is None or model_name == self.base_name:
            return None
        terms = parse_combination(model_name)
        if terms is None:
            if self.catalog.path(model_name) is None:
                raise AdapterError(f"the model {model_name!r} does not exist", status=404)
            return model_name
        for name, _ in terms:
            if self.catalog.path(name) is None:
                raise AdapterError(f"model {model_name!r} names {name!r}, which is not a served adapter",
                                   status=404)
        return "+".join(f"{name}*{weight!r}" for name, weight in terms)

    def submit(self, request: Request) -> None:
        """Queue ``request``; its events arrive through ``request.on_event``.

        Raises:
            ServeError: unknown model (404), prompt or prompt + max_tokens beyond the context (400).
        """
        request.model = self.resolve(request.model)
        prompt = len(request.prompt_ids)
        if prompt >= self.max_context:
            raise ServeError(f"the prompt has {prompt} tokens; the model's context is "
                             f"{self.max_context}", param="prompt")
        if prompt + request.params.max_tokens > self.max_context:
            raise ServeError(f"max_tokens {request.params.max_tokens} plus the prompt's {prompt} tokens "
                             f"exceed the model's context of {self.max_context}", param="max_tokens")
        with self._wake:
            self._inbox.append(request)
            self._wake.notify()

    def cancel(self, request_id: str) -> None:
        """Stop a request (a client went away): its row is freed at the next step."""
        with self._wake:
            self._cancels.add(request_id)
            self._wake.notify()

    @property
    def host(self) -> HostCache:
        """The parsed adapters kept in host memory."""
        return self.loader.host

    @property
    def queue_length(self) -> int:
        return len(self._inbox) + len(self.waiting)

    def load_adapter(self, name: str, path: str) -> None:
        """Serve the adapter folder ``path`` as ``name`` (parsed and checked now).

        Raises:
            AdapterError: a taken or malformed name, not an adapter folder, or one that does not fit.
        """
        self.catalog.add(name, path)
        try:
            self.loader.host.put(name, self.loader.parse(name))
        except Exception:
            self.catalog.remove(name)
            raise

    def unload_adapter(self, name: str) -> None:
        """Stop serving ``name``; running rows finish, waiting requests for it fail with 404."""
        self.catalog.remove(name)
        self.loader.forget(lambda key: involves(key, name))
        with self._wake:
            self._forget.append(name)
            self._wake.notify()

    def start(self) -> None:
        """Run the loop on a background thread until `stop`."""
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="lorakit-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        self.loader.shutdown()

    def generate(self, requests: list[Request]) -> list[Event]:
        """Run ``requests`` to completion on the calling thread (no `start` needed); one summary each."""
        results = {r.request_id: Event(r.request_id) for r in requests}
        for request in requests:
            request.on_event = collector(results[request.request_id])
            self.submit(request)
        while any(not e.finished for e in results.values()):
            if not self.step():
                time.sleep(0.001)
        return [results[r.request_id] for r in requests]

    # --- the loop ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._has_work():
                    self._wake.wait()
                if self._stopping:
                    return
            if not self.step():
                with self._wake:
                    self._wake.wait(timeout=0.005)

    def _has_work(self) -> bool:
        return bool(self._inbox or self.waiting or self.running or self._cancels or self._forget)

    @torch.no_grad()
    def step(self) -> bool:
        """One loop iteration; False when nothing could progress (waiting on loads or slots)."""
        with self._wake:
            self.waiting.extend(self._inbox)
            self._inbox.clear()
            cancels, self._cancels = self._cancels, set()
            forget = list(self._forget)
            self._forget.clear()
        progress = bool(cancels or forget)
        for name in forget:
            self._forget_adapter(name)
        if cancels:
            self._cancel(cancels)
        progress |= self._admit()
        if self.running:
            self._decode()
            progress = True
        self.observer.batch(len(self.running), len(self.waiting))
        return progress

    def _cancel(self, ids: set[str]) -> None:
        for request in [r for r in self.waiting if r.request_id in ids]:
            self.waiting.remove(request)
            self._finish(request, "cancelled")
        keep = []
        for row, request in enumerate(self.running):
            if request.request_id in ids:
                self._finish(request, "cancelled")
            else:
                keep.append(row)
        self._keep(keep)

    def _forget_adapter(self, name: str) -> None:
        for key in [k for k in self.slots.slot_of if involves(k, name)]:
            slot = self.slots.forget(key)
            if slot is not None:
                self.pool.clear(slot)
        for request in [r for r in self.waiting if r.model is not None and involves(r.model, name)]:
            self.waiting.remove(request)
            self._finish(request, "error", AdapterError(f"adapter {name!r} was unloaded", status=404))

    def _admit(self) -> bool:
        needed = {r.model for r in self.waiting if r.model is not None and self.slots.lookup(r.model) is None}
        self.loader.prefetch(needed, LOAD_GRACE_SECONDS)
        admitted: list[Request] = []
        blocked: deque[Request] = deque()
        while self.waiting:
            request = self.waiting.popleft()
            width = max([len(request.prompt_ids), *(len(r.prompt_ids) for r in admitted)])
            if len(self.running) + len(admitted) >= self.max_batch or \
                    (admitted and width * (len(admitted) + 1) > self.max_prefill_tokens):
                blocked.append(request)
                continue
            try:
                slot = self._slot_for(request.model)
            except ServeError as error:
                self._fail_waiting(request.model, error)
                self._finish(request, "error", error)
                continue
            if slot is None:
                blocked.append(request)
                continue
            if slot:
                self.slots.pin(slot)
            request.slot = slot
            admitted.append(request)
        self.waiting = blocked
        if admitted:
            self._prefill(admitted)
        return bool(admitted)

    def _slot_for(self, key: str | None) -> int | None:
        """The slot holding ``key`` (writing it if needed), or None while it loads or no slot is free."""
        if key is None:
            return 0
        slot = self.slots.lookup(key)
        if slot is not None:
            self.observer.slot("hit")
            return slot
        parsed = self.loader.ready(key)
        if parsed is None:
            return None
        free = self.slots.free_slot()
        if free is None:
            return None
        slot, evicted = free
        if evicted is not None:
            self.observer.slot("eviction")
        for module in parsed.weights:
            self._ensure_route(module)
        self.pool.write(slot, parsed.weights)
        self.slots.assign(slot, key)
        self.observer.slot("miss")
        return slot

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify()

    def _fail_waiting(self, key: str | None, error: ServeError) -> None:
        for request in [r for r in self.waiting if r.model == key]:
            self.waiting.remove(request)
            self._finish(request, "error", error)

    def _ensure_route(self, name: str) -> None:
        if name in self.pool.routes:
            return
        module = self.modules[name]
        route = self.pool.add_route(name, *module_shape(module))
        parent_name, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent_name), child, SlotModule(module, route))

    def _set_rows(self, slots: list[int]) -> None:
        self.pool.set_rows(torch.tensor(slots) if any(slots) else None)

    def _prefill(self, requests: list[Request]) -> None:
        """Prefill ``requests`` in one left-padded forward pass (each row its own slot and positions);
        the rows that go on join the running batch with one concatenation."""
        device = self.pool.device
        lengths = [len(r.prompt_ids) for r in requests]
        width = max(lengths)
        rows = [[0] * (width - n) + r.prompt_ids for r, n in zip(requests, lengths)]
        ids = torch.tensor(rows, device=device)                                        # (n, width)
        mask = (torch.arange(width)[None, :] >= torch.tensor([width - n for n in lengths])[:, None]).long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)                                 # (n, width)
        self._set_rows([r.slot for r in requests])
        inputs = {"input_ids": ids, "use_cache": True, "logits_to_keep": 1}
        if len(requests) > 1:  # alone, a row has no padding: the plain causal pass
            inputs.update(attention_mask=mask.to(device), position_ids=positions.to(device))
        output = self.model(**inputs)
        logits = output.logits[:, -1]                                                  # (n, vocab)
        now = time.perf_counter()
        keep = []
        for row, request in enumerate(requests):
            token = sample_token(logits[row], request.params, request.generator)
            self.observer.first_token(now - request.arrival)
            if not self._accept(request, token):
                keep.append(row)
        if keep:
            self.running.extend(requests[i] for i in keep)
            self.batch.add(output.cache, [lengths[i] for i in keep], keep)

    def _decode(self) -> None:
        mask, positions = self.batch.step_inputs()
        device = self.pool.device
        ids = torch.tensor([[r.generated[-1]] for r in self.running], device=device)
        self._set_rows([r.slot for r in self.running])
        output = self.model(input_ids=ids, attention_mask=mask.to(device), position_ids=positions.to(device),
                            cache=self.batch.cache, use_cache=True)
        self.batch.cache = output.cache
        self.batch.advance()
        logits = output.logits[:, -1]
        keep = [row for row, request in enumerate(self.running)
                if not self._accept(request, sample_token(logits[row], request.params, request.generator))]
        self._keep(keep)

    def _keep(self, rows: list[int]) -> None:
        self.running = [self.running[i] for i in rows]
        self.batch.keep(rows)

    def _accept(self, request: Request, token: int) -> bool:
        """Record one new token of ``request`` and report it; True when the request finished."""
        now = time.perf_counter()
        if request.last_token_time is not None:
            self.observer.inter_token(now - request.last_token_time)
        request.last_token_time = now
        request.generated.append(token)
        params = request.params
        eos = token in self.eos_ids and not params.ignore_eos
        text = self.tokenizer.decode(request.generated[:-1] if eos else request.generated,
                                     skip_special_tokens=True)
        text, stopped = cut_at_stop(text, params.stop, request.emitted)
        reason = "stop" if eos or stopped else None
        total = len(request.prompt_ids) + len(request.generated)
        if reason is None and (len(request.generated) >= params.max_tokens or total >= self.max_context):
            reason = "length"
        safe = len(text) if reason is not None else safe_prefix(text, params.stop, request.emitted)
        delta, request.emitted, request.text = text[request.emitted:safe], safe, text
        if reason is None:
            request.emit(Event(request.request_id, delta, [token]))
            return False
        self._finish(request, reason, delta=delta, tokens=[token])
        return True

    def _finish(self, request: Request, reason: str, error: ServeError | None = None, *, delta: str = "",
                tokens: list[int] | None = None) -> None:
        if request.slot:
            self.slots.unpin(request.slot)
            request.slot = 0
        status = {"stop": "ok", "length": "ok"}.get(reason, reason)
        prompt, completion = len(request.prompt_ids), len(request.generated)
        self.observer.request_finished(request.model or self.base_name, status, prompt, completion)
        request.emit(Event(request.request_id, delta, tokens or [], reason, error, prompt, completion))

