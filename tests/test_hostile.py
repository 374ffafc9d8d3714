"""Realistic abuse, kept together: killed saves, killed and resumed runs, reused folders, bad files, flags.

Each test is one hazard a hostile but realistic user met (issue 9); it failed before its fix.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_support import train_losses, write_chat_jsonl, write_tiny_model

import lorakit
from lorakit.cli.main import build_parser, main
from lorakit.data import DataError, label_ids, load_examples, read_rows, rows_from_records
from lorakit.models import tiny_llama, tiny_tokenizer
from lorakit.train import TrainConfig, train
from lorakit.train.checkpoint import list_checkpoints
from lorakit.train.output import OutputFolderError

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_chat_jsonl(tmp_path_factory.mktemp("chat") / "train.jsonl", 16)


def _config(tiny_folder: Path, chat_file: Path, output: Path, **changes) -> TrainConfig:
    values = {
        "model": str(tiny_folder),
        "data": str(chat_file),
        "r": 4,
        "alpha": 8,
        "targets": "q_proj,v_proj",
        "lr": 1e-2,
        "steps": 4,
        "batch_size": 4,
        "output": str(output),
        "device": "cpu",
    }
    return TrainConfig(**{**values, **changes})


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: a folder left untouched keeps this exactly."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 9.2 reused output folders ---------------------------------------------------------------------------


def test_a_folder_holding_another_run_is_refused_and_left_untouched(
    tmp_path: Path, tiny_folder: Path, chat_file: Path
) -> None:
    output = tmp_path / "run"
    train(_config(tiny_folder, chat_file, output, save_every=2, seed=0))
    before = _snapshot(output)
    with pytest.raises(OutputFolderError, match=r"another run .*seed: 0 → 1.*--overwrite"):
        train(_config(tiny_folder, chat_file, output, save_every=2, seed=1))
    # Not even the same options may start again on top of the old files (the rotation would delete the
    # new checkpoints): continue it with resume, or replace it.
    with pytest.raises(OutputFolderError, match=r"same options .*resume"):
        train(_config(tiny_folder, chat_file, output, save_every=2, seed=0))
    with pytest.raises(OutputFolderError, match=r"started with other options \(r: 4 → 8\)"):
        train(_config(tiny_folder, chat_file, output, save_every=2, r=8, resume=True))
    assert _snapshot(output) == before

    # --overwrite replaces the previous run: nothing of the old one is left.
    result = train(_config(tiny_folder, chat_file, output, steps=3, seed=1, overwrite=True))
    assert result.step == 3 and list_checkpoints(output) == []
    assert yaml.safe_load((output / "run_config.yaml").read_text())["seed"] == 1
    assert [r["step"] for r in _records(output) if r["kind"] == "train"] == [1, 2, 3]


def test_overwrite_never_deletes_a_folder_lorakit_did_not_write(
    tmp_path: Path, tiny_folder: Path, chat_file: Path
) -> None:
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("months of work")
    with pytest.raises(OutputFolderError, match="not written by lorakit train"):
        train(_config(tiny_folder, chat_file, mine, overwrite=True))
    # A run folder into which someone put their own file is not replaced either.
    run = tmp_path / "run"
    train(_config(tiny_folder, chat_file, run, steps=1))
    (run / "notes.txt").write_text("keep me")
    with pytest.raises(OutputFolderError, match=r"does not write: notes\.txt"):
        train(_config(tiny_folder, chat_file, run, steps=1, overwrite=True))
    assert (mine / "chapter1.tex").read_text() == "months of work" and (run / "notes.txt").is_file()


def test_resuming_from_a_checkpoint_of_another_run_names_the_differences(
    tmp_path: Path, tiny_folder: Path, chat_file: Path
) -> None:
    train(_config(tiny_folder, chat_file, tmp_path / "a", steps=3, save_every=2))
    checkpoint = list_checkpoints(tmp_path / "a")[-1]
    # Before: "RuntimeError: The size of tensor a (8) must match the size of tensor b (4)".
    with pytest.raises(ValueError, match=r"belongs to another run: r: 4 → 8; seed: 0 → 5"):
        train(_config(tiny_folder, chat_file, tmp_path / "b", r=8, seed=5, resume=str(checkpoint)))
    with pytest.raises(
        ValueError, match=r"global batches of 4 \(batch_size 4 × grad_accum 1 × 1 processes\)"
    ):
        train(_config(tiny_folder, chat_file, tmp_path / "c", batch_size=2, resume=str(checkpoint)))


# --- 9.3 a finished run resumed with fewer steps ---------------------------------------------------------


def test_a_finished_run_is_never_rewritten_by_a_resume(
    tmp_path: Path, tiny_folder: Path, chat_file: Path
) -> None:
    output = tmp_path / "run"
    train(_config(tiny_folder, chat_file, output, steps=6, save_every=5))
    before = _snapshot(output)
    with pytest.raises(ValueError, match="already finished at step 6, after the 3 steps asked for"):
        train(_config(tiny_folder, chat_file, output, steps=3, save_every=5, resume=True))
    assert _snapshot(output) == before
    again = train(_config(tiny_folder, chat_file, output, steps=6, save_every=5, resume=True))
    assert again.already_finished and again.losses == [] and _snapshot(output) == before
    # A run killed after its step-5 checkpoint (no end recorded) cannot be resumed to an earlier end.
    (output / "run_state.json").unlink()
    with pytest.raises(ValueError, match="is at step 5, after the 3 steps asked for"):
        train(_config(tiny_folder, chat_file, output, steps=3, save_every=5, resume=True))
    # Asked for more, it continues: steps 6 to 8 follow the checkpoint.
    longer = train(_config(tiny_folder, chat_file, output, steps=8, save_every=5, resume=True))
    assert longer.step == 8 and len(longer.losses) == 3
    assert [r["step"] for r in _records(output) if r["kind"] == "train"] == list(range(1, 9))


def _records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


# --- killed saves and killed runs ------------------------------------------------------------------------

SAVER = """
import itertools, sys
import torch
import lorakit
from lorakit.train.checkpoint import save_checkpoint

root = sys.argv[1]
model = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(256, 256), "v_proj": torch.nn.Linear(256, 256)})
lorakit.inject(model, lorakit.LoraConfig(r=64, target_modules=["q_proj", "v_proj"]))
for version in itertools.count():
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.fill_(float(version))
    lorakit.save_adapter(model, root + "/adapter")
    save_checkpoint(root, 1, {"version": version, "big": torch.full((512, 1024), float(version))})
    print(version, flush=True)
"""


def test_saves_killed_at_any_moment_leave_the_old_or_the_new_folder(tmp_path: Path) -> None:
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    for kill in range(4):
        child = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path)], env=ENV, stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None
        child.stdout.readline()  # one complete save of both exists
        time.sleep(0.003 * kill)  # then the kill lands somewhere inside a later save
        child.send_signal(signal.SIGKILL)
        child.wait()
        tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
        versions = {float(value) for t in tensors.values() for value in t.unique()}
        assert len(versions) == 1, versions  # every tensor of one save, none half-written
        assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 64
        (checkpoint,) = list_checkpoints(tmp_path)
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
        assert bool((state["big"] == state["version"]).all())
    # The next save cleans what the killed writers left beside the checkpoint.
    from lorakit.train.checkpoint import save_checkpoint

    save_checkpoint(tmp_path, 1, {"version": -1})
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]


RUNNER = """
import sys, time
from lorakit.train import TrainCallback, TrainConfig, train

class Slow(TrainCallback):  # a real run's steps take time; this one never gets past step 5 by itself
    def on_step(self, record):
        time.sleep(0.15 if record["step"] < 5 else 600)

train(TrainConfig(**__import__("json").loads(sys.argv[1])), Slow())
"""


def test_a_run_killed_mid_training_resumes_to_the_uninterrupted_result(
    tmp_path: Path, tiny_folder: Path, chat_file: Path
) -> None:
    options = _config(tiny_folder, chat_file, tmp_path / "killed", steps=8, save_every=2, dropout=0.2)
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    child = subprocess.Popen([sys.executable, str(script), json.dumps(options.to_dict())], env=ENV)
    deadline = time.monotonic() + 120
    while not list_checkpoints(options.output) and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert list_checkpoints(options.output) and not (Path(options.output) / "run_state.json").exists()

    resumed = train(options.replace(resume=True))
    assert resumed.resumed_from is not None and resumed.step == 8
    whole = train(options.replace(output=str(tmp_path / "whole")))
    assert train_losses(Path(options.output)) == pytest.approx(train_losses(tmp_path / "whole"), abs=1e-6)
    resumed_tensors = load_file(Path(options.output) / "adapter_model.safetensors")
    for key, tensor in load_file(tmp_path / "whole" / "adapter_model.safetensors").items():
        torch.testing.assert_close(resumed_tensors[key], tensor, rtol=0, atol=1e-6)
    assert whole.step == 8


# --- bad files (9.11) ------------------------------------------------------------------------------------


def test_a_byte_that_is_not_utf8_names_the_file_and_line(tmp_path: Path) -> None:
    good = json.dumps({"text": "fine"}).encode()
    (tmp_path / "bad.jsonl").write_bytes(good + b"\n" + good + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not UTF-8: byte e9 at column 14"):
        read_rows(tmp_path / "bad.jsonl")
    (tmp_path / "bad.csv").write_bytes(b"text,label\nok,1\n\xff\xfe,0\n")
    with pytest.raises(DataError, match=r"bad\.csv:3: not UTF-8: byte ff"):
        read_rows(tmp_path / "bad.csv")


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        (
            [{"role": "usr", "content": "hi"}, {"role": "assistant", "content": "yo"}],
            r"t\.jsonl:2: messages\[0\] has role 'usr'; expected one of system, user, assistant, tool",
        ),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}],
            r"t\.jsonl:2: messages\[1\] is an assistant turn with empty content",
        ),
    ],
)
def test_chat_rows_with_an_unknown_role_or_an_empty_reply_are_refused(
    tmp_path: Path, messages: list, error: str
) -> None:
    good = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"messages": good}) + "\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(DataError, match=error):
        load_examples(path, tiny_tokenizer())


def test_a_boolean_label_among_integer_labels_is_refused() -> None:
    rows = rows_from_records(
        [{"text": "a", "label": 0}, {"text": "b", "label": True}, {"text": "c", "label": 2}]
    )
    with pytest.raises(DataError, match=r"<records>\[row 1\]: expected an integer id in 'label' .* got True"):
        label_ids(rows)
    # A column of booleans alone is a binary label.
    assert label_ids(rows_from_records([{"label": False}, {"label": True}]))[0] == [0, 1]


# --- messages: one line, exit code 2 (9.12) --------------------------------------------------------------


def test_output_that_is_a_file_is_a_one_line_error(
    tmp_path: Path, tiny_folder: Path, chat_file: Path, capsys
) -> None:
    (tmp_path / "out").write_text("not a folder")
    code = main(
        ["train", "--model", str(tiny_folder), "--data", str(chat_file), "--output", str(tmp_path / "out")]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is a file, not a folder" in error


# --- lorakit merge (9.5, 9.9, 9.12) ----------------------------------------------------------------------


@pytest.fixture
def base_and_adapter(tmp_path: Path) -> tuple[Path, Path]:
    base = tmp_path / "base"
    tiny_llama(seed=1).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    model = tiny_llama(seed=1)
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    lorakit.save_adapter(model, tmp_path / "adapter")
    return base, tmp_path / "adapter"


def test_merge_refuses_to_write_over_or_into_its_inputs(tmp_path: Path, base_and_adapter, capsys) -> None:
    base, adapter = base_and_adapter
    before = _snapshot(tmp_path)
    for out, why in (
        (adapter, "is the adapter"),
        (base, "is the base model"),
        (adapter / "merged", "lies inside the adapter"),
        (tmp_path, "contains the base model"),
    ):
        assert main(["merge", str(base), str(adapter), str(out), "--overwrite"]) == 2
        error = capsys.readouterr().err
        assert why in error and error.count("\n") == 1, error
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"\xff\xd8")
    assert main(["merge", str(base), str(adapter), str(other), "--overwrite"]) == 2
    assert "does not look like a merged model (files a merged model does not hold: holiday.jpg)" in (
        capsys.readouterr().err
    )
    assert _snapshot(tmp_path) == {**before, "photos/holiday.jpg": b"\xff\xd8"}

    # Into an existing merged model: a one-line error without --overwrite, replaced with it.
    assert main(["merge", str(base), str(adapter), str(tmp_path / "m")]) == 0
    assert main(["merge", str(base), str(adapter), str(tmp_path / "m")]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert main(["merge", str(base), str(adapter), str(tmp_path / "m"), "--overwrite"]) == 0


def test_merging_a_qlora_adapter_follows_its_run_configuration(tmp_path: Path, base_and_adapter) -> None:
    from lorakit.ship.merged import export_merged

    base, adapter = base_and_adapter
    (adapter / "run_config.yaml").write_text(yaml.safe_dump(TrainConfig(quantize="nf4").to_dict()))
    with pytest.warns(UserWarning, match="trained as a QLoRA"):
        followed = export_merged(base, adapter, tmp_path / "auto")
    explicit = export_merged(base, adapter, tmp_path / "nf4", quantize="nf4")
    with pytest.warns(UserWarning, match="trained with quantize=nf4 .* merged with quantize=None"):
        plain = export_merged(base, adapter, tmp_path / "plain", quantize=None)
    followed_weights = load_file(followed / "model.safetensors")
    nf4_weights, plain_weights = (
        load_file(explicit / "model.safetensors"),
        load_file(plain / "model.safetensors"),
    )
    assert followed_weights.keys() == nf4_weights.keys()
    for key, tensor in nf4_weights.items():
        assert torch.equal(followed_weights[key], tensor), key
    # ... which is not what the full-precision base gives (the silent 0.128 of issue 9.5).
    assert not torch.equal(
        followed_weights["model.layers.0.mlp.up_proj.weight"],
        plain_weights["model.layers.0.mlp.up_proj.weight"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when the caller says what the run said
        export_merged(base, adapter, tmp_path / "again", quantize="nf4")


def test_merged_weights_take_the_dtype_but_integer_buffers_keep_theirs() -> None:
    from lorakit.ship.merged import cast_floating

    state = {
        "weight": torch.ones(2, 2),
        "position_ids": torch.arange(4),
        "mask": torch.ones(3, dtype=torch.bool),
    }
    cast = cast_floating(state, torch.bfloat16)
    assert cast["weight"].dtype == torch.bfloat16
    assert cast["position_ids"].dtype == torch.int64 and cast["position_ids"].tolist() == [0, 1, 2, 3]
    assert cast["mask"].dtype == torch.bool


# --- 9.7 which adapter is saved --------------------------------------------------------------------------


@pytest.mark.parametrize("other", ["model", "layers", "mlp"])
def test_the_trained_adapter_is_saved_whatever_the_other_adapters_are_called(
    tmp_path: Path, other: str
) -> None:
    from lorakit.train.adapter import write_adapter

    model = tiny_llama()
    # Only mlp.down_proj: every trainable parameter's path holds "model", "layers" and "mlp".
    config = lorakit.LoraConfig(r=2, target_modules=["down_proj"], init_lora_weights=False)
    lorakit.inject(model, config, adapter_name=other)
    lorakit.add_adapter(model, config, "mine")
    lorakit.set_adapter(model, "mine")
    write_adapter(model, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    expected = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert expected and all(".mine." in name for name in expected)
    saved_values = sorted(float(t.sum()) for t in saved.values())
    assert saved_values == pytest.approx(sorted(float(p.detach().sum()) for p in expected.values()))


# --- 9.14 the default model ------------------------------------------------------------------------------


def test_train_without_a_model_trains_the_registry_default(
    tmp_path: Path, chat_file: Path, monkeypatch
) -> None:
    asked: list[str] = []

    def fake_loader(name, **kwargs):
        asked.append(str(name))
        raise FileNotFoundError("stop here: the default model was asked for")

    monkeypatch.setattr("lorakit.models.load_causal_lm", fake_loader)
    with pytest.raises(FileNotFoundError, match="stop here"):
        train(TrainConfig(data=str(chat_file), output=str(tmp_path / "run")))
    assert asked == ["smollm2-135m-instruct"]


# --- 9.15 flags under torchrun ---------------------------------------------------------------------------


def test_no_train_flag_is_the_prefix_of_a_torchrun_option() -> None:
    from torch.distributed.run import get_args_parser

    torchrun = [s for action in get_args_parser()._actions for s in action.option_strings]
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    flags = [s for action in subparsers.choices["train"]._actions for s in action.option_strings]
    assert "--rank" in flags
    # --r stays for single-process use only; -h/--help are torchrun's too but come after the module name.
    clashes = {
        flag: [option for option in torchrun if option.startswith(flag)]
        for flag in flags
        if flag not in ("--r", "-h", "--help")
    }
    assert {flag: options for flag, options in clashes.items() if options} == {}
    args = build_parser().parse_args(["train", "--rank", "8"])
    assert args.r == 8 and build_parser().parse_args(["train", "--r", "4"]).r == 4


def test_documented_torchrun_command_runs(tmp_path: Path, tiny_folder: Path, chat_file: Path) -> None:
    """docs/training.md's torchrun line, with its flags, on 2 CPU processes and a tiny model."""
    docs = (Path(__file__).parents[1] / "docs" / "training.md").read_text()
    documented = next(line for line in docs.splitlines() if line.startswith("torchrun ") and "--rank" in line)
    local = {"smollm2-135m-instruct": str(tiny_folder), "train.jsonl": str(chat_file), "runs/ddp": "ddp"}
    command = [local.get(part, part) for part in documented.split()]
    assert command[:6] == ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "lorakit.cli.main"]
    command[0] = str(Path(sys.executable).parent / "torchrun")
    command += ["--steps", "2", "--device", "cpu", "--quiet"]
    finished = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("trained 2/2 steps") == 1  # rank 0 alone reports
    used = yaml.safe_load((tmp_path / "ddp" / "run_config.yaml").read_text())
    assert used["r"] == 8 and used["targets"] == ["q_proj", "v_proj"]
    assert len(load_file(tmp_path / "ddp" / "adapter_model.safetensors")) == 2 * 2 * 2
