"""Parsed adapters for the engine's slots: a host-memory LRU in front of the disk, read on a loader thread.

`AdapterLoader.ready(key)` is what the engine asks before writing a slot: the parsed adapter when it is
in host memory, else None while a loader thread reads it (the engine keeps decoding meanwhile), or the
load's `ServeError` when reading or checking it failed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch
from torch import nn

from lorakit.serve.adapters import (
    AdapterCatalog,
    AdapterError,
    HostCache,
    ParsedAdapter,
    combine,
    parse_adapter_folder,
    parse_combination,
)


class AdapterLoader:
    """Read, check and cache adapters named by key (a served name or a combination ``a*0.7+b*0.3``).

    Args:
        modules: the base model's adaptable modules by qualified name (what adapters are checked against).
        max_rank: the slots' rank; capacity: parsed adapters kept in host memory (``--max-cpu-loras``).
        on_loaded: called with the seconds each read took (metrics); on_done: called when a background
            read ends (wakes the engine).
    """

    def __init__(self, catalog: AdapterCatalog, modules: dict[str, nn.Module], max_rank: int,
                 dtype: torch.dtype, capacity: int, on_loaded: Callable[[float], None],
                 on_done: Callable[[], None]) -> None:
        self.catalog, self.modules, self.max_rank, self.dtype = catalog, modules, max_rank, dtype
        self.host = HostCache(capacity)
        self._on_loaded, self._on_done = on_loaded, on_done
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="lorakit-adapter-load")
        self._loading: dict[str, Future] = {}

    def parse(self, key: str) -> ParsedAdapter:
        """Read (or combine) adapter ``key`` now, on the calling thread.

        Raises:
            AdapterError: unknown (404), unreadable, not fitting the base, or a rank above the slots'.
        """
        start = time.perf_counter()
        terms = parse_combination(key)
        if terms is None:
            path = self.catalog.path(key)
            if path is None:
                raise AdapterError(f"the model {key!r} does not exist", status=404)
            parsed = parse_adapter_folder(key, path, self.modules, self.max_rank, self.dtype)
        else:
            parts = []
            for name, weight in terms:
                part = self.host.get(name) or self.parse(name)
                self.host.put(name, part)
                parts.append((part, weight))
            parsed = combine(key, parts, self.max_rank)
        self._on_loaded(time.perf_counter() - start)
        return parsed

    def prefetch(self, keys: Iterable[str], grace: float) -> None:
        """Start reading every key not in host memory, then wait up to ``grace`` seconds for them.

        Reading an adapter file takes milliseconds: the grace lets such reads be ready in the same engine
        step, while a slow disk still never stalls decoding for longer than ``grace``.
        """
        pending = []
        for key in keys:
            if self.host.get(key) is None:
                future = self._start(key)
                if not future.done():
                    pending.append(future)
        if pending:
            wait(pending, timeout=grace)

    def ready(self, key: str) -> ParsedAdapter | None:
        """The parsed adapter, or None while it is being read. Raises the `ServeError` of a failed read."""
        parsed = self.host.get(key)
        if parsed is not None:
            return parsed
        future = self._start(key)
        if not future.done():
            return None
        del self._loading[key]
        parsed = future.result()
        self.host.put(key, parsed)
        return parsed

    def forget(self, predicate: Callable[[str], bool]) -> None:
        """Drop parsed adapters whose key satisfies ``predicate`` (an unloaded adapter)."""
        self.host.drop(predicate)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _start(self, key: str) -> Future:
        future = self._loading.get(key)
        if future is None:
            self._loading[key] = future = self._executor.submit(self.parse, key)
            future.add_done_callback(lambda _: self._on_done())
        return future
