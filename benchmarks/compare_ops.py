"""Paired timings of the elementwise operator choices the losses make on CPU.

Each line times the library's way of computing something against the obvious alternative that
gives the same values, interleaved in one process (ABBA blocks), and prints ``mine / other``
as the median and quartiles of the per-block ratios. Below 1 means the library's choice is
faster. The choices are:

* ``le swapped``: ``torch.ge(bound, scores)`` for ``scores <= bound`` (the keep-mask,
  ``functional.at_or_below_bound``) against ``scores <= bound``.
* ``count bytes``: ``functional.count_true`` against ``mask.sum(dim=-1, dtype=torch.int32)``
  (masks of fewer than 2**20 entries, as at batch 256, take that plain sum too).
* ``mask after exp 1%`` / ``15%``: the exponentials multiplied by the keep-mask
  (``functional.sogclr_rows``) against masking first, ``exp(where(keep, s, -inf) * k)``, with
  1% and about 15% of the entries masked.
* ``spread``: each row's score spread (the default threshold rule's step unit) the way
  ``functional.row_std``'s cost rule picks for these shapes, from the score rows or from the
  embeddings (``functional.row_std_from_features``), against the other way; the line says which
  way was picked. ``spread T``: the same on CLIP's text rows in one process, a transposed view
  of the ``(b, b)`` image rows.

Shapes are SogCLR's two-view rows ``(2, b, 2b)`` at the given batch sizes, random scores except
for ``spread``, whose rows are products of random unit embeddings of ``--dim`` dimensions.
Absolute times on a shared machine are noise; the ratios are the result.

Example::

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \\
        python benchmarks/compare_ops.py --batch-sizes 256 1024 --threads 2
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from collections.abc import Callable

import speed  # benchmarks/speed.py, beside this script
import torch

from glofnd_losses import functional

_SCALE = 10.0  # 1 / temperature


def _seconds(operation: Callable[[], object], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        operation()
    return time.perf_counter() - start


def paired_ratio(mine: Callable[[], object], other: Callable[[], object], blocks: int, repeats: int) -> list[float]:
    """Per-group ratios ``mine / other`` from ``blocks`` groups A B B A of ``repeats`` calls per block."""
    mine(), other()  # warm-up (allocator, kernels)
    sides = [functools.partial(_seconds, operation, repeats) for operation in (mine, other)]
    return speed.abba_group_ratios(sides, blocks)[1]


def spread_ways(
    anchors: torch.Tensor, columns: torch.Tensor, scores: torch.Tensor
) -> tuple[str, tuple[Callable[[], object], Callable[[], object]]]:
    """``row_std``'s pick of the ways to a row's spread (its name) and the pair (the pick, the other way)."""
    features = (anchors, columns)
    picked = functional.std_from_features_is_cheaper(scores, columns.shape[-1])
    torch.testing.assert_close(functional.row_std(scores), functional.row_std_from_features(*features))

    def other() -> torch.Tensor:
        return functional.row_std(scores) if picked else functional.row_std_from_features(*features)

    return ("features" if picked else "scores"), (lambda: functional.row_std(scores, features), other)


def comparisons(batch: int, dim: int) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """The library's way and the alternative for each choice, on ``(2, batch, 2 * batch)`` rows."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(2, batch, 2 * batch, generator=generator) * 2 - 1
    bound = (torch.rand(batch, generator=generator) * 0.2 + 0.6)[None, :, None]
    keep = torch.ge(bound, scores)  # about 15% of the entries masked
    top_percent = torch.ge(scores.kthvalue(math.ceil(0.99 * scores.shape[-1]), dim=-1, keepdim=True).values, scores)
    assert torch.equal(functional.at_or_below_bound(scores, bound), scores <= bound)
    assert torch.equal(functional.count_true(keep), keep.sum(dim=-1, dtype=torch.int32))

    def mask_after_exp(mask: torch.Tensor) -> tuple[Callable[[], object], Callable[[], object]]:
        def mine() -> torch.Tensor:
            return torch.mul(scores, _SCALE).exp_().mul_(mask)

        def other() -> torch.Tensor:
            return torch.where(mask, scores, float("-inf")).mul_(_SCALE).exp_()

        assert torch.equal(mine(), other())
        return mine, other

    embeddings = torch.nn.functional.normalize(torch.randn(2, batch, dim, generator=generator), dim=-1)
    columns = embeddings.flatten(0, 1)
    picked, spread = spread_ways(embeddings, columns, embeddings @ columns.T)
    images, texts = embeddings[0], embeddings[1]
    picked_text, text_spread = spread_ways(texts[None], images, (images @ texts.T).T[None])
    return {
        "le swapped": (lambda: functional.at_or_below_bound(scores, bound), lambda: scores <= bound),
        "count bytes": (lambda: functional.count_true(keep), lambda: keep.sum(dim=-1, dtype=torch.int32)),
        "mask after exp 1%": mask_after_exp(top_percent),
        "mask after exp 15%": mask_after_exp(keep),
        f"spread: {picked}": spread,
        f"spread T: {picked_text}": text_spread,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--dim", type=int, default=128, help="embedding dimension of the spread pairs")
    parser.add_argument("--blocks", type=int, default=15, help="ABBA blocks per comparison")
    parser.add_argument("--repeats", type=int, default=5, help="calls per block side")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    summary = f"mine / other, median (quartiles) of {args.blocks} blocks"
    print(f"torch {torch.__version__}, {args.threads} threads, dim {args.dim}; {summary}")
    print(f"{'batch':>6} | {'choice':<20} | ratio")
    for batch in args.batch_sizes:
        for name, (mine, other) in comparisons(batch, args.dim).items():
            ratios = paired_ratio(mine, other, args.blocks, args.repeats)
            low, _, high = statistics.quantiles(ratios, n=4)
            print(f"{batch:>6} | {name:<20} | {statistics.median(ratios):.2f} ({low:.2f}-{high:.2f})", flush=True)


if __name__ == "__main__":
    main()
