"""Per-epoch mean flagged fraction, FN precision and last mean threshold from examples' metrics.csv files.

Usage: python benchmarks/flagged_by_epoch.py outputs/bench/clip_rule_*/metrics.csv
"""

from __future__ import annotations

import argparse
import csv
import statistics
from collections import defaultdict
from pathlib import Path


def summarize(path: Path, prefix: str) -> str:
    """One Markdown row: per epoch ``flagged / precision / threshold`` of the ``prefix`` bank."""
    epochs: dict[int, list[dict[str, str]]] = defaultdict(list)
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            epochs[int(row["epoch"])].append(row)
    cells = []
    for _, rows in sorted(epochs.items()):
        flagged = statistics.mean(float(row[f"{prefix}flagged_fraction"]) for row in rows)
        values = [row[f"{prefix}fn_precision"] for row in rows]
        precisions = [float(value) for value in values if value not in ("", "nan")]
        precision = statistics.mean(precisions) if precisions else float("nan")
        cells.append(f"{flagged:.3f} / {precision:.2f} / {float(rows[-1][f'{prefix}mean_threshold']):.2f}")
    return f"| {path.parent.name} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", type=Path, nargs="+", help="metrics.csv files of examples/train_*.py runs")
    parser.add_argument("--prefix", default="image_", help="threshold bank ('image_', 'text_'; '' for SogCLR)")
    args = parser.parse_args()
    for path in args.metrics:
        print(summarize(path, args.prefix))


if __name__ == "__main__":
    main()
