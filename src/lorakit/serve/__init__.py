"""Serving: one base model, many LoRA adapters, continuous batching across them.

`lorakit.serve.engine.Engine` is the engine (no HTTP); `lorakit.serve.app` puts an OpenAI-compatible HTTP
API in front of it (FastAPI, imported only there).
"""
