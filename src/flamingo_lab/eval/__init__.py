"""Few-shot evaluation on the DEV benchmarks (COCO, OKVQA, VQAv2, MSVDQA, VATEX) and the Overall score.

``evaluate_model(model, root, cfg)`` evaluates a Flamingo on the tasks of an embedded world or an
imported folder; ``flamingo-eval`` (flamingo_lab.evaluate) and the end of every training run call it.
"""

from .harness import DEV_TASKS, PAPER_REFERENCES, evaluate_model, format_table, oracle_score
from .metrics import cider_score, normalize_answer, overall_score, roc_auc, top1_score, vqa_accuracy, vqa_score
from .prompts import SupportSampler, build_prompt
from .tasks import Item, Task, load_tasks, read_items

__all__ = [
    "DEV_TASKS", "PAPER_REFERENCES", "Item", "SupportSampler", "Task", "build_prompt", "cider_score",
    "evaluate_model", "format_table", "load_tasks", "normalize_answer", "oracle_score", "overall_score",
    "read_items", "roc_auc", "top1_score", "vqa_accuracy", "vqa_score",
]
