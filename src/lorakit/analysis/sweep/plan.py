"""The settings of a sweep (rank × target set, DoRA, full fine-tuning) and the training options of each."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lorakit.analysis.sweep.targets import resolve_targets
from lorakit.train import TrainConfig

GRIDS = ("product", "axes")
Method = Literal["lora", "dora", "full"]
# Options a sweep sets per setting: giving them as a base option would be silently overwritten.
SWEEP_OWNED = ("r", "targets", "dora", "method", "output", "resume")


@dataclass(frozen=True)
class SweepSetting:
    """One run of a sweep: ``method`` with rank ``r`` on the ``targets`` short names (None for full FT)."""

    method: Method
    r: int | None = None
    targets: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        """The folder name: ``full``, ``lora-qv-r8``, ``lora-all-linear-r8``, ``dora-qkvo-r8``."""
        if self.method == "full" or self.targets is None:
            return "full"
        return f"{self.method}-{target_label(self.targets, compact=True)}-r{self.r}"


def target_label(targets: Sequence[str], compact: bool = False) -> str:
    """``("q", "v")`` -> ``"q,v"`` (or ``"qv"`` when ``compact`` and every name is one letter)."""
    if compact:
        return "".join(targets) if all(len(t) == 1 for t in targets) else "+".join(targets)
    return ",".join(targets)


def plan_settings(
    ranks: Sequence[int],
    target_sets: Sequence[Sequence[str]],
    *,
    grid: str = "product",
    anchor_rank: int | None = None,
    dora: bool = False,
    full: bool = False,
) -> list[SweepSetting]:
    """The runs of a sweep, in order.

    ``grid="product"``: LoRA at every rank on every target set. ``grid="axes"``: every rank on the first
    target set, and every other target set at ``anchor_rank`` only (a one-factor-at-a-time sweep; far
    fewer runs). ``dora`` adds one DoRA run at ``anchor_rank`` on the first target set, ``full`` one full
    fine-tuning run. ``anchor_rank`` defaults to 8 when it is among ``ranks``, else to the first rank.

    Raises:
        ValueError: an unknown grid, or no rank or target set.
    """
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    if not ranks or not target_sets:
        raise ValueError("a sweep needs at least one rank and one target set")
    anchor = anchor_rank if anchor_rank is not None else (8 if 8 in ranks else ranks[0])
    settings: list[SweepSetting] = []
    for index, targets in enumerate(target_sets):
        chosen = ranks if grid == "product" or index == 0 else [anchor]
        settings.extend(SweepSetting("lora", r, tuple(targets)) for r in chosen)
    if dora:
        settings.append(SweepSetting("dora", anchor, tuple(target_sets[0])))
    if full:
        settings.append(SweepSetting("full"))
    return list(dict.fromkeys(settings))


def setting_config(
    base: TrainConfig,
    setting: SweepSetting,
    folder: Path,
    linear_names: Sequence[str],
    full_overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """The `TrainConfig` of one setting: ``base`` with the setting's adapter, its folder, ``resume=True``."""
    changes: dict[str, Any] = {"output": str(folder), "resume": True}
    if setting.method == "full":
        changes.update(method="full", dora=False, **(full_overrides or {}))
    else:
        assert setting.targets is not None and setting.r is not None
        changes.update(
            method="lora",
            r=setting.r,
            targets=resolve_targets(setting.targets, linear_names),
            dora=setting.method == "dora",
        )
    return base.replace(**changes)
