"""The command-line forms of a sweep: ranks (``1,2,4``), target sets (``q,v;q,k,v,o``), ``KEY=VALUE``."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from typing import Any

from lorakit.analysis.sweep.targets import ALL_LINEAR


def parse_ranks(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``.

    Raises:
        ValueError: empty, not an integer, below 1, or repeated.
    """
    ranks: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise ValueError(
                f"ranks must be comma-separated integers >= 1, got {text!r} (bad entry {part!r})"
            )
        if int(part) in ranks:
            raise ValueError(f"rank {part} is listed twice in {text!r}")
        ranks.append(int(part))
    return ranks


def parse_target_sets(text: str) -> list[tuple[str, ...]]:
    """``"q,v;q,k,v,o;all-linear"`` -> ``[("q", "v"), ("q", "k", "v", "o"), ("all-linear",)]``.

    Sets are separated by ``;``, names inside a set by ``,``. Whether a name exists in the model is
    checked later by `resolve_targets`.

    Raises:
        ValueError: an empty set or name, a name twice in a set, a set twice, or ``all-linear`` mixed
            with other names.
    """
    sets: list[tuple[str, ...]] = []
    for raw in text.split(";"):
        names = tuple(name.strip() for name in raw.split(","))
        if not raw.strip() or any(not name for name in names):
            raise ValueError(
                f"targets {text!r}: empty target set or name in {raw!r}; "
                "write sets like 'q,v;q,k,v,o;all-linear'"
            )
        if not all(re.fullmatch(r"[\w.\-]+", name) for name in names):
            raise ValueError(f"targets {text!r}: {raw!r} holds a character that is not in a module name")
        if len(set(names)) != len(names):
            raise ValueError(f"targets {text!r}: a name is repeated in {raw!r}")
        if ALL_LINEAR in (name.lower() for name in names) and len(names) > 1:
            raise ValueError(
                f"targets {text!r}: 'all-linear' already selects every linear layer; use it alone"
            )
        if names in sets:
            raise ValueError(f"targets {text!r}: the set {raw!r} is listed twice")
        sets.append(tuple(ALL_LINEAR if name.lower() == ALL_LINEAR else name for name in names))
    return sets


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """``["lr=1e-3", "targets=[q,v]"]`` -> ``{"lr": 0.001, ...}``; values are read as YAML scalars/lists.

    Raises:
        ValueError: an item without ``=``.
    """
    import yaml

    values: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        parsed = yaml.safe_load(value) if value.strip() else None
        if isinstance(parsed, str):
            # PyYAML reads `1e-3` (no dot) as a string; a value that reads as a number is one.
            with contextlib.suppress(ValueError):
                parsed = float(parsed)
        values[key.strip()] = parsed
    return values
