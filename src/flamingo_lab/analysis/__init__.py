"""Sweep results -> tidy DataFrame -> Flamingo's Table 3 (markdown, HTML) and plots."""

from .paper import PAPER_REFERENCES, PAPER_TABLE3, ROW_ORDER, TASKS
from .plots import plot_loss_curves, plot_overall
from .report import breakdown_markdown, breakdown_table, curve_frame, plot_eval_curve
from .stats import diff_ci, mean_ci
from .table import flatten_results, load_runs, load_step_times, load_wandb, table3, to_html, to_markdown

__all__ = [
    "PAPER_REFERENCES", "PAPER_TABLE3", "ROW_ORDER", "TASKS", "plot_loss_curves",
    "plot_overall", "diff_ci", "mean_ci", "flatten_results", "load_runs", "load_step_times", "load_wandb", "table3",
    "to_html", "to_markdown", "breakdown_markdown", "breakdown_table", "curve_frame", "plot_eval_curve",
]
