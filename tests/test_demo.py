"""`lorakit demo` plumbing on a tiny model: files, scoring on held-out data, the CLI's last line."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import lorakit
from lorakit.cli import demo as demo_cli
from lorakit.demo import DemoRecipe, DemoResult, run_demo
from lorakit.models import tiny_llama, tiny_tokenizer
from lorakit.train import evaluate

TINY_RECIPE = DemoRecipe(n_train=24, n_heldout=4, steps=3, batch_size=4, warmup_steps=1, max_length=96,
                         max_new_tokens=4, eval_batch_size=4, r=2, lora_alpha=4,
                         targets=("q_proj", "v_proj"))


def test_demo_trains_scores_and_writes_a_loadable_adapter(monkeypatch, tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    tiny_llama(seed=3, vocab_size=300).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    generated: list[list[str]] = []

    def scripted_answers(model, tokenizer, prompt_ids, max_new_tokens, batch_size):
        # The real generation runs; after training, the first three held-out replies are replaced by
        # the right dates (one with an end-of-turn marker, as a decoder may leave it), so the scores
        # the demo reports can be checked against known answers.
        answers = real_generate_answers(model, tokenizer, prompt_ids, max_new_tokens, batch_size)
        assert len(answers) == len(prompt_ids) == 4
        generated.append(answers)
        if len(generated) == 2:
            heldout = (tmp_path / "out" / "heldout.jsonl").read_text().splitlines()
            dates = [json.loads(line)["messages"][-1]["content"] for line in heldout]
            answers = [dates[0], f" {dates[1]}<|im_end|>", dates[2], answers[3]]
        return answers

    real_generate_answers = evaluate.generate_answers
    monkeypatch.setattr(evaluate, "generate_answers", scripted_answers)
    result = run_demo(tmp_path / "out", model_name=str(folder), recipe=TINY_RECIPE)

    # Four new tokens of a character tokenizer cannot spell a 10-character date: the base scores 0.
    assert len(generated) == 2 and result.before == 0.0 and result.answer_before == generated[0][0].strip()
    assert result.after == 0.75 and result.answer_after == result.reference
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", result.reference)
    train = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    heldout = [json.loads(line) for line in (tmp_path / "out" / "heldout.jsonl").read_text().splitlines()]
    assert (len(train), len(heldout)) == (24, 4)
    answers = {row["messages"][-1]["content"] for row in train}
    assert not answers & {row["messages"][-1]["content"] for row in heldout}
    summary = json.loads((tmp_path / "out" / "demo_result.json").read_text())
    assert summary["before"] == result.before and summary["recipe"]["steps"] == 3
    # The adapter the demo leaves behind is a PEFT-layout adapter of the trained model.
    fresh = tiny_llama(seed=3, vocab_size=300)
    lorakit.load_adapter(fresh, tmp_path / "out")
    assert lorakit.active_adapters(fresh) == ["default"]
    assert any(t.abs().sum() > 0 for n, t in fresh.named_parameters() if "lora_B" in n)


def test_cli_ends_with_the_before_after_line(monkeypatch, capsys, tmp_path: Path) -> None:
    def fake_run_demo(output, *, recipe, progress):
        return DemoResult(before=0.04, after=0.91, prompt="Convert the date 'May 1, 2000' to ISO 8601.",
                          reference="2000-05-01", answer_before="May 1, 2000 is a date.",
                          answer_after="2000-05-01", adapter_dir=Path(output), train_seconds=1.0,
                          total_seconds=2.0, recipe=recipe)

    monkeypatch.setattr("lorakit.demo.run_demo", fake_run_demo)
    assert demo_cli.run(argparse.Namespace(output=str(tmp_path), steps=None)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "held-out exact match: before 4.0% -> after 91.0%"
    assert any("2000-05-01" in line and "after LoRA" in line for line in lines)
