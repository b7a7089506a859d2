"""Flamingo's Table 3 (ablations on Flamingo-3B, 4 shots, DEV validation subsets) and Table 10's extra row.

Numbers as printed in the paper (Alayrac et al., 2022); ``params`` in billions, ``step_time`` in seconds.
Row keys are the names of the experiment configs in ``conf/experiment/`` that reproduce each row.
"""

from __future__ import annotations

TASKS = ["coco", "okvqa", "vqav2", "msvdqa", "vatex"]

#: Fine-tuned state of the art the paper divides by for its Overall score.
PAPER_REFERENCES = {"coco": 143.3, "okvqa": 54.4, "vqav2": 80.2, "msvdqa": 47.9, "vatex": 76.3}

#: (group, setting, changed to) as the paper prints them, then the numbers.
_COLUMNS = ["group", "setting", "changed_to", "params", "step_time", *TASKS, "overall"]
_ROWS = {
    "baseline": ("–", "Flamingo-3B baseline", "–", 3.2, 1.74, 86.5, 42.1, 55.8, 36.3, 53.4, 70.7),
    "no_video": ("(i) training data", "all data", "w/o Video-Text pairs", 3.2, 1.42, 84.2, 43.0, 53.9, 34.5, 46.0, 67.3),
    "no_image_text": ("(i) training data", "all data", "w/o Image-Text pairs", 3.2, 0.95, 66.3, 39.2, 51.6, 32.0, 41.6, 60.9),
    "laion": ("(i) training data", "all data", "Image-Text pairs → LAION", 3.2, 1.74, 79.5, 41.4, 53.5, 33.9, 47.6, 66.4),
    "no_m3w": ("(i) training data", "all data", "w/o M3W", 3.2, 1.02, 54.1, 36.5, 52.7, 31.4, 23.5, 53.4),
    "round_robin": ("(ii) optimisation", "accumulation", "round robin", 3.2, 1.68, 76.1, 39.8, 52.1, 33.2, 40.8, 62.9),
    "no_tanh": ("(iii) tanh gating", "yes", "no", 3.2, 1.74, 78.4, 40.5, 52.9, 35.9, 47.5, 66.5),
    "vanilla_xattn": ("(iv) xattn architecture", "GATED XATTN-DENSE", "VANILLA XATTN", 2.4, 1.16, 80.6, 41.5, 53.4, 32.9, 50.7, 66.9),
    "grafting": ("(iv) xattn architecture", "GATED XATTN-DENSE", "GRAFTING", 3.3, 1.74, 79.2, 36.1, 50.8, 32.2, 47.8, 63.1),
    "xattn_middle": ("(v) xattn frequency", "every layer", "single in middle", 2.0, 0.87, 71.5, 38.1, 50.2, 29.1, 42.3, 59.8),
    "xattn_every4": ("(v) xattn frequency", "every layer", "every 4th", 2.3, 1.02, 82.3, 42.7, 55.1, 34.6, 50.8, 68.8),
    "xattn_every2": ("(v) xattn frequency", "every layer", "every 2nd", 2.6, 1.24, 83.7, 41.0, 55.8, 34.5, 49.7, 68.2),
    "resampler_mlp": ("(vi) resampler", "Perceiver", "MLP", 3.2, 1.85, 78.6, 42.2, 54.7, 35.2, 44.7, 66.6),
    "resampler_transformer": ("(vi) resampler", "Perceiver", "Transformer", 3.2, 1.81, 83.2, 41.7, 55.6, 31.5, 48.3, 66.7),
    "vision_clip": ("(vii) vision encoder", "NFNet-F6", "CLIP ViT-L/14", 3.1, 1.58, 76.5, 41.6, 53.4, 33.2, 44.5, 64.9),
    "vision_nfnet_f0": ("(vii) vision encoder", "NFNet-F6", "NFNet-F0", 2.9, 1.45, 73.8, 40.5, 52.8, 31.1, 42.9, 62.7),
    "lm_from_scratch": ("(viii) freezing LM", "frozen", "trained from random init", 3.2, 2.42, 74.8, 31.5, 45.6, 26.9, 50.1, 57.8),
    "lm_finetuned": ("(viii) freezing LM", "frozen", "fine-tuned pretrained", 3.2, 2.42, 81.2, 33.7, 47.4, 31.0, 53.9, 62.7),
    # Table 10 (appendix): only the Overall score is given.
    "attend_all_previous": ("(x) image-causal masking", "only the latest image", "all previous images",
                            None, None, None, None, None, None, None, 63.5),
}

PAPER_TABLE3: dict[str, dict] = {key: dict(zip(_COLUMNS, values)) for key, values in _ROWS.items()}

#: Row order as the paper prints it.
ROW_ORDER = list(_ROWS)

