"""flamingo-params: parameter counts per component of a composed model (Hydra overrides as arguments).

    flamingo-params scale=flamingo-3b                    # the 3B preset beside the paper's counts
    flamingo-params scale=flamingo-3b model/xattn=vanilla
    flamingo-params --table3                             # Table 3's Param column from the 3B preset
    flamingo-params scale=tiny model.lm.tokenizer=PATH

Every model is built on the meta device: shapes only, no memory, no weights.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch


def count_parameters(overrides: Sequence[str] = ()) -> dict[str, int]:
    """``Flamingo.parameter_counts()`` of the model composed with ``overrides``, built on meta."""
    from flamingo_lab.config import compose
    from flamingo_lab.models import build_flamingo

    cfg = compose(list(overrides))
    with torch.device("meta"):
        model = build_flamingo(cfg.model)
    return model.parameter_counts()


def _fmt(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return f"{int(n)}"


def format_counts(counts: dict[str, int], paper: dict[str, float] | None = None) -> str:
    from flamingo_lab.models.presets import COMPONENTS

    head = f"{'component':<16}{'total':>10}{'trainable':>11}" + (f"{'paper':>9}{'ours/paper':>12}" if paper else "")
    lines = [head, "-" * len(head)]
    rows = [(label, counts[f"{key}/total"], counts[f"{key}/trainable"], key) for key, label in COMPONENTS.items()]
    rows.append(("total", counts["total"], counts["trainable"], "total"))
    for label, total, trainable, key in rows:
        line = f"{label:<16}{_fmt(total):>10}{_fmt(trainable):>11}"
        if paper and key in paper:
            line += f"{_fmt(paper[key]):>9}{total / paper[key]:>11.1%} "
        lines.append(line)
    return "\n".join(lines)


def format_table3() -> str:
    from flamingo_lab.models.presets import TABLE3_PARAMS

    head = f"{'Table 3 row (Flamingo-3B)':<36}{'ours':>8}{'paper':>8}{'ours/paper':>12}"
    lines = [head, "-" * len(head)]
    for row, (overrides, paper) in TABLE3_PARAMS.items():
        total = count_parameters(["scale=flamingo-3b", *overrides])["total"]
        lines.append(f"{row:<36}{_fmt(total):>8}{_fmt(paper):>8}{total / paper:>11.1%} ")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="flamingo-params", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for flamingo-train")
    parser.add_argument("--table3", action="store_true", help="print Table 3's Param column from the 3B preset")
    args = parser.parse_args(argv)
    if args.table3:
        print(format_table3())
        return
    from flamingo_lab.models.presets import PAPER_COUNTS

    counts = count_parameters(args.overrides)
    scale = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("scale=")), "embedded")
    extra = [o for o in args.overrides if not o.startswith("scale=")]
    paper = PAPER_COUNTS.get(scale) if not extra else None  # the paper's numbers are for the preset itself
    print(format_counts(counts, paper))


if __name__ == "__main__":
    main(sys.argv[1:])
