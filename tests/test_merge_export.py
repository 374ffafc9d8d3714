"""`lorakit merge`: the merged folder loads in plain transformers and reproduces the unmerged model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.cli.main import main
from lorakit.models import load_causal_lm, tiny_llama, tiny_tokenizer
from lorakit.ship.merged import export_merged


def base_folder(tmp_path: Path, **overrides) -> Path:
    folder = tmp_path / "base"
    tiny_llama(seed=1, **overrides).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def trained_adapter(base: Path, tmp_path: Path, targets: list[str], quantize: str | None = None):
    model, _ = load_causal_lm(base, quantize=quantize)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    lorakit.inject(model, config)
    lorakit.save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


IDS = torch.tensor([[1, 5, 9, 20, 33, 7], [1, 60, 2, 44, 3, 100]])


def reload_without_lorakit(folder: Path) -> torch.Tensor:
    """Logits of the merged folder loaded by transformers in a process where lorakit cannot be imported."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["lorakit"] = None  # any import of lorakit now fails
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()
        with torch.no_grad():
            torch.save(model(torch.tensor({IDS.tolist()})).logits, {str(folder / "logits.pt")!r})
    """)
    environment = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin"}
    subprocess.run([sys.executable, "-c", script], check=True, env=environment)
    return torch.load(folder / "logits.pt")


def test_merged_folder_equals_unmerged_model_without_lorakit(tmp_path: Path) -> None:
    base = base_folder(tmp_path)
    model, adapter = trained_adapter(base, tmp_path, ["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():
        expected = model(IDS).logits
    out = export_merged(base, adapter, tmp_path / "merged")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert "lora" not in (out / "config.json").read_text().lower()
    torch.testing.assert_close(reload_without_lorakit(out), expected, atol=1e-5, rtol=1e-5)


def test_tied_embeddings_are_untied_so_a_reload_keeps_the_merge(tmp_path: Path) -> None:
    base = base_folder(tmp_path, tie_word_embeddings=True)
    model, adapter = trained_adapter(base, tmp_path, ["lm_head", "q_proj"])
    with torch.no_grad():
        expected = model(IDS).logits
    out = export_merged(base, adapter, tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.lm_head.weight.data_ptr() != reloaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, expected, atol=1e-5, rtol=1e-5)
    # The input embedding is the base's, untouched by the lm_head update.
    original = AutoModelForCausalLM.from_pretrained(base)
    torch.testing.assert_close(reloaded.model.embed_tokens.weight, original.model.embed_tokens.weight)


def test_qlora_merge_matches_the_unmerged_qlora_model(tmp_path: Path) -> None:
    base = base_folder(tmp_path, hidden_size=64, intermediate_size=128)
    model, adapter = trained_adapter(base, tmp_path, ["q_proj", "v_proj", "up_proj"], quantize="nf4")
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    # In eval mode on a CPU with AVX512-BF16, bitsandbytes runs NF4 layers through a bf16 kernel (logits
    # off by ~1e-3); in train mode it dequantises to fp32 like the merge does. Compare with the latter.
    model.train()
    with torch.no_grad():
        expected = model(IDS).logits
        model.eval()
        torch.testing.assert_close(model(IDS).logits, expected, atol=1e-2, rtol=1e-2)  # the bf16 path
    out = export_merged(base, adapter, tmp_path / "merged", quantize="nf4")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any(type(m).__name__ == "Linear4bit" for m in reloaded.modules())
    with torch.no_grad():
        # Documented tolerance: both sides compute with the same dequantised weights in fp32; only the
        # order of the additions differs.
        torch.testing.assert_close(reloaded(IDS).logits, expected, atol=1e-4, rtol=1e-4)


def test_cli_merge_and_refuses_to_overwrite(tmp_path: Path, capsys) -> None:
    base = base_folder(tmp_path)
    _, adapter = trained_adapter(base, tmp_path, ["q_proj"])
    assert main(["merge", str(base), str(adapter), str(tmp_path / "m")]) == 0
    assert "merged model written to" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match="exists"):
        export_merged(base, adapter, tmp_path / "m")
