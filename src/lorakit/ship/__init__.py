"""Shipping adapters and models: inspect, per-engine checks and conversions, GGUF export, merged models."""
