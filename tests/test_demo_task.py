"""The demo task's generator, split and scorer (fast, standard library only)."""

from __future__ import annotations

import datetime

import pytest

from lorakit.demo.task import (
    DATE_STYLES,
    FIRST_DATE,
    LAST_DATE,
    PROMPT_TEMPLATES,
    DateExample,
    check_disjoint,
    exact_match,
    exact_match_rate,
    format_date,
    make_example,
    make_split,
    normalize_answer,
)

DAY = datetime.date(2021, 3, 5)  # a Friday


def test_same_seed_gives_the_same_split():
    assert make_split(300, 50, seed=7) == make_split(300, 50, seed=7)


def test_other_seed_gives_another_split():
    assert make_split(300, 50, seed=7).heldout != make_split(300, 50, seed=8).heldout


def test_heldout_does_not_depend_on_train_size():
    assert make_split(100, 40, seed=3).heldout == make_split(900, 40, seed=3).heldout


def test_split_sizes_and_no_overlap():
    split = make_split(2000, 200, seed=0)
    assert len(split.train) == 2000
    assert len(split.heldout) == 200
    train_dates = {e.date for e in split.train}
    heldout_dates = {e.date for e in split.heldout}
    assert len(train_dates) == 2000 and len(heldout_dates) == 200  # every date drawn once
    assert not train_dates & heldout_dates
    assert not {e.prompt for e in split.train} & {e.prompt for e in split.heldout}
    check_disjoint(split.train, split.heldout)  # does not raise


def test_split_covers_every_style_template_and_month():
    split = make_split(2000, 200, seed=0)
    for examples in (split.train, split.heldout):
        assert {e.style for e in examples} == set(DATE_STYLES)
        assert {next(t for t in PROMPT_TEMPLATES if e.prompt == t.format(date=format_date(e.date, e.style)))
                for e in examples} == set(PROMPT_TEMPLATES)
        assert {e.date.month for e in examples} == set(range(1, 13))
        assert all(FIRST_DATE <= e.date <= LAST_DATE for e in examples)


def test_check_disjoint_catches_the_same_day_in_another_style():
    train = [make_example(DAY, "month-first")]
    heldout = [make_example(DAY, "ordinal", PROMPT_TEMPLATES[1])]
    assert train[0].prompt != heldout[0].prompt
    with pytest.raises(AssertionError, match="overlap"):
        check_disjoint(train, heldout)


def test_split_rejects_impossible_sizes():
    with pytest.raises(ValueError):
        make_split(-1, 10)
    with pytest.raises(ValueError):
        make_split((LAST_DATE - FIRST_DATE).days, 10)


@pytest.mark.parametrize(
    ("style", "text"),
    [
        ("month-first", "March 5, 2021"),
        ("day-first", "5 March 2021"),
        ("abbreviated", "Mar 5, 2021"),
        ("ordinal", "the 5th of March, 2021"),
        ("weekday", "Friday, 5 March 2021"),
    ],
)
def test_format_date_styles(style, text):
    assert format_date(DAY, style) == text


@pytest.mark.parametrize(("day", "ordinal"), [(1, "1st"), (2, "2nd"), (3, "3rd"), (4, "4th"), (11, "11th"),
                                               (12, "12th"), (13, "13th"), (21, "21st"), (22, "22nd"),
                                               (23, "23rd"), (31, "31st")])
def test_ordinal_suffixes(day, ordinal):
    assert format_date(datetime.date(2020, 1, day), "ordinal") == f"the {ordinal} of January, 2020"


def test_format_date_rejects_unknown_style():
    with pytest.raises(ValueError, match="unknown date style"):
        format_date(DAY, "roman")


def test_example_messages_and_answer():
    example = make_example(datetime.date(1957, 4, 7), "ordinal")
    assert isinstance(example, DateExample)
    assert example.answer == "1957-04-07"
    assert example.messages() == [
        {"role": "user", "content": "Convert the date 'the 7th of April, 1957' to ISO 8601."},
        {"role": "assistant", "content": "1957-04-07"},
    ]
    assert example.messages(with_answer=False) == example.messages()[:1]


def test_make_example_rejects_template_without_placeholder():
    with pytest.raises(ValueError):
        make_example(DAY, "day-first", "Convert this date.")


@pytest.mark.parametrize(
    "reply",
    [
        "2021-03-05",
        "  2021-03-05\n",
        "2021-03-05.",
        "'2021-03-05'",
        '"2021-03-05".',
        "`2021-03-05`",
        "2021-03-05<|im_end|>",
        "2021-03-05<|im_end|>\n<|im_start|>user",
        "2021-03-05</s>",
    ],
)
def test_scorer_forgives_only_wrapping(reply):
    assert exact_match(reply, "2021-03-05")


@pytest.mark.parametrize(
    "reply",
    [
        "The date is 2021-03-05.",
        "2021-3-5",
        "2021/03/05",
        "05-03-2021",
        "2021-03-05 (ISO 8601)",
        "2021-03-050",
        "",
    ],
)
def test_scorer_rejects_other_answers(reply):
    assert not exact_match(reply, "2021-03-05")


def test_normalize_answer():
    assert normalize_answer("  Hello   World. ") == "hello world"
    assert normalize_answer("a\t\n b") == "a b"
    assert normalize_answer("x..") == "x."  # only one trailing full stop goes


def test_exact_match_rate():
    predictions = ["2021-03-05", "nope", "1999-12-31."]
    references = ["2021-03-05", "2000-01-01", "1999-12-31"]
    assert exact_match_rate(predictions, references) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        exact_match_rate(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        exact_match_rate([], [])
