"""`lorakit.analysis.sweep` and `lorakit sweep`, on a tiny BERT classifier written to tmp_path.

Also covers the trainer's ``method="full"`` (full fine-tuning), which sweeps need for their baseline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.analysis import sweep
from lorakit.analysis.sweep import (
    RESULT_FILE,
    SweepSetting,
    evaluate_run,
    parse_assignments,
    parse_ranks,
    parse_target_sets,
    plan_settings,
    resolve_targets,
    run_sweep,
    write_sweep_report,
)
from lorakit.cli.main import main
from lorakit.models import tiny_bert, tiny_llama, tiny_tokenizer
from lorakit.train import TrainCallback, TrainConfig, train
from lorakit.train.checkpoint import list_checkpoints

POSITIVE = ["good fun", "a great film", "lovely", "great acting", "so good", "fine and fun", "wonderful"]
NEGATIVE = ["bad", "awful plot", "a dull mess", "boring", "so bad", "terrible acting", "dreadful"]


@pytest.fixture
def tiny(tmp_path: Path) -> dict[str, str]:
    """A tiny BERT classifier folder, a training TSV and a dev TSV (SST-2's columns: label first)."""
    folder = tmp_path / "tiny-bert"
    tiny_bert(seed=0).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    rows = [(1, s) for s in POSITIVE] + [(0, s) for s in NEGATIVE]
    (tmp_path / "train.tsv").write_text(
        "label\tsentence\n" + "".join(f"{label}\t{text}\n" for label, text in rows * 2), encoding="utf-8"
    )
    (tmp_path / "dev.tsv").write_text(
        "label\tcontent\n" + "".join(f"{label}\t{text}\n" for label, text in rows), encoding="utf-8"
    )
    return {"model": str(folder), "data": str(tmp_path / "train.tsv"), "eval_data": str(tmp_path / "dev.tsv")}


def base_config(tiny: dict[str, str], **changes: object) -> TrainConfig:
    values: dict[str, object] = dict(
        task="classify",
        format="classify",
        max_length=32,
        batch_size=4,
        steps=3,
        lr=1e-2,
        dropout=0.0,
        warmup_steps=0,
        eval_metric="accuracy",
        device="cpu",
        **tiny,
    )
    values.update(changes)
    return TrainConfig(**values)


@pytest.fixture
def train_calls(monkeypatch: pytest.MonkeyPatch) -> list[TrainConfig]:
    """Every `train` call the sweep makes, in order (the real trainer still runs)."""
    calls: list[TrainConfig] = []

    def counting(config: TrainConfig, progress: TrainCallback | None = None):
        calls.append(config)
        return train(config, progress)

    monkeypatch.setattr(sweep.runner, "train", counting)
    return calls


# --- the table ----------------------------------------------------------------------------------------------


def test_table_has_one_row_per_setting(tiny: dict[str, str], tmp_path: Path, train_calls: list) -> None:
    settings = plan_settings([1, 4], [("q", "v"), ("all-linear",)], dora=True, full=True, anchor_rank=4)
    names = [s.name for s in settings]
    assert names == [
        "lora-qv-r1",
        "lora-qv-r4",
        "lora-all-linear-r1",
        "lora-all-linear-r4",
        "dora-qv-r4",
        "full",
    ]
    result = run_sweep(base_config(tiny), settings, tmp_path / "sweep", full_overrides={"lr": 1e-3})
    paths = write_sweep_report(result, tmp_path / "sweep")

    assert [c.output for c in train_calls] == [str(tmp_path / "sweep" / n) for n in names]
    assert [row.name for row in result.rows] == names
    table = paths["markdown"].read_text().splitlines()
    body = [line for line in table[2:] if line.startswith("| ")]
    assert [line.split(" | ")[0].removeprefix("| ") for line in body] == names
    assert "eval_accuracy" in table[0] and "trainable %" in table[0]
    rows = {row["name"]: row for row in json.loads(paths["json"].read_text())["rows"]}
    assert list(rows) == names
    for path in (paths["metric_vs_rank"], paths["metric_vs_params"]):
        assert path.read_bytes().startswith(b"\x89PNG")

    # the numbers mean what they say
    assert rows["lora-qv-r1"]["target_modules"] == ["query", "value"]
    assert rows["lora-all-linear-r4"]["target_modules"] == "all-linear"
    assert rows["lora-qv-r1"]["trainable_parameters"] < rows["lora-qv-r4"]["trainable_parameters"]
    assert rows["lora-qv-r4"]["trainable_parameters"] < rows["lora-all-linear-r4"]["trainable_parameters"]
    assert rows["lora-qv-r4"]["trainable_parameters"] < rows["dora-qv-r4"]["trainable_parameters"]
    full = rows["full"]
    assert full["trainable_parameters"] == full["total_parameters"] and full["trainable_percent"] == 100.0
    assert train_calls[-1].lr == 1e-3 and train_calls[0].lr == 1e-2  # the full-only override
    for row in rows.values():
        assert row["metric_name"] == "eval_accuracy" and 0.0 <= row["metric"] <= 1.0
        assert row["steps"] == 3 and row["train_seconds"] > 0
        assert row["peak_bytes"] > row["static_bytes"] > 0
    # full fine-tuning holds gradients and AdamW moments of every weight: far more than rank-1 LoRA
    assert full["peak_bytes"] > rows["lora-qv-r1"]["peak_bytes"]


def test_metric_is_the_trainers_final_evaluation(tiny: dict[str, str], tmp_path: Path) -> None:
    result = run_sweep(
        base_config(tiny), [SweepSetting("lora", 2, ("q", "v"))], tmp_path / "s", measure_memory=False
    )
    row = result.rows[0]
    metrics = [
        json.loads(line) for line in (tmp_path / "s" / row.name / "metrics.jsonl").read_text().splitlines()
    ]
    last_eval = [m for m in metrics if m["kind"] == "eval"][-1]
    assert row.metric == pytest.approx(last_eval["eval_accuracy"])
    assert row.eval_metrics["eval_loss"] == pytest.approx(last_eval["eval_loss"])
    assert row.peak_bytes is None


# --- resuming -----------------------------------------------------------------------------------------------


def test_resume_skips_finished_runs_and_reruns_an_unfinished_one(
    tiny: dict[str, str], tmp_path: Path, train_calls: list
) -> None:
    settings = [
        SweepSetting("lora", 1, ("q", "v")),
        SweepSetting("lora", 2, ("q", "v")),
        SweepSetting("full"),
    ]
    output = tmp_path / "sweep"
    first = run_sweep(base_config(tiny), settings, output, measure_memory=False)
    assert len(train_calls) == 3 and first.ran == [s.name for s in settings]
    finished = {s.name: (output / s.name / RESULT_FILE).stat().st_mtime_ns for s in settings}

    again = run_sweep(base_config(tiny), settings, output, measure_memory=False)
    assert len(train_calls) == 3, "a finished run was trained again"
    assert again.skipped == [s.name for s in settings] and again.ran == []
    assert [r.metric for r in again.rows] == [r.metric for r in first.rows]

    # lora-qv-r2 "died": its folder is there (metrics, config) but it never wrote its result
    (output / "lora-qv-r2" / RESULT_FILE).unlink()
    third = run_sweep(base_config(tiny), settings, output, measure_memory=False)
    assert [c.output for c in train_calls[3:]] == [str(output / "lora-qv-r2")]
    assert third.ran == ["lora-qv-r2"] and third.skipped == ["lora-qv-r1", "full"]
    assert train_calls[-1].resume is True
    for name in ("lora-qv-r1", "full"):
        assert (output / name / RESULT_FILE).stat().st_mtime_ns == finished[name]
    assert (output / "lora-qv-r2" / RESULT_FILE).is_file()


class _Crash(TrainCallback):
    def on_step(self, record: dict) -> None:
        if record["step"] == 3:
            raise KeyboardInterrupt("killed")


def test_a_run_killed_midway_continues_from_its_checkpoint(
    tiny: dict[str, str], tmp_path: Path, train_calls: list
) -> None:
    config = base_config(tiny, steps=4, save_every=2)
    settings = [SweepSetting("lora", 2, ("q", "v"))]
    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, settings, tmp_path / "s", measure_memory=False, progress=lambda _: _Crash())
    folder = tmp_path / "s" / "lora-qv-r2"
    assert not (folder / RESULT_FILE).exists()
    assert [path.name for path in list_checkpoints(folder)] == ["step-00000002"]

    result = run_sweep(config, settings, tmp_path / "s", measure_memory=False)
    row = result.rows[0]
    assert len(train_calls) == 2 and result.ran == ["lora-qv-r2"]
    assert row.resumed_from is not None and Path(row.resumed_from).name == "step-00000002"
    assert row.steps == 4
    assert "resumed from a checkpoint" in sweep.table_markdown(result)


def test_a_finished_run_made_with_other_options_is_an_error(
    tiny: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, train_calls: list
) -> None:
    settings = [SweepSetting("lora", 1, ("q", "v"))]
    run_sweep(base_config(tiny), settings, tmp_path / "s", measure_memory=False)
    # the same files named by relative paths are the same options
    monkeypatch.chdir(tmp_path)
    relative = base_config(tiny, data="train.tsv", eval_data="dev.tsv")
    assert run_sweep(relative, settings, Path("s"), measure_memory=False).skipped == ["lora-qv-r1"]
    assert len(train_calls) == 1
    # a record written before an option existed: the option left at None is the same run, set is not
    path = tmp_path / "s" / "lora-qv-r1" / RESULT_FILE
    record = json.loads(path.read_text())
    assert record["config"].pop("modules_to_save") is None
    path.write_text(json.dumps(record))
    assert run_sweep(relative, settings, Path("s"), measure_memory=False).skipped == ["lora-qv-r1"]
    with pytest.raises(ValueError, match=r"other options \(modules_to_save: None there, \['pooler'\] now"):
        run_sweep(relative.replace(modules_to_save=["pooler"]), settings, Path("s"), measure_memory=False)
    assert len(train_calls) == 1
    with pytest.raises(ValueError, match=r"other options \(lr: 0\.01 there, 0\.02 now"):
        run_sweep(base_config(tiny, lr=2e-2), settings, tmp_path / "s", measure_memory=False)


# --- target names -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty target set"),
        ("q,,v", "empty target set or name"),
        ("q,v;", "empty target set"),
        ("all-linear,q", "use it alone"),
        ("q,q", "repeated"),
        ("q,v;q,v", "listed twice"),
        ("q v", "not in a module name"),
    ],
)
def test_bad_target_syntax_fails_clearly(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_target_sets(text)


@pytest.mark.parametrize("text", ["", "1,,2", "0", "2,x", "4,4", "-1"])
def test_bad_ranks_fail_clearly(text: str) -> None:
    with pytest.raises(ValueError, match="rank"):
        parse_ranks(text)


def test_parsing() -> None:
    assert parse_target_sets("q,v; q,k,v,o ;ALL-LINEAR") == [
        ("q", "v"),
        ("q", "k", "v", "o"),
        ("all-linear",),
    ]
    assert parse_ranks("1, 2,64") == [1, 2, 64]
    assert parse_assignments(["lr=1e-3", "steps=10", "bf16=true", "targets=[a, b]"]) == {
        "lr": 1e-3,
        "steps": 10,
        "bf16": True,
        "targets": ["a", "b"],
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_assignments(["lr"])


def _adapted(model: torch.nn.Module, targets: list[str] | str) -> set[str]:
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=targets))
    return {name for name, _ in lorakit.model.adapter_layers(model)}


def _linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def test_short_names_map_to_each_architectures_modules() -> None:
    bert, llama = tiny_bert(), tiny_llama()
    bert_names, llama_names = _linear_names(bert), _linear_names(llama)
    assert resolve_targets(["q", "v"], bert_names) == ["query", "value"]
    assert resolve_targets(["q", "v"], llama_names) == ["q_proj", "v_proj"]
    assert resolve_targets(["q", "k", "v", "o"], bert_names) == [
        "query",
        "key",
        "value",
        "attention.output.dense",
    ]
    assert resolve_targets(["o", "gate", "up", "down"], llama_names) == [
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert resolve_targets(["all-linear"], bert_names) == "all-linear"
    assert resolve_targets(["query", "dense"], bert_names) == ["query", "dense"]  # literal names pass

    # BERT's FFN output `layer.N.output.dense` must not drag in `layer.N.attention.output.dense` (o)
    adapted = _adapted(tiny_bert(), resolve_targets(["down"], bert_names))
    assert adapted == {f"bert.encoder.layer.{i}.output.dense" for i in range(2)}
    adapted = _adapted(tiny_bert(), resolve_targets(["o", "up"], bert_names))
    assert adapted == {
        f"bert.encoder.layer.{i}.{leaf}"
        for i in range(2)
        for leaf in ("attention.output.dense", "intermediate.dense")
    }


def test_unknown_targets_fail_clearly() -> None:
    bert_names = _linear_names(tiny_bert())
    with pytest.raises(ValueError, match=r"unknown target 'x': neither a short name .*query"):
        resolve_targets(["q", "x"], bert_names)
    with pytest.raises(
        ValueError, match=r"target 'gate' has no module in this architecture \(looked for gate_proj"
    ):
        resolve_targets(["gate"], bert_names)


def test_a_bad_target_stops_the_sweep_before_any_training(
    tiny: dict[str, str], tmp_path: Path, train_calls: list
) -> None:
    settings = [SweepSetting("lora", 1, ("q", "v")), SweepSetting("lora", 1, ("q", "qq"))]
    with pytest.raises(ValueError, match="unknown target 'qq'"):
        run_sweep(base_config(tiny), settings, tmp_path / "s")
    assert train_calls == [] and not (tmp_path / "s" / "lora-qv-r1").exists()


# --- the command line ---------------------------------------------------------------------------------------


def _cli(tiny: dict[str, str], output: Path, *extra: str) -> list[str]:
    return [
        "sweep",
        "--model",
        tiny["model"],
        "--data",
        tiny["data"],
        "--eval-data",
        tiny["eval_data"],
        "--set",
        "task=classify",
        "--set",
        "steps=2",
        "--set",
        "batch_size=4",
        "--set",
        "max_length=32",
        "--set",
        "eval_metric=accuracy",
        "--set",
        "device=cpu",
        "--quiet",
        "--no-memory",
        "--output",
        str(output),
        *extra,
    ]


def test_cli_runs_a_sweep_and_prints_the_table(
    tiny: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture, train_calls: list
) -> None:
    argv = _cli(
        tiny,
        tmp_path / "s",
        "--ranks",
        "1,2",
        "--targets",
        "q,v;q,k,v,o",
        "--grid",
        "axes",
        "--anchor-rank",
        "2",
        "--full",
        "--full-set",
        "lr=1e-4",
    )
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert [c.output.rsplit("/", 1)[-1] for c in train_calls] == [
        "lora-qv-r1",
        "lora-qv-r2",
        "lora-qkvo-r2",
        "full",
    ]
    assert train_calls[-1].method == "full" and train_calls[-1].lr == 1e-4
    assert "| lora-qkvo-r2 | lora | q,k,v,o | 2 |" in out
    assert (tmp_path / "s" / "sweep.md").is_file() and (tmp_path / "s" / "metric_vs_params.png").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--targets", "q,x"], "unknown target 'x'"),
        (["--targets", "q,,v"], "empty target set or name"),
        (["--set", "r=4"], "chosen per run by the sweep"),
        (["--set", "learning_rate=1e-3"], "did you mean 'lr'"),
    ],
)
def test_cli_errors_are_clear(
    tiny: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    train_calls: list,
    extra: list[str],
    message: str,
) -> None:
    try:
        code = main(_cli(tiny, tmp_path / "s", *extra))
    except SystemExit as exit_:  # argparse rejects a bad --targets itself, with usage and code 2
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert train_calls == []


# --- full fine-tuning in the trainer ------------------------------------------------------------------------


def test_full_fine_tuning_trains_every_parameter_and_saves_the_model(
    tiny: dict[str, str], tmp_path: Path
) -> None:
    config = base_config(tiny, method="full", lr=1e-3, output=str(tmp_path / "full"))
    result = train(config)
    trainable, total = lorakit.trainable_parameters(result.model)
    assert trainable == total and not lorakit.adapter_configs(result.model)
    folder = tmp_path / "full"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert not (folder / "adapter_config.json").exists()
    before = load_file(Path(tiny["model"]) / "model.safetensors")
    after = load_file(folder / "model.safetensors")
    for name in (
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.embeddings.word_embeddings.weight",
    ):
        assert not torch.equal(before[name], after[name]), f"{name} did not train"
    # the saved folder is the trained model: scoring it on the dev set gives the trainer's last evaluation
    scored = evaluate_run(folder, tiny["eval_data"])
    assert scored["accuracy"] == pytest.approx(result.eval_history[-1]["eval_accuracy"])
    assert scored["loss"] == pytest.approx(result.eval_history[-1]["eval_loss"], rel=1e-4)


def test_a_lora_run_is_scored_like_the_trainer_scored_it(tiny: dict[str, str], tmp_path: Path) -> None:
    result = train(base_config(tiny, r=2, targets=["query", "value"], steps=4, output=str(tmp_path / "lora")))
    scored = evaluate_run(tmp_path / "lora", tiny["eval_data"])
    assert scored["examples"] == 14
    assert scored["loss"] == pytest.approx(result.eval_history[-1]["eval_loss"], rel=1e-4)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"method": "partial"}, "method must be one of"),
        ({"method": "full", "dora": True}, "cannot be combined with dora"),
        ({"method": "full", "quantize": "nf4"}, "cannot be combined"),
    ],
)
def test_method_is_validated(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


# --- benchmarks/reproduce_sst2.py: the full-data design ---------------------------------------------------


@pytest.fixture(scope="module")
def reproduce():
    """The reproduction script as a module (benchmarks/ is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "reproduce_sst2.py"
    spec = importlib.util.spec_from_file_location("reproduce_sst2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_all_training_rows_cover_every_sentence_in_whole_batches(reproduce) -> None:
    rows = [f"{i % 2}\tsentence {i}" for i in range(67)]
    every = reproduce.training_rows(rows, None, batch_size=32)
    # 67 sentences fill 2 batches of 32 and 3 of the third; the first 29 of the shuffle fill it up
    assert len(every) == 96 and set(every) == set(rows)
    assert every[67:] == every[:29] and sorted(every[:67]) == sorted(rows)
    assert reproduce.training_rows(rows, 20, batch_size=32) == every[:20]  # a subset is a prefix
    assert reproduce.training_rows(rows, None, batch_size=67) == every[:67]  # nothing to fill
    with pytest.raises(ValueError, match="more than the 67 training sentences"):
        reproduce.training_rows(rows, 68, batch_size=32)


def test_reproduction_options_are_checked(reproduce, capsys: pytest.CaptureFixture) -> None:
    args = reproduce.parse_args(["--train-size", "all", "--pilot-size", "640", "--methods", "full,lora"])
    assert args.train_size is None and args.pilot_size == 640 and args.methods == ("lora", "full")
    assert reproduce.parse_args([]).train_size == 3200  # the published default stays
    for bad, message in (
        (["--train-size", "0"], "positive"),
        (["--train-size", "most"], "'all'"),
        (["--methods", "lora,dora"], "methods are lora, full"),
        (["--methods", "lora", "--stage", "sweep"], "pilot and final stages only"),
    ):
        with pytest.raises(SystemExit):
            reproduce.parse_args(bad)
        assert message in capsys.readouterr().err


def test_full_data_finals_train_on_every_sentence_at_the_pilots_learning_rates(
    reproduce, tiny: dict[str, str], tmp_path: Path, train_calls: list
) -> None:
    """Two processes' worth (--methods lora, then full), then both: the report from the finished runs."""
    common = [
        *("--train-size", "all", "--pilot-size", "8", "--batch-size", "3", "--max-length", "16"),
        *("--lora-lrs", "1e-3,3e-2", "--full-lrs", "1e-3", "--model", tiny["model"]),
        *("--sst2", str(tmp_path), "--runs", str(tmp_path / "runs"), "--figures", str(tmp_path / "figures")),
        *("--stage", "final"),
    ]
    assert reproduce.main([*common, "--methods", "lora"]) == 0
    assert not (tmp_path / "figures" / "pilot_lr.json").exists()  # one method alone writes no choice
    lora_calls = len(train_calls)
    assert lora_calls == 3  # two pilot runs, one final
    assert reproduce.main([*common, "--methods", "full"]) == 0
    assert len(train_calls) == 5
    assert reproduce.main(common) == 0
    assert len(train_calls) == 5  # everything finished: nothing retrained

    train_file = tmp_path / "runs" / "data" / "train-all.tsv"
    pilot, final_lora, _, final_full = train_calls[0], train_calls[2], train_calls[3], train_calls[4]
    # the pilot: 8 sentences = 2 steps of 3; the finals: all 28 sentences and 2 repeats = 10 steps of 3
    assert pilot.data.endswith("train-8.tsv") and pilot.steps == 2 and pilot.dtype == "fp32"
    for final in (final_lora, final_full):
        assert Path(final.data) == train_file and final.steps == 10
    trained, given = (path.read_text().splitlines()[1:] for path in (train_file, Path(tiny["data"])))
    assert len(trained) == 30 and set(trained) == set(given)
    choice = json.loads((tmp_path / "figures" / "pilot_lr.json").read_text())
    assert {t["lr"] for t in choice["trials"] if t["method"] == "lora"} == {1e-3, 3e-2}
    assert choice["pilot_sentences"] == 8 and choice["pilot_steps"] == 2
    assert final_lora.lr == choice["chosen"]["lora"]["lr"] and final_full.lr == 1e-3
    assert final_lora.method == "lora" and final_lora.r == 8 and final_full.method == "full"
    rows = json.loads((tmp_path / "figures" / "sweep.json").read_text())["rows"]
    assert [(row["name"], row["steps"]) for row in rows] == [("lora-qv-r8", 10), ("full", 10)]


def test_reproduction_figures_name_no_machine_folders(reproduce, tmp_path: Path) -> None:
    root = tmp_path / "checkout"
    value = {
        "data": str(tmp_path / "shared" / "data" / "dev.tsv"),
        "rows": [{"output": str(root / "runs" / "main" / "full"), "steps": 3}],
        "elsewhere": "/opt/data/x.tsv",
        "relative": "runs/x",
    }
    assert reproduce.portable_paths(value, root) == {
        "data": "../shared/data/dev.tsv",
        "rows": [{"output": "runs/main/full", "steps": 3}],
        "elsewhere": "/opt/data/x.tsv",
        "relative": "runs/x",
    }
    # what the script writes goes through it, with the checkout as the root
    reproduce._write_json(tmp_path / "x.json", {"folder": str(reproduce.ROOT / "runs" / "sst2" / "pilot")})
    assert json.loads((tmp_path / "x.json").read_text()) == {"folder": "runs/sst2/pilot"}


def test_lora_modules_to_save_reach_the_lora_runs_only(reproduce, tmp_path: Path) -> None:
    from lorakit.analysis.sweep.plan import setting_config

    args = reproduce.parse_args(["--lora-modules-to-save", "pooler, classifier"])
    assert reproduce.lora_options(args) == {"modules_to_save": ["pooler", "classifier"]}
    assert reproduce.lora_options(reproduce.parse_args([])) == {}
    train_file = tmp_path / "train.tsv"
    train_file.write_text("sentence\tlabel\n" + "".join(f"s{i}\t{i % 2}\n" for i in range(64)))
    base = reproduce.base_config(args, train_file).replace(**reproduce.lora_options(args))
    full = setting_config(base, SweepSetting("full"), tmp_path / "f", [], reproduce.full_overrides(1e-4))
    lora = setting_config(base, SweepSetting("lora", 8, ("q", "v")), tmp_path / "l", ["query", "value"])
    assert full.modules_to_save is None and full.lr == 1e-4
    assert lora.modules_to_save == ["pooler", "classifier"]


def test_final_runs_take_the_pilots_rates_for_final_epochs(reproduce, tmp_path: Path) -> None:
    train_file = tmp_path / "train.tsv"
    train_file.write_text("sentence\tlabel\n" + "".join(f"s{i}\t{i % 2}\n" for i in range(64)))
    chosen = {"lora": {"lr": 2e-3}, "full": {"lr": 1e-4}}
    one, overrides = reproduce.final_configs(reproduce.parse_args([]), train_file, chosen)
    assert one.steps == 2 and one.lr == 2e-3 and overrides == {"lr": 1e-4, "modules_to_save": None}
    two, _ = reproduce.final_configs(reproduce.parse_args(["--final-epochs", "2"]), train_file, chosen)
    assert two.steps == 4 and two.warmup_ratio == one.warmup_ratio  # the warmup stays 6 % of the run
    assert reproduce.final_configs(reproduce.parse_args([]), train_file, {"lora": {"lr": 1e-3}})[1] is None


@pytest.mark.parametrize("native_bf16", [None, "AVX512-BF16"])
def test_memory_is_measured_in_the_precision_the_run_chose(
    tiny: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native_bf16: str | None
) -> None:
    # dtype auto: `train` resolves it per machine; the memory probe after it must measure the same way
    from lorakit.analysis import measure
    from lorakit.train import precision

    monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda flags=None: native_bf16)
    real = measure.measure_training_peak
    seen: list[bool] = []

    def recording(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(*args, **kwargs)

    monkeypatch.setattr(measure, "measure_training_peak", recording)
    run_sweep(base_config(tiny, dtype="auto"), [SweepSetting("lora", 1, ("q", "v"))], tmp_path / "s")
    assert seen == [native_bf16 is not None]
