"""`lorakit combine` on adapter files against peft's add_weighted_adapter on a model holding the sources."""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
from conftest import tiny_llama
from test_ship_helpers import IDS, peft_adapter, peft_logits

from lorakit.cli.main import main
from lorakit.ship.combine_files import combine_adapter_folders

WEIGHTS = [0.7, 0.4]


def sources(tmp_path: Path, rank_y: int = 4) -> list[Path]:
    x = peft_adapter(tmp_path / "x", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"])
    y = peft_adapter(tmp_path / "y", seed=1, r=rank_y, lora_alpha=3, target_modules=["q_proj", "k_proj"])
    return [x, y]


def peft_combined_logits(paths: list[Path], method: str, **kwargs: object) -> torch.Tensor:
    model = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_llama()), str(paths[0]), adapter_name="x")
    model.load_adapter(str(paths[1]), adapter_name="y")
    model.add_weighted_adapter(["x", "y"], WEIGHTS, "z", combination_type=method, **kwargs)
    model.set_adapter("z")
    with torch.no_grad():
        return model.eval()(IDS).logits


@pytest.mark.parametrize(("method", "rank_y", "extra"), [
    ("linear", 4, {}), ("cat", 2, {}), ("svd", 2, {"svd_rank": 3}), ("ties", 4, {"density": 0.5}),
])
def test_combine_files_like_peft(method: str, rank_y: int, extra: dict, tmp_path: Path) -> None:
    paths = sources(tmp_path, rank_y)
    out = combine_adapter_folders(paths, WEIGHTS, tmp_path / "out", method=method, **extra)
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if method == "svd" else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(peft_logits(out), peft_combined_logits(paths, method, **extra), **tolerance)


def test_combine_cli(tmp_path: Path) -> None:
    paths = sources(tmp_path)
    args = ["combine", *map(str, paths), str(tmp_path / "dare"), "--weights", "0.7,0.4", "--method",
            "dare_ties", "--density", "0.5", "--seed", "3"]
    assert main(args) == 0
    args[3] = str(tmp_path / "dare-again")
    assert main(args) == 0
    torch.testing.assert_close(peft_logits(tmp_path / "dare"), peft_logits(tmp_path / "dare-again"))
    assert main(["combine", *map(str, paths), str(tmp_path / "bad"), "--weights", "1"]) == 2
    assert main(["combine", *map(str, paths), str(tmp_path / "dare"), "--weights", "1,1"]) == 2  # not empty


def test_combine_files_refuses_what_it_cannot_hold(tmp_path: Path) -> None:
    dora = peft_adapter(tmp_path / "dora", use_dora=True)
    saved = peft_adapter(tmp_path / "saved", modules_to_save=["lm_head"])
    plain = peft_adapter(tmp_path / "plain")
    with pytest.raises(ValueError, match="DoRA"):
        combine_adapter_folders([dora, plain], WEIGHTS, tmp_path / "a")
    with pytest.raises(ValueError, match="modules_to_save"):
        combine_adapter_folders([saved, plain], WEIGHTS, tmp_path / "b")
    other = peft_adapter(tmp_path / "other", tiny_llama(hidden_size=64, intermediate_size=64))
    with pytest.raises(ValueError, match="disagree"):
        combine_adapter_folders([other, plain], WEIGHTS, tmp_path / "c")
