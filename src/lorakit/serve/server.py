"""Put it together: load the base model, find the adapters, build engine + app, run uvicorn."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.models.registry import DEFAULT_CAUSAL_LM
from lorakit.serve.adapters import AdapterCatalog
from lorakit.serve.engine import Engine
from lorakit.serve.metrics import ServeMetrics

logger = logging.getLogger("lorakit.serve")


@dataclass
class ServeOptions:
    """What `lorakit serve` takes (see docs/serving.md)."""

    model: str = DEFAULT_CAUSAL_LM
    adapters: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 16
    max_loras: int = 8
    max_lora_rank: int = 16
    max_cpu_loras: int = 32
    max_queue: int = 256
    dtype: str = "float32"
    device: str | None = None  # None: the first CUDA device when there is one, else the CPU


def serving_device(device: str | None) -> Any:
    """The torch device the engine runs on: ``device`` as given (``cpu``, ``cuda``, ``cuda:1``), or CUDA
    when available and nothing was asked for. Raises ValueError for a CUDA device the machine lacks."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device: {error}") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device (use --device cpu)")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return chosen


def base_model_name(model: str) -> str:
    """The name clients use for the base model: the built-in name, or the folder / file stem."""
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.name if path.exists() else model


def build_app(options: ServeOptions, model: Any = None, tokenizer: Any = None) -> tuple[Any, Engine]:
    """(FastAPI app, engine); the model is loaded from ``options.model`` unless given, and moved to
    ``options.device`` (the engine keeps its adapter slots on the device of the model's weights)."""
    from lorakit.serve.app import create_app

    device = serving_device(options.device)
    if model is None:
        from lorakit.models import load_causal_lm

        model, tokenizer = load_causal_lm(options.model, dtype=options.dtype)
    model = model.to(device)
    catalog = AdapterCatalog(options.adapters)
    metrics = ServeMetrics()
    engine = Engine(model, tokenizer, base_name=base_model_name(options.model), catalog=catalog,
                    max_batch=options.max_batch, max_loras=options.max_loras,
                    max_lora_rank=options.max_lora_rank, max_cpu_loras=options.max_cpu_loras,
                    observer=metrics)
    api_key = options.api_key or os.environ.get("LORAKIT_API_KEY") or None
    return create_app(engine, metrics, api_key=api_key, max_queue=options.max_queue), engine


def run_server(options: ServeOptions) -> None:
    """Serve until interrupted."""
    import uvicorn

    if options.max_queue < 1:
        raise ValueError(f"--max-queue must be >= 1, got {options.max_queue}")
    app, engine = build_app(options)
    names = engine.catalog.names()
    logger.info("serving http://%s:%d/v1, base model %s on %s, %d adapter(s)%s",
                options.host, options.port, engine.base_name, engine.pool.device, len(names),
                f": {', '.join(names)}" if names else "")
    uvicorn.run(app, host=options.host, port=options.port, log_level="warning")
