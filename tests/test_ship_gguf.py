"""`lorakit export-gguf`: read the file back with gguf's reader and rebuild every layer's update the way
llama.cpp computes it (factor alpha / rank, or 1 when alpha is 0), against peft's merged update."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from test_ship_helpers import base_folder, peft_adapter, peft_merged_deltas

from lorakit.cli.main import main
from lorakit.ship.gguf_export import export_gguf

HEADS, KV_HEADS = 4, 2  # tiny LLaMA
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def interleave_rows(n_head: int, rows: int) -> torch.Tensor:
    """Index map of llama.cpp's Q/K layout: GGUF row h·d + 2i + j holds HF row h·d + j·d/2 + i."""
    head_dim = rows // n_head
    order = torch.empty(rows, dtype=torch.long)
    for head in range(n_head):
        for i in range(head_dim // 2):
            for j in range(2):
                order[head * head_dim + 2 * i + j] = head * head_dim + j * (head_dim // 2) + i
    return order


def field_value(reader: gguf.GGUFReader, key: str) -> object:
    field = reader.fields[key]
    value = field.parts[field.data[0]]
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(value).decode()
    return value.tolist()[0]


def rebuilt_updates(path: Path) -> tuple[gguf.GGUFReader, dict[str, torch.Tensor]]:
    """GGUF base tensor name -> the update llama.cpp adds, in GGUF's row order (float64)."""
    reader = gguf.GGUFReader(str(path))
    alpha = field_value(reader, "adapter.lora.alpha")
    arrays = {tensor.name: torch.from_numpy(np.array(tensor.data)).double() for tensor in reader.tensors}
    updates = {}
    for name in {key.rsplit(".", 1)[0] for key in arrays}:
        lora_a, lora_b = arrays[f"{name}.lora_a"], arrays[f"{name}.lora_b"]
        rank = lora_b.shape[1]
        factor = alpha / rank if alpha else 1.0
        if name.startswith("token_embd"):
            updates[name] = factor * (lora_a @ lora_b.T)  # (num_embeddings, dim) like the embedding table
        else:
            updates[name] = factor * (lora_b @ lora_a)  # (out, in)
    return reader, updates


def gguf_name(module: str) -> str:
    parts = module.split(".")
    if module.endswith("embed_tokens"):
        return "token_embd.weight"
    if module == "lm_head":
        return "output.weight"
    short = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[parts[-1]]
    return f"blk.{parts[2]}.{short}.weight"


@pytest.mark.parametrize("patterns", [False, True])
def test_gguf_reproduces_peft_updates(patterns: bool, tmp_path: Path) -> None:
    extra = {"use_rslora": True, "rank_pattern": {"v_proj": 2, "down_proj": 6},
             "alpha_pattern": {"o_proj": 3}} if patterns else {}
    adapter = peft_adapter(tmp_path / "adapter", r=4, lora_alpha=8,
                           target_modules=[*ALL, "embed_tokens", "lm_head"], **extra)
    export = export_gguf(adapter, base_folder(tmp_path / "base"), tmp_path / "a.gguf")
    reader, updates = rebuilt_updates(tmp_path / "a.gguf")
    assert field_value(reader, "general.architecture") == "llama"
    assert field_value(reader, "general.type") == "adapter"
    assert field_value(reader, "adapter.type") == "lora"
    assert field_value(reader, "adapter.lora.alpha") == (0.0 if patterns else 4.0) == export.alpha
    expected = peft_merged_deltas(adapter)
    assert set(updates) == {gguf_name(module) for module in expected}
    for module, delta in expected.items():
        if module.endswith("q_proj"):
            delta = delta[interleave_rows(HEADS, delta.shape[0])]
        elif module.endswith("k_proj"):
            delta = delta[interleave_rows(KV_HEADS, delta.shape[0])]
        torch.testing.assert_close(updates[gguf_name(module)], delta, atol=1e-6, rtol=1e-5)


def test_gguf_tensor_shapes_follow_llama_cpp(tmp_path: Path) -> None:
    adapter = peft_adapter(tmp_path / "adapter", r=4, target_modules=["q_proj", "k_proj"])
    export_gguf(adapter, base_folder(tmp_path / "base"), tmp_path / "a.gguf")
    shapes = {t.name: [int(n) for n in t.shape] for t in gguf.GGUFReader(str(tmp_path / "a.gguf")).tensors}
    # GGML order (ne): lora_a [in, r], lora_b [r, out]; k_proj is 32 -> 16.
    assert shapes["blk.0.attn_q.weight.lora_a"] == [32, 4] and shapes["blk.0.attn_q.weight.lora_b"] == [4, 32]
    assert shapes["blk.1.attn_k.weight.lora_a"] == [32, 4] and shapes["blk.1.attn_k.weight.lora_b"] == [4, 16]


def test_gguf_refusals(tmp_path: Path) -> None:
    base = base_folder(tmp_path / "base")
    tied = base_folder(tmp_path / "tied", tie_word_embeddings=True)
    head = peft_adapter(tmp_path / "head", target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="ties lm_head"):
        export_gguf(head, tied, tmp_path / "head.gguf")
    dora = peft_adapter(tmp_path / "dora", use_dora=True)
    with pytest.raises(ValueError, match=r"DoRA.*lorakit convert"):
        export_gguf(dora, base, tmp_path / "dora.gguf")
    saved = peft_adapter(tmp_path / "saved", modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match="--drop-modules-to-save"):
        export_gguf(saved, base, tmp_path / "saved.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))
    plain = peft_adapter(tmp_path / "plain")
    (tmp_path / "taken.gguf").write_text("mine")
    assert main(["export-gguf", str(plain), "--base", str(base), str(tmp_path / "taken.gguf")]) == 2
    assert (tmp_path / "taken.gguf").read_text() == "mine"
    assert main(["export-gguf", str(plain), "--base", str(base), str(tmp_path / "new.gguf")]) == 0
    assert (tmp_path / "new.gguf").stat().st_size > 0


def test_qwen2_base_keeps_hf_row_order(tmp_path: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)
    qwen = Qwen2ForCausalLM(config).eval()
    qwen.save_pretrained(str(tmp_path / "qwen"))
    adapter = peft_adapter(tmp_path / "adapter", qwen, r=4, lora_alpha=8, use_rslora=True)
    export = export_gguf(adapter, tmp_path / "qwen", tmp_path / "q.gguf")
    reader, updates = rebuilt_updates(tmp_path / "q.gguf")
    assert export.architecture == "qwen2" and field_value(reader, "general.architecture") == "qwen2"
    expected = peft_merged_deltas(adapter, qwen)
    assert set(updates) == {gguf_name(module) for module in expected}
    for module, delta in expected.items():  # llama.cpp's Qwen2 converter does not permute Q / K
        torch.testing.assert_close(updates[gguf_name(module)], delta, atol=1e-6, rtol=1e-5)


def test_gguf_f16(tmp_path: Path) -> None:
    adapter = peft_adapter(tmp_path / "adapter", r=4, lora_alpha=8, use_rslora=True)
    export_gguf(adapter, base_folder(tmp_path / "base"), tmp_path / "a.gguf", dtype="f16")
    reader, updates = rebuilt_updates(tmp_path / "a.gguf")
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F16}
    for module, delta in peft_merged_deltas(adapter).items():
        if module.endswith("q_proj"):
            delta = delta[interleave_rows(HEADS, delta.shape[0])]
        elif module.endswith("k_proj"):
            delta = delta[interleave_rows(KV_HEADS, delta.shape[0])]
        torch.testing.assert_close(updates[gguf_name(module)], delta, atol=1e-3, rtol=1e-2)
