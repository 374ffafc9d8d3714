"""benchmarks/bench_sft.py's pieces on tiny models: the job builders (deterministic, disjoint, the same
conversations and the same loss positions for lorakit and TRL) and the one judge (normalisation, exact
match, greedy replies against a token-by-token argmax oracle)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from train_support import write_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import sft_jobs
from sft_jobs import (
    chat_rows,
    exact_match_rate,
    greedy_replies,
    judge,
    long_job,
    normalise,
    prompt_completion_rows,
    short_job,
    write_job,
)

from lorakit.models import tiny_tokenizer

# --- job builders -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [short_job, long_job])
def test_jobs_are_deterministic_sized_and_disjoint(build) -> None:
    job = build(40, 10, seed=3)
    assert job == build(40, 10, seed=3)
    assert job.train != build(40, 10, seed=4).train
    assert (len(job.train), len(job.heldout)) == (40, 10)
    assert not {p for p, _ in job.heldout} & {p for p, _ in job.train}  # held-out prompts never trained on
    assert job.references() == [a for _, a in job.heldout] and len(job.prompts()) == 10


def test_short_job_is_the_demo_task() -> None:
    job = short_job(20, 5)
    for prompt, answer in job.train:
        assert "ISO 8601" in prompt
        assert len(answer) == 10 and answer[4] == answer[7] == "-"


def test_long_job_answers_rewrite_the_prompt_and_lengths_vary_widely() -> None:
    job = long_job(200, 10, seed=0)
    for prompt, answer in job.train:
        inventory = prompt.split("Inventory:\n", 1)[1].splitlines()
        expected = [f"- {line.split(': ')[1]} {line.split(': ')[0]}" for line in inventory]
        assert answer.splitlines() == expected
    prompt_lengths = sorted(len(p) for p, _ in job.train)
    answer_lengths = sorted(len(a) for _, a in job.train)
    assert prompt_lengths[-1] > 6 * prompt_lengths[0]  # prompts of very different lengths
    assert answer_lengths[-1] > 6 * answer_lengths[0]  # and long, varied answers


def test_both_files_hold_the_same_conversations(tmp_path: Path) -> None:
    job = short_job(6, 2)
    files = write_job(job, tmp_path)
    chat = [json.loads(line) for line in files["train_chat"].read_text().splitlines()]
    pc = [json.loads(line) for line in files["train_pc"].read_text().splitlines()]
    assert chat == chat_rows(job.train) and pc == prompt_completion_rows(job.train)
    for c, p in zip(chat, pc, strict=True):
        assert c["messages"] == p["prompt"] + p["completion"]


def test_lorakit_and_trl_tokenise_alike_with_loss_on_the_answer_only(tmp_path: Path) -> None:
    # The same token ids and the same positions carrying loss, from lorakit.data (chat rows) and from
    # TRL's SFTTrainer (prompt-completion rows), on a tiny model and its ChatML character tokenizer.
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from lorakit.data import prepare_examples, rows_from_records

    job = long_job(4, 1, seed=1)
    pairs = [(p[:40], a[:30]) for p, a in job.train]  # within the tiny tokenizer's 256 positions
    folder = write_tiny_model(tmp_path / "tiny")
    tokenizer = tiny_tokenizer()
    ours, _ = prepare_examples(rows_from_records(chat_rows(pairs)), tokenizer, format="chat")
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(folder),
        args=SFTConfig(
            output_dir=str(tmp_path / "trl"),
            use_cpu=True,
            bf16=False,
            report_to="none",
            gradient_checkpointing=False,
            max_length=256,
        ),
        train_dataset=Dataset.from_list(prompt_completion_rows(pairs)),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=2, target_modules="all-linear"),
    )
    theirs = list(trainer.train_dataset)
    assert len(ours) == len(theirs) == len(pairs)
    for mine, trl_row, (_, answer) in zip(ours, theirs, pairs, strict=True):
        ids = list(mine["input_ids"])
        labelled = [i for i, label in enumerate(mine["labels"]) if label != -100]
        assert ids == list(trl_row["input_ids"])
        # TRL 1.x builds its labels in the dataset (-100 outside the completion)
        assert labelled == [i for i, label in enumerate(trl_row["labels"]) if label != -100]
        # the labelled tokens are the answer and its end-of-turn marker, nothing of the prompt
        assert tokenizer.decode([ids[i] for i in labelled]).startswith(answer)


# --- the judge ----------------------------------------------------------------------------------------------


def test_normalise_and_exact_match() -> None:
    assert normalise("  '2021-03-05'<|im_end|>garbage") == "2021-03-05"
    assert normalise("- 1 a  \n- 2 b\n") == "- 1 a\n- 2 b"
    assert (
        exact_match_rate(["2021-03-05 ", "x", "- 1 a \n- 2 b"], ["2021-03-05", "y", "- 1 a\n- 2 b"]) == 2 / 3
    )
    assert exact_match_rate(["a"], ["A"]) == 0.0  # case matters: the answers are exact strings
    with pytest.raises(ValueError, match="2 replies for 1 references"):
        exact_match_rate(["a", "b"], ["a"])
    with pytest.raises(ValueError):
        exact_match_rate([], [])


def _argmax_reply(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Oracle: one prompt alone, no padding, the next token by argmax of the last logits, stop at eos."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(
                model(torch.cat([ids, torch.tensor([new], dtype=ids.dtype)], 1)).logits[0, -1].argmax()
            )
            new.append(token)
            if token == tokenizer.eos_token_id:
                break
    return tokenizer.decode(new, skip_special_tokens=True)


def test_greedy_replies_equal_a_token_by_token_argmax(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder = write_tiny_model(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = tiny_tokenizer()
    prompts = ["rev cat", "a much longer prompt than the first one", "x"]  # left padding must not matter
    replies = greedy_replies(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    assert replies == [_argmax_reply(model, tokenizer, p, 6) for p in prompts]
    assert tokenizer.padding_side == "right"  # restored


def test_judge_scores_an_adapter_folder_the_same_for_everyone(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = write_tiny_model(tmp_path / "tiny")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(folder), LoraConfig(r=2, target_modules="all-linear")
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload().eval()
    prompts = ["rev cat", "rev dog"]
    expected = [_argmax_reply(merged, tiny_tokenizer(), p, 5) for p in prompts]

    right = judge(folder, tmp_path / "adapter", prompts, expected, max_new_tokens=5)
    assert right["exact_match"] == 1.0 and right["sample_replies"] == expected
    base = judge(folder, None, prompts, expected, max_new_tokens=5)
    assert base["sample_replies"] != expected  # the adapter changed the replies: it was applied
    assert base["exact_match"] < 1.0
    assert sft_jobs.normalise(expected[0]) == expected[0].strip()
