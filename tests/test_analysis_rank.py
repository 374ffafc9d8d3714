"""`lorakit.analysis.rank`: planted low-rank updates, Eckart–Young, the adapter path against the dense one."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import save_file

from lorakit.analysis import rank, spectrum
from lorakit.cli import rank as rank_cli
from lorakit.peft_format import load_adapter_folder
from lorakit.peft_format import module_scaling as lora_scaling

PREFIX = "base_model.model."


def planted(out: int, inp: int, values: list[float], noise: float, seed: int) -> torch.Tensor:
    """U diag(values) Vᵀ with random orthonormal U (out, k), V (in, k), plus N(0, noise²) entries, float64."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, len(values), generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, len(values), generator=generator, dtype=torch.float64))
    signal = u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ v.T
    return signal + noise * torch.randn(out, inp, generator=generator, dtype=torch.float64)


def write_adapter(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    return path


def test_planted_rank_4_is_found_at_0_95() -> None:
    # signal energy 10²+8²+6²+4² = 216; noise energy 0.005²·256·192 ≈ 1.2: the top 3 hold ≈ 92 %,
    # the top 4 ≈ 99 %, so 0.95 separates rank 3 from rank 4 with margin on both sides
    delta = planted(256, 192, [10.0, 8.0, 6.0, 4.0], noise=0.005, seed=0)
    layer = rank.analyse_delta("w", delta, threshold=0.95)
    assert layer.energy_rank == 4
    assert rank.analyse_delta("w", delta, threshold=0.45).energy_rank == 1  # 100/217 of the energy
    assert layer.stable_rank == pytest.approx(216 / 100, rel=0.02)
    assert layer.relative_errors[4] < 0.1 < layer.relative_errors[2]


def test_eckart_young_errors_match_truncated_svd() -> None:
    delta = planted(96, 80, [5.0, 3.0, 2.0, 1.0, 0.5], noise=0.05, seed=1)
    values = spectrum.singular_values(delta)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    errors = spectrum.eckart_young_errors(values)
    for k in spectrum.ERROR_RANKS:
        best = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
        direct = float(torch.linalg.norm(delta - best) / torch.linalg.norm(delta))
        assert errors[k] == pytest.approx(direct, abs=1e-10), k
    # another rank-8 matrix (perturbed left factor) is worse: the truncated SVD is optimal
    generator = torch.Generator().manual_seed(2)
    left = u[:, :8] + 0.01 * torch.randn(96, 8, dtype=torch.float64, generator=generator)
    other = left @ torch.diag(s[:8]) @ vh[:8]
    assert float(torch.linalg.norm(delta - other) / torch.linalg.norm(delta)) > errors[8]
    assert errors[64] == pytest.approx(float(values[64:].pow(2).sum().sqrt() / values.pow(2).sum().sqrt()))


@pytest.mark.parametrize(("out", "inp", "r"), [(64, 48, 8), (6, 40, 8), (50, 5, 8)])
def test_adapter_path_equals_dense(out: int, inp: int, r: int) -> None:
    generator = torch.Generator().manual_seed(out)
    lora_b = torch.randn(out, r, generator=generator)
    lora_a = torch.randn(r, inp, generator=generator)
    scaling = 0.37
    low = spectrum.lowrank_singular_values(lora_b, lora_a, scaling)
    dense = spectrum.singular_values(scaling * lora_b.double() @ lora_a.double())
    assert low.shape == (r,)
    torch.testing.assert_close(low[: dense.numel()], dense[:r], rtol=1e-9, atol=1e-9)
    assert torch.all(low[dense.numel():] == 0)


def test_energy_rank_edge_cases() -> None:
    values = torch.tensor([3.0, 4.0]).sort(descending=True).values
    assert spectrum.energy_rank(values, 1.0) == 2
    assert spectrum.energy_rank(values, 16 / 25) == 1
    assert spectrum.energy_rank(torch.zeros(3), 0.95) == 0
    with pytest.raises(ValueError, match="threshold"):
        spectrum.energy_rank(values, 0.0)


def test_model_folders(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(3)
    base = {
        "layers.0.q.weight": torch.randn(32, 24, generator=generator),
        "layers.1.q.weight": torch.randn(32, 24, generator=generator),
        "layers.0.norm.weight": torch.ones(24),
        "same.weight": torch.randn(8, 8, generator=generator),
    }
    tuned = dict(base)
    tuned["layers.0.q.weight"] = base["layers.0.q.weight"] + planted(32, 24, [2.0, 1.0], 0.0, 4).float()
    tuned["layers.1.q.weight"] = base["layers.1.q.weight"] + planted(32, 24, [1.0] * 6, 0.0, 5).float()
    tuned["layers.0.norm.weight"] = torch.full((24,), 2.0)  # 1-D: not analysed
    (tmp_path / "base").mkdir()
    (tmp_path / "tuned").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    save_file(tuned, tmp_path / "tuned" / "model.safetensors")

    report = rank.analyse_rank(tmp_path / "base", tmp_path / "tuned", threshold=0.99)
    by_name = {layer.name: layer for layer in report.layers}
    assert set(by_name) == {"layers.0.q.weight", "layers.1.q.weight"}
    assert by_name["layers.0.q.weight"].energy_rank == 2
    assert by_name["layers.1.q.weight"].energy_rank == 6
    assert by_name["layers.1.q.weight"].stable_rank == pytest.approx(6.0, rel=1e-4)
    assert report.skipped == {"same.weight": "identical"}
    norm = float(torch.linalg.norm(base["layers.0.q.weight"].double()))
    assert by_name["layers.0.q.weight"].relative_update == pytest.approx(math.sqrt(5) / norm, rel=1e-5)


def test_adapter_scaling_follows_peft_patterns() -> None:
    config = {"r": 8, "lora_alpha": 16, "rank_pattern": {"layers\\.1\\.q_proj": 4, "v_proj": 2},
              "alpha_pattern": {"q_proj": 32}}
    assert lora_scaling(config, "model.layers.0.q_proj") == (8, 4.0)
    assert lora_scaling(config, "model.layers.1.q_proj") == (4, 8.0)
    assert lora_scaling(config, "model.layers.1.v_proj") == (2, 8.0)
    assert lora_scaling(config, "model.layers.1.o_proj") == (8, 2.0)
    # a key matches a dotted suffix only: "proj" does not match "q_proj"
    assert lora_scaling({"r": 8, "lora_alpha": 8, "rank_pattern": {"proj": 1}}, "m.q_proj") == (8, 1.0)
    assert lora_scaling({**config, "use_rslora": True}, "model.layers.1.q_proj") == (4, 32 / 2)


def _peft_model(tmp_path: Path, **lora: object) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A tiny Llama, a PEFT adapter with random non-zero B, both saved; returns the merged deltas too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "base")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.1 * torch.rand_like(param))
    wrapped.save_pretrained(tmp_path / "adapter")
    merged = wrapped.merge_and_unload().state_dict()
    deltas = {k[: -len(".weight")]: merged[k].double() - base_state[k].double()
              for k in base_state if not torch.equal(merged[k], base_state[k])}
    return tmp_path / "base", tmp_path / "adapter", deltas


@pytest.mark.parametrize("use_dora", [False, True])
def test_base_and_adapter_match_peft_merge(tmp_path: Path, use_dora: bool) -> None:
    base, adapter, deltas = _peft_model(
        tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
        rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3}, use_dora=use_dora,
    )
    report = rank.analyse_rank(base, adapter, threshold=0.95)
    by_name = {layer.name: layer for layer in report.layers}
    assert set(by_name) == set(deltas)
    for name, delta in deltas.items():
        expected = torch.linalg.svdvals(delta)
        got = torch.tensor(by_name[name].singular_values, dtype=torch.float64)
        # PEFT merges in fp32, so compare at fp32 precision; a rank-r adapter has r values
        n = min(4, got.numel())
        torch.testing.assert_close(got[:n], expected[:n], rtol=2e-4, atol=2e-5)
        if not use_dora:  # beyond r the dense update is zero up to fp32 rounding
            assert float(expected[got.numel():].sum()) < 1e-4
    # DoRA's merged update is analysed densely (no adapter rank); plain LoRA via the r×r core
    assert by_name["model.layers.1.self_attn.q_proj"].adapter_rank == (None if use_dora else 2)
    if not use_dora:
        adapter_only = rank.analyse_rank(None, adapter)
        for layer in adapter_only.layers:
            assert layer.singular_values == pytest.approx(by_name[layer.name].singular_values, rel=1e-9)
        assert by_name["model.layers.1.self_attn.q_proj"].energy_rank <= 2


def test_zero_update_and_report_files(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(6)
    tensors = {
        f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 16, generator=generator),
        f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(24, 4, generator=generator),
        f"{PREFIX}model.layers.1.self_attn.q_proj.lora_A.weight": torch.randn(4, 16, generator=generator),
        f"{PREFIX}model.layers.1.self_attn.q_proj.lora_B.weight": torch.zeros(24, 4),
    }
    adapter = write_adapter(tmp_path / "adapter", tensors, {"r": 4, "lora_alpha": 8})
    assert set(load_adapter_folder(adapter).pairs) == {
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    report = rank.analyse_rank(None, adapter)
    assert [layer.name for layer in report.layers] == ["model.layers.0.self_attn.q_proj"]
    assert report.skipped == {"model.layers.1.self_attn.q_proj": "zero update"}

    parser = argparse.ArgumentParser()
    rank_cli.register(parser.add_subparsers())
    args = parser.parse_args(["rank", str(adapter), "--output", str(tmp_path / "out"), "--threshold", "0.9"])
    assert args.func(args) == 0
    data = json.loads((tmp_path / "out" / "rank.json").read_text())
    assert data["mode"] == "adapter" and data["threshold"] == 0.9
    assert data["layers"][0]["relative_errors"]["4"] == pytest.approx(0.0, abs=1e-12)
    assert "model.layers.0.self_attn.q_proj" in (tmp_path / "out" / "rank.md").read_text()
    for png in ("singular_values", "cumulative_energy", "rank_by_layer"):
        assert (tmp_path / "out" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        load_adapter_folder(tmp_path)
    bad = write_adapter(tmp_path / "bad", {f"{PREFIX}x.lora_A.weight": torch.ones(4, 3),
                                            f"{PREFIX}x.lora_B.weight": torch.ones(2, 4)}, {"r": 8})
    with pytest.raises(ValueError, match="r=8"):
        load_adapter_folder(bad)
    with pytest.raises(ValueError, match="base model folder"):
        rank.analyse_rank(None, tmp_path)


def test_model_folders_whose_names_differ_by_a_class_prefix(tmp_path: Path) -> None:
    """A base saved from BertModel (``encoder...``) against a tuned BertForSequenceClassification
    (``bert.encoder...``): the layers pair up by their common suffix."""
    generator = torch.Generator().manual_seed(4)
    base = {"encoder.layer.0.query.weight": torch.randn(16, 16, generator=generator)}
    tuned = {"bert.encoder.layer.0.query.weight": base["encoder.layer.0.query.weight"]
             + planted(16, 16, [3.0, 1.0, 0.5], 0.0, 6).float(),
             "classifier.weight": torch.randn(2, 16, generator=generator)}
    for name, tensors in (("base", base), ("tuned", tuned)):
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors")
    report = rank.analyse_rank(tmp_path / "base", tmp_path / "tuned", threshold=0.999)
    found = [(layer.name, layer.energy_rank) for layer in report.layers]
    assert found == [("bert.encoder.layer.0.query.weight", 3)]
    assert report.skipped == {"classifier.weight": "not in base"}
