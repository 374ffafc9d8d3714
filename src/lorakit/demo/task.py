"""The task that `lorakit demo` teaches SmolLM2: rewrite an English date as an ISO 8601 date.

A prompt such as ``Convert the date 'the 5th of March, 2021' to ISO 8601.`` must be answered with
exactly ``2021-03-05`` and nothing else. The base SmolLM2-135M-Instruct answers with a sentence that
echoes the date (0 % exact match, and the ISO date appears anywhere in its reply about 4 % of the time),
so the skill is absent before fine-tuning; it is a rule (month name to number, zero padding, field
order), not a lookup, so it carries over to dates never seen in training.

Everything here is deterministic for a given seed (one `random.Random`, no global state), needs
nothing beyond the standard library, and never prints.

Typical use::

    split = make_split(n_train=2000, n_heldout=200, seed=0)
    train_conversations = [example.messages() for example in split.train]
    prompts = [example.messages(with_answer=False) for example in split.heldout]
    ...  # generate one reply per prompt
    rate = exact_match_rate(replies, [example.answer for example in split.heldout])
"""

from __future__ import annotations

import datetime
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "DATE_STYLES",
    "FIRST_DATE",
    "LAST_DATE",
    "MONTHS",
    "PROMPT_TEMPLATES",
    "DateExample",
    "DemoSplit",
    "check_disjoint",
    "exact_match",
    "exact_match_rate",
    "format_date",
    "make_example",
    "make_split",
    "normalize_answer",
]

Message = dict[str, str]

MONTHS: tuple[str, ...] = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
WEEKDAYS: tuple[str, ...] = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

#: The ways a date is written in a prompt (see `format_date`).
DATE_STYLES: tuple[str, ...] = ("month-first", "day-first", "abbreviated", "ordinal", "weekday")

#: The instruction around the date; ``{date}`` is replaced by the written date.
PROMPT_TEMPLATES: tuple[str, ...] = (
    "Convert the date '{date}' to ISO 8601.",
    "What is {date} in ISO 8601 format?",
    "Write {date} as an ISO 8601 date.",
)

#: Dates are drawn uniformly from this closed range.
FIRST_DATE = datetime.date(1950, 1, 1)
LAST_DATE = datetime.date(2049, 12, 31)

# Markers a decoder may leave at the end of a reply when special tokens are not skipped.
_END_MARKERS: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>", "</s>")
_STRIP_CHARS = " \t\r\n'\"`"


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def format_date(date: datetime.date, style: str) -> str:
    """Write ``date`` in English in one of `DATE_STYLES`.

    ``month-first``: ``March 5, 2021``; ``day-first``: ``5 March 2021``; ``abbreviated``:
    ``Mar 5, 2021``; ``ordinal``: ``the 5th of March, 2021``; ``weekday``: ``Friday, 5 March 2021``.
    """
    month = MONTHS[date.month - 1]
    if style == "month-first":
        return f"{month} {date.day}, {date.year}"
    if style == "day-first":
        return f"{date.day} {month} {date.year}"
    if style == "abbreviated":
        return f"{month[:3]} {date.day}, {date.year}"
    if style == "ordinal":
        return f"the {_ordinal(date.day)} of {month}, {date.year}"
    if style == "weekday":
        return f"{WEEKDAYS[date.weekday()]}, {date.day} {month} {date.year}"
    raise ValueError(f"unknown date style {style!r}; expected one of {DATE_STYLES}")


@dataclass(frozen=True)
class DateExample:
    """One instruction: a date written in English, to be answered in ISO 8601."""

    date: datetime.date
    style: str
    prompt: str

    @property
    def answer(self) -> str:
        """The one correct reply, ``YYYY-MM-DD``."""
        return self.date.isoformat()

    def messages(self, with_answer: bool = True) -> list[Message]:
        """The example as chat messages: the user turn, then (by default) the assistant's answer."""
        conversation: list[Message] = [{"role": "user", "content": self.prompt}]
        if with_answer:
            conversation.append({"role": "assistant", "content": self.answer})
        return conversation


def make_example(date: datetime.date, style: str, template: str = PROMPT_TEMPLATES[0]) -> DateExample:
    """Build the example asking for ``date`` written in ``style`` inside ``template``."""
    if "{date}" not in template:
        raise ValueError("a prompt template must contain '{date}'")
    return DateExample(date=date, style=style, prompt=template.format(date=format_date(date, style)))


@dataclass(frozen=True)
class DemoSplit:
    """Training examples and held-out examples; no calendar day occurs in both."""

    train: tuple[DateExample, ...]
    heldout: tuple[DateExample, ...]


def check_disjoint(train: Iterable[DateExample], heldout: Iterable[DateExample]) -> None:
    """Raise `AssertionError` if a held-out example shares its date, prompt or answer with training.

    Sharing the calendar day is enough to count as overlap: the same day written in another style
    would let a model pass the held-out example by recall rather than by applying the rule. The
    check is an explicit ``raise``, so it also runs under ``python -O``.
    """
    train = list(train)
    heldout = list(heldout)
    shared_dates = {e.date for e in train} & {e.date for e in heldout}
    shared_prompts = {e.prompt for e in train} & {e.prompt for e in heldout}
    shared_answers = {e.answer for e in train} & {e.answer for e in heldout}
    if shared_dates or shared_prompts or shared_answers:
        shared_days = shared_dates | {datetime.date.fromisoformat(a) for a in shared_answers}
        sample = sorted(str(d) for d in shared_days)
        raise AssertionError(
            f"train and held-out overlap: {len(shared_dates)} dates, {len(shared_prompts)} prompts, "
            f"{len(shared_answers)} answers (e.g. {sample[:3]})"
        )


def make_split(n_train: int = 2000, n_heldout: int = 200, seed: int = 0) -> DemoSplit:
    """Draw ``n_train + n_heldout`` distinct dates and split them into training and held-out examples.

    Each example gets a style from `DATE_STYLES` and a template from `PROMPT_TEMPLATES`, both drawn
    with the same seeded generator, so the split is a pure function of its arguments. The held-out
    examples are drawn first, so changing ``n_train`` keeps the held-out set unchanged.
    """
    if n_train < 0 or n_heldout < 0:
        raise ValueError("n_train and n_heldout must not be negative")
    span = (LAST_DATE - FIRST_DATE).days + 1
    if n_train + n_heldout > span:
        raise ValueError(f"at most {span} distinct dates exist in {FIRST_DATE}..{LAST_DATE}")
    rng = random.Random(seed)

    def build(offsets: Sequence[int]) -> tuple[DateExample, ...]:
        return tuple(
            make_example(
                FIRST_DATE + datetime.timedelta(days=offset),
                rng.choice(DATE_STYLES),
                rng.choice(PROMPT_TEMPLATES),
            )
            for offset in offsets
        )

    heldout_offsets = rng.sample(range(span), n_heldout)
    heldout = build(heldout_offsets)
    taken = set(heldout_offsets)
    train_offsets: list[int] = []
    while len(train_offsets) < n_train:
        offset = rng.randrange(span)
        if offset not in taken:
            taken.add(offset)
            train_offsets.append(offset)
    train = build(train_offsets)
    check_disjoint(train, heldout)
    return DemoSplit(train=train, heldout=heldout)


def normalize_answer(text: str) -> str:
    """Reduce a generated reply to the form compared by `exact_match`.

    Cuts at the first end-of-turn marker (``<|im_end|>``, ``<|endoftext|>``, ``</s>``), strips
    surrounding whitespace, quotes and backticks and one trailing full stop, collapses runs of
    whitespace to one space and case-folds. Nothing else is forgiven: a reply that wraps the date in
    a sentence, or writes ``2021-3-5``, does not match ``2021-03-05``.
    """
    for marker in _END_MARKERS:
        text = text.split(marker, 1)[0]
    text = text.strip(_STRIP_CHARS)
    if text.endswith("."):
        text = text[:-1].strip(_STRIP_CHARS)
    return re.sub(r"\s+", " ", text).casefold()


def exact_match(prediction: str, reference: str) -> bool:
    """Whether ``prediction`` equals ``reference`` once both are normalised by `normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(reference)


def exact_match_rate(predictions: Sequence[str], references: Sequence[str]) -> float:
    """The fraction (0.0 to 1.0) of predictions that exactly match their reference."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no references to score against")
    return sum(exact_match(p, r) for p, r in zip(predictions, references)) / len(references)
