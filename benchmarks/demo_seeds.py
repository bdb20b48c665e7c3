"""Mean and spread over seeds of examples/mnist_demo.py runs, as a Markdown table.

Usage: python benchmarks/demo_seeds.py outputs/bench/fashion_seed*/summary.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

Key = str | tuple[str, str]  # a summary field, or (field, sub-field)

BRANCHES = {"sogclr": "SogCLR", "fnc": "SogCLR + FNC", "glofnd": "SogCLR + GloFND"}
COLUMNS: list[tuple[str, Key, float, int]] = [
    ("FN P", "fn_precision", 1.0, 3),
    ("FN R", "fn_recall", 1.0, 3),
    ("FN F1", "fn_f1", 1.0, 3),
    ("flagged", "flagged_fraction", 1.0, 4),
    ("thr MAE", "threshold_mae", 1.0, 3),
    ("thr RMSE", "threshold_rmse", 1.0, 3),
    ("probe 100%", ("probe_accuracy", "100%"), 100.0, 2),
    ("probe 10%", ("probe_accuracy", "10%"), 100.0, 2),
    ("probe 1%", ("probe_accuracy", "1%"), 100.0, 2),
]


def value(branch: dict[str, Any], key: Key) -> float | None:
    found = branch[key[0]][key[1]] if isinstance(key, tuple) else branch[key]
    return None if found is None or math.isnan(found) else float(found)


def required(branch: dict[str, Any], key: Key) -> float:
    found = value(branch, key)
    if found is None:
        raise ValueError(f"{key} missing in the summary of {branch['title']}")
    return found


def cell(values: list[float | None], scale: float, digits: int) -> str:
    present = [scale * v for v in values if v is not None]
    if not present:
        return "-"
    if len(present) == 1:
        return f"{present[0]:.{digits}f}"
    return f"{statistics.mean(present):.{digits}f} ± {statistics.stdev(present):.{digits}f}"


def table(summaries: list[dict[str, Any]]) -> list[str]:
    header = ["branch", *(name for name, *_ in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, title in BRANCHES.items():
        cells = [
            cell([value(s["branches"][key], column) for s in summaries], scale, digits)
            for _, column, scale, digits in COLUMNS
        ]
        lines.append("| " + " | ".join([title, *cells]) + " |")
    return lines


def per_seed(summaries: list[dict[str, Any]]) -> list[str]:
    header = ["seed", "GloFND P / R / F1", "FNC P / R / F1", "thr MAE GloFND / FNC", "probe 1% SogCLR / FNC / GloFND"]
    lines = ["| " + " | ".join([*header, "runtime s"]) + " |", "|" + "---|" * (len(header) + 1)]
    for s in summaries:
        b = s["branches"]
        prf = {
            k: " / ".join(f"{b[k][m]:.3f}" for m in ("fn_precision", "fn_recall", "fn_f1")) for k in ("glofnd", "fnc")
        }
        probe = " / ".join(f"{100 * b[k]['probe_accuracy']['1%']:.1f}" for k in BRANCHES)
        lines.append(
            f"| {s['config']['seed']} | {prf['glofnd']} | {prf['fnc']} | "
            f"{b['glofnd']['threshold_mae']:.3f} / {b['fnc']['threshold_mae']:.3f} | {probe} | {s['runtime_s']:.0f} |"
        )
    return lines


PAIRED: list[tuple[str, str, str, Key, float]] = [
    ("FN P, GloFND - FNC", "glofnd", "fnc", "fn_precision", 1.0),
    ("FN R, GloFND - FNC", "glofnd", "fnc", "fn_recall", 1.0),
    ("FN F1, GloFND - FNC", "glofnd", "fnc", "fn_f1", 1.0),
    ("thr MAE, GloFND - FNC", "glofnd", "fnc", "threshold_mae", 1.0),
    ("probe 100%, GloFND - SogCLR", "glofnd", "sogclr", ("probe_accuracy", "100%"), 100.0),
    ("probe 100%, FNC - SogCLR", "fnc", "sogclr", ("probe_accuracy", "100%"), 100.0),
    ("probe 10%, GloFND - SogCLR", "glofnd", "sogclr", ("probe_accuracy", "10%"), 100.0),
    ("probe 10%, FNC - SogCLR", "fnc", "sogclr", ("probe_accuracy", "10%"), 100.0),
    ("probe 1%, GloFND - SogCLR", "glofnd", "sogclr", ("probe_accuracy", "1%"), 100.0),
    ("probe 1%, FNC - SogCLR", "fnc", "sogclr", ("probe_accuracy", "1%"), 100.0),
]


def paired(summaries: list[dict[str, Any]]) -> list[str]:
    """Per-seed differences between branches (they share the warm-up, batches and augmentations)."""
    lines = ["| paired difference | mean ± std | per seed |", "|---|---|---|"]
    for title, first, second, key, scale in PAIRED:
        diffs = [
            scale * (required(s["branches"][first], key) - required(s["branches"][second], key)) for s in summaries
        ]
        spread = f"{statistics.mean(diffs):+.3f} ± {statistics.stdev(diffs):.3f}" if len(diffs) > 1 else "-"
        lines.append(f"| {title} | {spread} | {', '.join(f'{d:+.3f}' for d in diffs)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summaries", nargs="+", type=Path, help="summary.json files of demo runs")
    args = parser.parse_args()
    summaries = [json.loads(path.read_text()) for path in args.summaries]
    print("\n".join([*table(summaries), "", *paired(summaries), "", *per_seed(summaries)]))


if __name__ == "__main__":
    main()
