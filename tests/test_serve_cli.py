"""`lorakit serve`: flags reach the server; one start-up line names the URL, the base model, the adapters."""

from __future__ import annotations

import logging

import pytest
from serve_fixtures import write_adapters

from lorakit.cli.main import build_parser, main
from lorakit.models.tiny import tiny_llama, tiny_tokenizer


def test_serve_starts_with_its_flags_and_logs_one_line(tmp_path, monkeypatch, caplog):
    model_folder = tmp_path / "tiny-base"
    tiny_llama().save_pretrained(model_folder)
    tiny_tokenizer().save_pretrained(model_folder)
    adapters = write_adapters(tmp_path / "adapters", ["a", "c"])
    started = {}

    def fake_run(app, host, port, **_):
        started.update(app=app, host=host, port=port)

    monkeypatch.setattr("uvicorn.run", fake_run)
    with caplog.at_level(logging.INFO, logger="lorakit.serve"):
        code = main(["serve", "--model", str(model_folder), "--adapters", str(adapters), "--port", "8123",
                     "--max-loras", "3", "--max-lora-rank", "8", "--api-key", "k", "--device", "cpu"])
    assert code == 0 and started["host"] == "127.0.0.1" and started["port"] == 8123
    lines = [r.getMessage() for r in caplog.records if r.name == "lorakit.serve"]
    assert len(lines) == 1
    assert "http://127.0.0.1:8123/v1" in lines[0] and "tiny-base on cpu" in lines[0] and "a, c" in lines[0]
    routes = {route.path for route in started["app"].routes}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/metrics", "/health"} <= routes


def test_serve_flags_parse_with_defaults():
    args = build_parser().parse_args(["serve"])
    assert (args.model, args.host, args.port, args.max_batch, args.max_loras, args.max_lora_rank,
            args.max_cpu_loras, args.max_queue) == \
        ("smollm2-135m-instruct", "127.0.0.1", 8000, 16, 8, 16, 32, 256)
    assert args.device is None  # the server picks CUDA when there is one
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-batch", "many"])


def test_a_missing_adapters_folder_is_a_clear_error(tmp_path, capsys):
    model_folder = tmp_path / "tiny-base"
    tiny_llama().save_pretrained(model_folder)
    tiny_tokenizer().save_pretrained(model_folder)
    assert main(["serve", "--model", str(model_folder), "--adapters", str(tmp_path / "none")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_the_serving_device_is_chosen_or_refused_clearly(tmp_path, capsys):
    import torch

    from lorakit.serve.server import serving_device

    assert serving_device("cpu") == torch.device("cpu")
    assert serving_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--device"):
        serving_device("gpu0")
    if not torch.cuda.is_available():
        model_folder = tmp_path / "tiny-base"
        tiny_llama().save_pretrained(model_folder)
        tiny_tokenizer().save_pretrained(model_folder)
        assert main(["serve", "--model", str(model_folder), "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
