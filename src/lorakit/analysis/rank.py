"""How low-rank is a fine-tuning update? Per-layer SVD of ΔW = W_tuned − W_base.

Three inputs are accepted (``analyse_rank``):

- two model folders (safetensors): ΔW per 2-D tensor present in both with the same shape; identical
  tensors are skipped;
- a model folder and a PEFT adapter folder: ΔW = scaling · B A per adapted module (DoRA: the exact
  merged update, which needs the base), plus ``modules_to_save`` copies as dense differences;
- an adapter folder alone: the effective rank of scaling · B A, from the r×r core (``spectrum``).

The numbers per layer are defined in ``lorakit.analysis.spectrum``; ``write_rank_report`` turns a
``RankReport`` into rank.json, rank.md and PNG plots.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from lorakit.analysis import spectrum
from lorakit.models.folder import ModelFolder, resolve_base_name, resolve_name
from lorakit.peft_format import Adapter, LoraPair, is_adapter_folder, load_adapter_folder

# singular values kept per layer in the JSON: enough for every plot, bounded for 4096-wide layers
JSON_SINGULAR_VALUES = 256


@dataclass
class LayerRank:
    """The spectrum of one layer's update ΔW (shape ``shape``, in the base weight's orientation)."""

    name: str
    shape: tuple[int, int]
    singular_values: list[float]
    energy_rank: int
    stable_rank: float
    frobenius_norm: float
    spectral_norm: float
    relative_errors: dict[int, float]
    relative_update: float | None = None  # ||ΔW||_F / ||W_base||_F, when the base is known
    adapter_rank: int | None = None  # the adapter's r, when ΔW comes from an adapter

    @property
    def module_type(self) -> str:
        """The module's own name (``q_proj``), used to group layers in plots and summaries."""
        parts = [p for p in self.name.split(".") if p not in ("weight", "base_layer")]
        return parts[-1] if parts else self.name

    @property
    def layer_index(self) -> int | None:
        """The block index in the name (``model.layers.7.…`` → 7), if any."""
        found = re.search(r"\.(\d+)\.", f".{self.name}.")
        return int(found.group(1)) if found else None


@dataclass
class RankReport:
    """All analysed layers plus the ones skipped and why."""

    mode: Literal["models", "base+adapter", "adapter"]
    base: str | None
    tuned: str
    threshold: float
    layers: list[LayerRank] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def analyse_values(
    name: str,
    shape: tuple[int, int],
    values: torch.Tensor,
    threshold: float,
    base_norm: float | None = None,
    adapter_rank: int | None = None,
) -> LayerRank:
    """Build a ``LayerRank`` from the singular values (shape (n,), descending) of a layer's ΔW."""
    frobenius = spectrum.energy(values) ** 0.5
    return LayerRank(
        name=name,
        shape=(int(shape[0]), int(shape[1])),
        singular_values=[float(v) for v in values],
        energy_rank=spectrum.energy_rank(values, threshold),
        stable_rank=spectrum.stable_rank(values),
        frobenius_norm=frobenius,
        spectral_norm=float(values[0]) if values.numel() else 0.0,
        relative_errors=spectrum.eckart_young_errors(values),
        relative_update=frobenius / base_norm if base_norm else None,
        adapter_rank=adapter_rank,
    )


def analyse_delta(
    name: str, delta: torch.Tensor, threshold: float = 0.95, base_norm: float | None = None
) -> LayerRank:
    """Spectrum of a dense update ``delta`` (out, in)."""
    return analyse_values(name, tuple(delta.shape), spectrum.singular_values(delta), threshold, base_norm)


def analyse_pair(pair: LoraPair, threshold: float = 0.95, base_norm: float | None = None) -> LayerRank:
    """Spectrum of scaling · B A (B (out, r), A (r, in)) via the r×r core; shape in base orientation."""
    values = spectrum.lowrank_singular_values(pair.lora_B, pair.lora_A, pair.scaling)
    return analyse_values(pair.module, pair.delta_shape, values, threshold, base_norm, adapter_rank=pair.r)


def dora_delta(pair: LoraPair, base: torch.Tensor) -> torch.Tensor:
    """The exact DoRA update W' − W, with W' = m / ||W + sBA||_row · (W + sBA), shape (out, in).

    PEFT's DoRA normalises each output row (``torch.linalg.norm(weight, dim=1)`` on the (out, in)
    weight) and rescales it by the magnitude vector m (out,).
    """
    weight = base.to(torch.float64)
    weight = weight.T if pair.transposed else weight
    combined = weight + pair.scaling * (pair.lora_B.to(torch.float64) @ pair.lora_A.to(torch.float64))
    norms = torch.linalg.norm(combined, dim=1)
    assert pair.magnitude is not None
    merged = (pair.magnitude.to(torch.float64) / norms)[:, None] * combined
    delta = merged - weight
    return delta.T if pair.transposed else delta


def _analyse_models(base: Path, tuned: Path, threshold: float) -> RankReport:
    report = RankReport(mode="models", base=str(base), tuned=str(tuned), threshold=threshold)
    with ModelFolder(base) as base_folder, ModelFolder(tuned) as tuned_folder:
        base_names = set(base_folder.names())
        for name in tuned_folder.matrices():
            base_name = resolve_name(name, base_names)
            if base_name is None:
                report.skipped[name] = "not in base"
                continue
            if base_folder.shape(base_name) != tuned_folder.shape(name):
                report.skipped[name] = f"shape {base_folder.shape(base_name)} vs {tuned_folder.shape(name)}"
                continue
            before, after = base_folder.get(base_name), tuned_folder.get(name)
            if torch.equal(before, after):
                report.skipped[name] = "identical"
                continue
            before = before.to(torch.float64)
            delta = after.to(torch.float64) - before
            report.layers.append(analyse_delta(name, delta, threshold, float(torch.linalg.norm(before))))
    return report


def _analyse_base_adapter(base: Path, adapter: Adapter, threshold: float) -> RankReport:
    report = RankReport(mode="base+adapter", base=str(base), tuned=str(adapter.path), threshold=threshold)
    with ModelFolder(base) as folder:
        names = set(folder.names())
        for module, pair in adapter.pairs.items():
            weight_name = resolve_base_name(module, names)
            weight = folder.get(weight_name)
            if tuple(weight.shape) != pair.delta_shape:
                raise ValueError(
                    f"adapter module {module!r} gives an update of shape {pair.delta_shape} but the base "
                    f"weight {weight_name!r} is {tuple(weight.shape)} (is fan_in_fan_out set right?)"
                )
            base_norm = float(torch.linalg.norm(weight.to(torch.float64)))
            if pair.magnitude is not None and pair.kind == "linear":
                delta = dora_delta(pair, weight)
                report.layers.append(analyse_delta(module, delta, threshold, base_norm))
            else:
                report.layers.append(analyse_pair(pair, threshold, base_norm))
        for name, tensor in adapter.full_tensors.items():
            if tensor.ndim != 2:
                report.skipped[name] = f"{tensor.ndim}-D"
                continue
            base_name = name if name in names else None
            if base_name is None or folder.shape(base_name) != tuple(tensor.shape):
                report.skipped[name] = "saved module with no same-shaped base weight"
                continue
            before = folder.get(base_name)
            if torch.equal(before, tensor):
                report.skipped[name] = "identical"
                continue
            before = before.to(torch.float64)
            delta = tensor.to(torch.float64) - before
            report.layers.append(analyse_delta(name, delta, threshold, float(torch.linalg.norm(before))))
    if adapter.use_dora:
        report.notes.append("DoRA: each update is the exact merged W' − W, computed with the base weights.")
    return report


def _analyse_adapter(adapter: Adapter, threshold: float) -> RankReport:
    report = RankReport(mode="adapter", base=None, tuned=str(adapter.path), threshold=threshold)
    for pair in adapter.pairs.values():
        report.layers.append(analyse_pair(pair, threshold))
    for name in adapter.full_tensors:
        report.skipped[name] = "full module copy: needs the base model to form ΔW"
    if adapter.use_dora:
        report.notes.append(
            "DoRA adapter analysed without its base: the magnitude vector is ignored, "
            "only scaling·BA is shown."
        )
    return report


def analyse_rank(base: str | Path | None, tuned: str | Path, threshold: float = 0.95) -> RankReport:
    """Per-layer spectrum of the update from ``base`` to ``tuned``.

    ``tuned`` is a model folder or a PEFT adapter folder; ``base`` is a model folder, or None to
    analyse an adapter alone. Layers whose update is exactly zero (e.g. an untrained B = 0) are
    skipped with the reason "zero update".
    """
    tuned = Path(tuned)
    if is_adapter_folder(tuned):
        adapter = load_adapter_folder(tuned)
        report = _analyse_adapter(adapter, threshold) if base is None else _analyse_base_adapter(
            Path(base), adapter, threshold
        )
    elif base is None:
        raise ValueError(f"{tuned} is not an adapter folder, so a base model folder is needed")
    else:
        report = _analyse_models(Path(base), tuned, threshold)
    zero = [layer for layer in report.layers if layer.frobenius_norm == 0.0]
    for layer in zero:
        report.skipped[layer.name] = "zero update"
    report.layers = [layer for layer in report.layers if layer.frobenius_norm > 0.0]
    return report


def report_to_json(report: RankReport) -> dict:
    """A JSON-ready dict; singular values are cut to the first ``JSON_SINGULAR_VALUES`` per layer."""
    data = asdict(report)
    for layer, source in zip(data["layers"], report.layers):
        layer["num_singular_values"] = len(source.singular_values)
        layer["singular_values"] = source.singular_values[:JSON_SINGULAR_VALUES]
        layer["relative_errors"] = {str(k): v for k, v in source.relative_errors.items()}
        layer["module_type"] = source.module_type
        layer["layer_index"] = source.layer_index
    return data


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def report_to_markdown(report: RankReport) -> str:
    """A readable report: a summary per module type, then one row per layer."""
    threshold = f"{report.threshold:g}"
    lines = [
        "# Rank of the fine-tuning update",
        "",
        f"- mode: {report.mode}",
        f"- base: {report.base or '–'}",
        f"- tuned: {report.tuned}",
        f"- energy threshold: {threshold}",
        f"- layers analysed: {len(report.layers)}; skipped: {len(report.skipped)}",
        *[f"- note: {note}" for note in report.notes],
        "",
        "## Summary by module type",
        "",
        f"| module | layers | mean rank@{threshold} | max rank@{threshold} | mean stable rank |",
        "| --- | --- | --- | --- | --- |",
    ]
    groups: dict[str, list[LayerRank]] = {}
    for layer in report.layers:
        groups.setdefault(layer.module_type, []).append(layer)
    for kind, layers in sorted(groups.items()):
        mean_rank = sum(layer.energy_rank for layer in layers) / len(layers)
        mean_stable = sum(layer.stable_rank for layer in layers) / len(layers)
        lines.append(
            f"| {kind} | {len(layers)} | {mean_rank:.1f} | {max(layer.energy_rank for layer in layers)} "
            f"| {mean_stable:.2f} |"
        )
    ks = spectrum.ERROR_RANKS
    lines += [
        "",
        "## Layers",
        "",
        "Relative Frobenius error of the best rank-k approximation (Eckart–Young) in the `err@k` columns.",
        "",
        "| layer | shape | r | rank@" + threshold + " | stable rank | ‖ΔW‖_F | ‖ΔW‖/‖W‖ | "
        + " | ".join(f"err@{k}" for k in ks)
        + " |",
        "| --- " * (7 + len(ks)) + "|",
    ]
    for layer in report.layers:
        errors = " | ".join(_fmt(layer.relative_errors[k]) for k in ks)
        lines.append(
            f"| {layer.name} | {layer.shape[0]}×{layer.shape[1]} | {layer.adapter_rank or '–'} "
            f"| {layer.energy_rank} | {layer.stable_rank:.2f} | {_fmt(layer.frobenius_norm)} "
            f"| {_fmt(layer.relative_update)} | {errors} |"
        )
    if report.skipped:
        lines += ["", "## Skipped", "", "| tensor | reason |", "| --- | --- |"]
        lines += [f"| {name} | {reason} |" for name, reason in report.skipped.items()]
    return "\n".join(lines) + "\n"


def write_rank_report(report: RankReport, output_dir: str | Path) -> dict[str, Path]:
    """Write rank.json, rank.md, singular_values.png, cumulative_energy.png and rank_by_layer.png."""
    from lorakit.analysis import plots  # matplotlib only when plots are written

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": output_dir / "rank.json",
        "markdown": output_dir / "rank.md",
        "singular_values": output_dir / "singular_values.png",
        "cumulative_energy": output_dir / "cumulative_energy.png",
        "rank_by_layer": output_dir / "rank_by_layer.png",
    }
    paths["json"].write_text(json.dumps(report_to_json(report), indent=2) + "\n")
    paths["markdown"].write_text(report_to_markdown(report))
    plots.plot_singular_values(report, paths["singular_values"])
    plots.plot_cumulative_energy(report, paths["cumulative_energy"])
    plots.plot_rank_by_layer(report, paths["rank_by_layer"])
    return paths
