"""Sweeps: train one model once per setting (rank × target set, DoRA, full fine-tuning) and tabulate.

One module per job:

- `parsing`: the command-line forms of ranks, target sets and ``KEY=VALUE`` options.
- `targets`: short target names (``q``, ``v``, ``down``...) mapped to each architecture's module names.
- `plan`: the settings of a sweep (`plan_settings`) and the training options of each (`setting_config`).
- `runner`: training every setting, resumably, and measuring what it cost (`run_sweep`).
- `report`: the table (markdown, JSON) and the two plots (`write_sweep_report`).
- `scoring`: a finished classification run scored on other data (`evaluate_run`).

Every public name is importable from ``lorakit.analysis.sweep`` itself.
"""

from lorakit.analysis.sweep.parsing import parse_assignments, parse_ranks, parse_target_sets
from lorakit.analysis.sweep.plan import (
    GRIDS,
    SWEEP_OWNED,
    Method,
    SweepSetting,
    plan_settings,
    setting_config,
    target_label,
)
from lorakit.analysis.sweep.report import (
    PLOT_PARAMS,
    PLOT_RANK,
    TABLE_JSON,
    TABLE_MD,
    plot_metric_vs_params,
    plot_metric_vs_rank,
    result_to_json,
    table_markdown,
    write_sweep_report,
)
from lorakit.analysis.sweep.runner import (
    RESULT_FILE,
    SweepCallback,
    SweepResult,
    SweepRow,
    label_count,
    run_sweep,
)
from lorakit.analysis.sweep.scoring import evaluate_run, load_run_model
from lorakit.analysis.sweep.targets import (
    ALL_LINEAR,
    SHORT_TARGETS,
    TargetRule,
    linear_module_names,
    resolve_targets,
)

__all__ = [
    "ALL_LINEAR",
    "GRIDS",
    "PLOT_PARAMS",
    "PLOT_RANK",
    "RESULT_FILE",
    "SHORT_TARGETS",
    "SWEEP_OWNED",
    "TABLE_JSON",
    "TABLE_MD",
    "Method",
    "SweepCallback",
    "SweepResult",
    "SweepRow",
    "SweepSetting",
    "TargetRule",
    "evaluate_run",
    "label_count",
    "linear_module_names",
    "load_run_model",
    "parse_assignments",
    "parse_ranks",
    "parse_target_sets",
    "plan_settings",
    "plot_metric_vs_params",
    "plot_metric_vs_rank",
    "resolve_targets",
    "result_to_json",
    "run_sweep",
    "setting_config",
    "table_markdown",
    "target_label",
    "write_sweep_report",
]
