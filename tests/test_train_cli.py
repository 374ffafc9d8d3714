"""`lorakit train`: flags and YAML, the run folder, classification, exact match, resume, QLoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_support import train_losses, write_chat_jsonl, write_tiny_model

from lorakit.cli.main import build_parser, main
from lorakit.models import tiny_bert, tiny_tokenizer
from lorakit.train import TrainConfig, build_config, train
from lorakit.train.metrics import read_metrics


@pytest.fixture(autouse=True)
def _only_the_train_command(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real dispatcher, limited to this command: the tests do not depend on the other commands' modules.
    monkeypatch.setattr("lorakit.cli.main.COMMANDS", ("train",))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("chat")
    return write_chat_jsonl(folder / "train.jsonl", 16, seed=0), write_chat_jsonl(
        folder / "dev.jsonl", 4, seed=1
    )


def _write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def test_cli_trains_from_yaml_plus_flags_and_writes_the_run_folder(
    tmp_path: Path, tiny_folder: Path, chat_files: tuple[Path, Path], capsys
) -> None:
    train_file, dev_file = chat_files
    output = tmp_path / "run"
    config = _write_yaml(
        tmp_path / "run.yaml",
        {
            "model": str(tiny_folder),
            "data": str(train_file),
            "eval-data": str(dev_file),
            "r": 4,
            "alpha": 8,
            "targets": "q_proj,v_proj",
            "lr": "2e-2",
            "steps": 10,
            "batch_size": 4,
            "output": str(output),
            "bf16": True,
            "exact_match_examples": 2,
            "max_new_tokens": 4,
            "eval_every": 2,
        },
    )
    code = main(
        ["train", "--config", str(config), "--steps", "4", "--no-bf16", "--save-every", "2", "--quiet"]
    )
    assert code == 0
    assert "trained 4/4 steps" in capsys.readouterr().out

    used = yaml.safe_load((output / "run_config.yaml").read_text())
    assert used["steps"] == 4 and used["bf16"] is False  # the flags win over the file
    assert used["r"] == 4 and used["targets"] == ["q_proj", "v_proj"] and used["lr"] == 0.02  # the file's
    assert used == TrainConfig(**used).to_dict()  # complete: it alone reproduces the run

    records = read_metrics(output)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0.0 <= r["eval_exact_match"] <= 1.0 and r["eval_loss"] > 0 for r in evals)
    assert (output / "loss.png").stat().st_size > 1000

    adapter_config = json.loads((output / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["peft_type"] == "LORA"
    assert sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]
    tensors = load_file(output / "adapter_model.safetensors")
    assert len(tensors) == 2 * 2 * 2  # 2 layers × (q, v) × (A, B)
    assert all(float(t.abs().sum()) > 0 for t in tensors.values())  # B has moved away from zero

    # As if killed after step 4 but before the end was recorded: --resume picks up the newest checkpoint
    # (step 2) and redoes steps 3 and 4 identically. (A run recorded as finished is left alone:
    # tests/test_hostile.py.)
    losses = train_losses(output)
    (output / "run_state.json").unlink()
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "--steps",
                "4",
                "--no-bf16",
                "--save-every",
                "2",
                "--quiet",
                "--resume",
            ]
        )
        == 0
    )
    assert train_losses(output) == pytest.approx(losses, abs=1e-6)


def test_unknown_yaml_key_is_an_error_naming_the_closest_option(tmp_path: Path, capsys) -> None:
    config = _write_yaml(tmp_path / "bad.yaml", {"model": "x", "grad_acum": 4})
    assert main(["train", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert "unknown option 'grad_acum'" in error and "did you mean 'grad_accum'" in error
    with pytest.raises(ValueError, match="did you mean 'lr'"):
        build_config(_write_yaml(tmp_path / "hf.yaml", {"learning_rate": 1e-4}))


def test_flags_parse_into_the_config_and_override_the_file(tmp_path: Path) -> None:
    config = _write_yaml(
        tmp_path / "run.yaml",
        {"epochs": 3, "long-examples": "skip", "quantize": "nf4", "packing": True, "targets": "all-linear"},
    )
    args = build_parser().parse_args(
        [
            "train",
            "--config",
            str(config),
            "--truncate",
            "--quantize",
            "none",
            "--no-packing",
            "--targets",
            "q_proj",
            "--resume",
            "--format",
            "auto",
            "--grad-checkpointing",
            "--loraplus-ratio",
            "16",
            "--dora",
            "--rslora",
        ]
    )
    overrides = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config", "quiet")}
    built = build_config(args.config, overrides)
    assert built.epochs == 3 and built.long_examples == "truncate" and built.quantize is None
    assert built.packing is False and built.targets == ["q_proj"] and built.resume is True
    assert built.format is None and built.grad_checkpointing and built.loraplus_ratio == 16
    assert built.dora and built.rslora
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--epochs", "1", "--steps", "3"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--truncate", "--skip-long"])
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        TrainConfig(batch_size=0)


def test_classification_run_from_a_tsv(tmp_path: Path) -> None:
    folder = tmp_path / "bert"
    tiny_bert(num_labels=2).save_pretrained(folder)
    tiny_tokenizer(chat_template=None).save_pretrained(folder)
    lines = ["sentence\tlabel"] + [
        f"{'good fine nice' if i % 2 else 'bad awful poor'} {i}\t{i % 2}" for i in range(24)
    ]
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    result = train(
        TrainConfig(
            model=str(folder),
            data=str(tmp_path / "train.tsv"),
            task="classify",
            eval_data=str(tmp_path / "train.tsv"),
            eval_metric="accuracy",
            steps=6,
            lr=5e-2,
            batch_size=8,
            output=str(tmp_path / "out"),
            r=4,
        )
    )
    assert result.eval_history[-1]["eval_accuracy"] >= 0.5
    adapter_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS" and "classifier" in adapter_config["modules_to_save"]
    with pytest.raises(ValueError, match="does not fit the data format"):
        train(TrainConfig(model=str(folder), data=str(tmp_path / "train.tsv"), output=str(tmp_path / "x")))


def test_modules_to_save_trains_the_pooler_and_peft_loads_it(tmp_path: Path) -> None:
    # BERT's pooler dense layer trained in full beside the adapter (RoBERTa's classification head has the
    # same dense layer, which the LoRA paper trains), saved in PEFT's format: peft's model gives our logits.
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    args = build_parser().parse_args(["train", "--modules-to-save", "pooler", "--targets", "query,value"])
    assert args.modules_to_save == ["pooler"]
    assert TrainConfig(modules_to_save="pooler, dense").modules_to_save == ["pooler", "dense"]
    folder = tmp_path / "bert"
    torch.manual_seed(0)
    tiny_bert(num_labels=2).save_pretrained(folder)
    tokenizer = tiny_tokenizer(chat_template=None)
    tokenizer.save_pretrained(folder)
    lines = ["sentence\tlabel"] + [f"{'good nice' if i % 2 else 'bad poor'} {i}\t{i % 2}" for i in range(16)]
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    config = TrainConfig(
        model=str(folder), data=str(tmp_path / "train.tsv"), task="classify", steps=3, lr=5e-2,
        batch_size=8, output=str(tmp_path / "out"), r=4, targets=["query", "value"],
        modules_to_save=args.modules_to_save, dtype="fp32",
    )  # fmt: skip
    model = train(config).model
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert "base_model.model.bert.pooler.dense.weight" in saved
    base = AutoModelForSequenceClassification.from_pretrained(folder)
    assert not torch.equal(saved["base_model.model.bert.pooler.dense.weight"], base.bert.pooler.dense.weight)
    adapter_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert {"pooler", "classifier"} <= set(adapter_config["modules_to_save"])
    reference = PeftModel.from_pretrained(base, tmp_path / "out").eval()
    batch = tokenizer(["good nice 3", "bad poor 4"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).logits, reference(**batch).logits)


@pytest.mark.parametrize("bf16", [False, True])
def test_qlora_nf4_base_trains_fp32_adapters(tmp_path: Path, tiny_folder: Path, bf16: bool) -> None:
    # Counting text ("abcdef...", one token per character) is learnt in a few steps.
    letters = "abcdefghijklmnopqrstuvwxyz"
    rows = [{"text": letters[i % 7 : i % 7 + 12]} for i in range(16)]
    (tmp_path / "text.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = TrainConfig(
        model=str(tiny_folder),
        data=str(tmp_path / "text.jsonl"),
        quantize="nf4",
        bf16=bf16,
        steps=8,
        lr=2e-2,
        batch_size=8,
        r=8,
        output=str(tmp_path / "out"),
        warmup_steps=0,
    )
    result = train(config)
    quantized = [m for m in result.model.modules() if type(m).__name__ == "Linear4bit"]
    assert len(quantized) == 2 * 7  # every linear layer of the 2 blocks; lm_head stays unquantised
    assert result.losses[-1] < result.losses[0] - 0.1
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())


def test_method_flag_selects_full_fine_tuning() -> None:
    args = build_parser().parse_args(["train", "--method", "full", "--lr", "1e-5"])
    overrides = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config", "quiet")}
    assert build_config(None, overrides).method == "full"
    assert build_config(None, {}).method == "lora"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--method", "partial"])
