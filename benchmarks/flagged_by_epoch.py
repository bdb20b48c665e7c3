"""Per-epoch mean flagged fraction, FN precision (optionally FN recall) and last mean threshold from metrics.csv files.

Usage: python benchmarks/flagged_by_epoch.py [--recall] outputs/bench/clip_rule_*/metrics.csv
"""

from __future__ import annotations

import argparse
import csv
import statistics
from collections import defaultdict
from pathlib import Path


def mean_of_logged(rows: list[dict[str, str]], column: str) -> float:
    """Mean of a column over the rows that logged a number (empty and ``nan`` cells skipped); nan if none."""
    values = [float(row[column]) for row in rows if row[column] not in ("", "nan")]
    return statistics.mean(values) if values else float("nan")


def summarize(path: Path, prefix: str, recall: bool = False) -> str:
    """One Markdown row: per epoch ``flagged / precision [/ recall] / threshold`` of the ``prefix`` bank.

    Args:
        path: A ``metrics.csv`` of an ``examples/train_*.py`` run.
        prefix: The threshold bank's column prefix (``"image_"``, ``"text_"``, ``""``).
        recall: Also give the epoch's mean FN recall, between precision and threshold.

    Returns:
        ``| run | cell | ...`` with the run's directory name; the threshold is ``-`` where the run
        logged none (``--detector oracle``).
    """
    epochs: dict[int, list[dict[str, str]]] = defaultdict(list)
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            epochs[int(row["epoch"])].append(row)
    cells = []
    for _, rows in sorted(epochs.items()):
        flagged = statistics.mean(float(row[f"{prefix}flagged_fraction"]) for row in rows)
        fields = [f"{flagged:.3f}", f"{mean_of_logged(rows, f'{prefix}fn_precision'):.2f}"]
        if recall:
            fields.append(f"{mean_of_logged(rows, f'{prefix}fn_recall'):.2f}")
        threshold = rows[-1].get(f"{prefix}mean_threshold")  # absent for the oracle (no thresholds)
        fields.append("-" if threshold is None else f"{float(threshold):.2f}")
        cells.append(" / ".join(fields))
    return f"| {path.parent.name} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", type=Path, nargs="+", help="metrics.csv files of examples/train_*.py runs")
    parser.add_argument("--prefix", default="image_", help="threshold bank ('image_', 'text_'; '' for SogCLR)")
    parser.add_argument("--recall", action="store_true", help="cells 'flagged / precision / recall / threshold'")
    args = parser.parse_args()
    for path in args.metrics:
        print(summarize(path, args.prefix, args.recall))


if __name__ == "__main__":
    main()
