"""`lorakit.analysis.similarity`: φ is 1 on shared subspaces, 0 on orthogonal ones, max(i, j)/d on random."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorakit.analysis.similarity import compare_adapters, subspace_basis, subspace_similarity
from lorakit.cli import similarity as similarity_cli

PREFIX = "base_model.model."


def phi(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    return subspace_similarity(subspace_basis(a1), subspace_basis(a2))


def random_a(r: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(r, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_identical_adapters_give_one_everywhere() -> None:
    a = random_a(8, 64, 0)
    torch.testing.assert_close(phi(a, a), torch.ones(8, 8, dtype=torch.float64), rtol=0, atol=1e-12)


def test_same_row_space_in_another_basis() -> None:
    a1 = random_a(8, 64, 1)
    mixing = random_a(8, 8, 2) + 4 * torch.eye(8, dtype=torch.float64)  # invertible
    # A2 spans A1's rows (scaled up, so they are its top 8 directions) and 24 more directions
    # orthogonal to them: A1's subspace is A2's top-8 subspace, and inside its top 32
    q, _ = torch.linalg.qr(a1.T)
    extra = random_a(24, 64, 3)
    extra = extra - extra @ q @ q.T
    a2 = torch.cat([10 * mixing @ a1, extra])
    grid = phi(a1, a2)
    assert grid.shape == (8, 32)
    assert float(grid[7, 7]) == pytest.approx(1.0, abs=1e-10)  # same 8-dim subspace, other basis
    torch.testing.assert_close(grid[:, 31], torch.ones(8, dtype=torch.float64), rtol=0, atol=1e-10)


def test_orthogonal_subspaces_give_zero() -> None:
    eye = torch.eye(16, dtype=torch.float64)
    assert float(phi(eye[:4], eye[4:12]).abs().max()) < 1e-12


def test_random_subspaces_give_max_i_j_over_d() -> None:
    # E[‖U1[:, :i]ᵀ U2[:, :j]‖²] = i·j/d for independent random subspaces, so E[φ(i, j)] = max(i, j)/d.
    # Averaging over 20 seeded pairs leaves a relative standard error of a few percent at i=8, j=64.
    d, r1, r2 = 256, 8, 64
    grids = torch.stack([phi(random_a(r1, d, 10 + s), random_a(r2, d, 100 + s)) for s in range(20)])
    mean = grids.mean(0)
    i = torch.arange(1, r1 + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, r2 + 1, dtype=torch.float64)[None, :]
    expected = torch.maximum(i, j) / d
    assert float(mean[7, 63]) == pytest.approx(64 / d, rel=0.1)
    assert float(mean[7, 7]) == pytest.approx(8 / d, rel=0.2)
    assert float((mean / expected).mean()) == pytest.approx(1.0, rel=0.1)
    # and far from the shared-subspace value
    assert float(grids.max()) < 0.5


def write_adapter(path: Path, a_matrices: dict[str, torch.Tensor], out: int = 12) -> Path:
    tensors = {}
    for module, a in a_matrices.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.float().contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = torch.ones(out, a.shape[0])
    path.mkdir(parents=True)
    save_file(tensors, path / "adapter_model.safetensors")
    r = next(iter(a_matrices.values())).shape[0]
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": r}))
    return path


def test_adapter_folders_report_and_cli(tmp_path: Path) -> None:
    q = "model.layers.0.self_attn.q_proj"
    v = "model.layers.0.self_attn.v_proj"
    k = "model.layers.0.self_attn.k_proj"
    shared = random_a(8, 48, 5)
    first = write_adapter(tmp_path / "r8", {q: shared, v: random_a(8, 48, 6), k: random_a(8, 48, 7)})
    second = write_adapter(tmp_path / "r64", {q: torch.cat([shared, random_a(56, 48, 8)]),
                                               v: random_a(64, 48, 9)})
    report = compare_adapters(first, second)
    assert [layer.name for layer in report.layers] == [q, v]
    assert report.skipped == {k: "only in adapter 1"}
    layer_q = report.layers[0]
    # A2 has 64 rows in a 48-dim space: its subspace is all of R^48, which contains everything
    assert (layer_q.r1, layer_q.r2, layer_q.dimension) == (8, 48, 48)
    assert layer_q.phi[7][47] == pytest.approx(1.0, abs=1e-9)

    parser = argparse.ArgumentParser()
    similarity_cli.register(parser.add_subparsers())
    args = parser.parse_args(["similarity", str(first), str(second), "--output", str(tmp_path / "out")])
    assert args.func(args) == 0
    data = json.loads((tmp_path / "out" / "similarity.json").read_text())
    assert len(data["layers"][0]["phi"]) == 8 and len(data["layers"][0]["phi"][0]) == 48
    assert "random φ(r,r)" in (tmp_path / "out" / "similarity.md").read_text()
    assert (tmp_path / "out" / "similarity.png").read_bytes()[:4] == b"\x89PNG"


def test_b_matrices_and_mismatched_spaces(tmp_path: Path) -> None:
    b = torch.randn(12, 4, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    basis = subspace_basis(b, "B")
    assert basis.shape == (12, 4)
    torch.testing.assert_close(basis.T @ basis, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="different spaces"):
        subspace_similarity(torch.eye(4, dtype=torch.float64), torch.eye(5, dtype=torch.float64))
    first = write_adapter(tmp_path / "a", {"m.q": random_a(4, 10, 12)})
    second = write_adapter(tmp_path / "b", {"m.q": random_a(4, 11, 13)})
    assert "different spaces" in compare_adapters(first, second).skipped["m.q"]
    with pytest.raises(ValueError, match="matrix"):
        compare_adapters(first, second, matrix="C")  # type: ignore[arg-type]
