"""The README's demo (examples/mnist_demo.py): an end-to-end smoke run and its metrics on hand-made cases."""

from __future__ import annotations

import gzip
import importlib
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from glofnd_losses import GloFNDSogCLRLoss, metrics

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def demo() -> Iterator[ModuleType]:
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield importlib.import_module("mnist_demo")
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.fixture(scope="module")
def offline_data(demo: ModuleType) -> ModuleType:
    return sys.modules["offline_data"]


# ------------------------------------------------------------------------------------------ end to end
def test_quick_run_writes_report_plots_and_summary(demo: ModuleType, tmp_path: Path) -> None:
    summary = demo.main(["--quick", "--no-progress", "--out", str(tmp_path), "--seed", "3"])

    report = Path(summary["report"])
    assert report == tmp_path / "report.md" and report.is_file()
    assert set(summary["plots"]) == {"thresholds", "fn_quality", "flagged"}
    for plot in summary["plots"].values():
        assert Path(plot).is_file() and Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert Path(plot).name in report.read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["branches"].keys() == summary["branches"].keys()

    assert set(summary) >= {"config", "data", "alpha", "branches", "warmup_epochs", "runtime_s", "report"}
    assert summary["data"]["train_items"] == 256 and summary["data"]["test_items"] == 200
    assert list(summary["branches"]) == ["sogclr", "fnc", "glofnd"]
    for result in summary["branches"].values():
        assert set(result) >= {
            "fn_precision",
            "fn_recall",
            "fn_f1",
            "flagged_fraction",
            "mean_threshold",
            "threshold_mae",
            "threshold_rmse",
            "probe_accuracy",
            "epochs",
        }
        assert set(result["probe_accuracy"]) == {"100%", "10%", "1%"}
        assert all(0.0 <= accuracy <= 1.0 for accuracy in result["probe_accuracy"].values())
        assert [record["epoch"] for record in result["epochs"]] == [1, 2]  # after one warm-up epoch

    baseline, fnc, glofnd = (summary["branches"][key] for key in ("sogclr", "fnc", "glofnd"))
    assert baseline["flagged_fraction"] == 0.0 and baseline["threshold_mae"] is None
    assert math.isnan(baseline["fn_precision"])
    for result in (fnc, glofnd):
        assert 0.0 < result["flagged_fraction"] < 0.2
        assert 0.0 <= result["fn_precision"] <= 1.0 and 0.0 <= result["fn_recall"] <= 1.0
        assert result["fn_f1"] == pytest.approx(metrics.f1_score(result["fn_precision"], result["fn_recall"]))
        assert 0.0 <= result["threshold_mae"] <= result["threshold_rmse"]
    # FNC's linear-interpolation quantile of a row's 2 * (64 - 1) = 126 distinct negatives lies
    # between ascending ranks floor(125 * (1 - alpha)) and the next: every rank above it is flagged.
    negatives = 126
    flagged_per_row = negatives - 1 - math.floor((negatives - 1) * (1 - summary["alpha"]))
    assert fnc["flagged_fraction"] == pytest.approx(flagged_per_row / negatives, rel=1e-5)


def test_same_seed_same_result(demo: ModuleType, tmp_path: Path) -> None:
    args = ["--quick", "--no-progress", "--train-samples", "96", "--batch-size", "32", "--epochs", "1"]
    first = demo.main([*args, "--out", str(tmp_path / "a")])
    second = demo.main([*args, "--out", str(tmp_path / "b")])
    assert json.dumps(first["branches"]) == json.dumps(second["branches"])


# ------------------------------------------------------------------------------------------ threshold error
def test_exact_quantile_and_threshold_error_by_hand() -> None:
    # Items e1, e1, -e1, e2 with identical views: item 0's 4 * 3 = 12 scores are four 1s (item 1),
    # four -1s (item 2) and four 0s (item 3). With alpha = 1/3, alpha * 12 = 4 is an integer, so every
    # value between the 4th and 5th largest score minimises the quantile objective: [0, 1].
    views = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    lower, upper = metrics.exact_quantile_interval([views, views], [views, views], 1 / 3)
    assert lower.tolist() == [0.0, 0.0, -1.0, 0.0]
    assert upper.tolist() == [1.0, 1.0, 0.0, 0.0]

    thresholds = torch.tensor([0.5, -0.5, 0.25, 0.1])  # errors 0 (inside), 0.5, 0.25, 0.1
    error = metrics.threshold_error(thresholds, lower, upper)
    assert error["mae"] == pytest.approx((0 + 0.5 + 0.25 + 0.1) / 4)
    assert error["rmse"] == pytest.approx(math.sqrt((0.5**2 + 0.25**2 + 0.1**2) / 4))


def test_exact_quantile_matches_numpy_sort() -> None:
    generator = torch.Generator().manual_seed(0)
    view_a, view_b = torch.randn(40, 8, generator=generator), torch.randn(40, 8, generator=generator)
    alpha = 0.05
    lower, upper = metrics.exact_quantile_interval([view_a, view_b], [view_a, view_b], alpha)

    a = torch.nn.functional.normalize(view_a, dim=1).double().numpy()
    b = torch.nn.functional.normalize(view_b, dim=1).double().numpy()
    for item in range(40):
        others = np.arange(40) != item
        scores = np.concatenate([x[item] @ y[others].T for x in (a, b) for y in (a, b)])
        descending = np.sort(scores)[::-1]
        k = math.ceil(alpha * scores.size)  # 0.05 * 156 = 7.8: not an integer, a single minimiser
        assert upper[item].item() == pytest.approx(descending[k - 1], abs=1e-6)
        assert lower[item].item() == pytest.approx(descending[k - 1], abs=1e-6)
        # The minimiser of alpha * lam + mean((s - lam)_+) is that score: check the objective.
        objective = [alpha * lam + np.maximum(scores - lam, 0).mean() for lam in descending[k - 2 : k + 1]]
        assert np.argmin(objective) == 1


def test_minibatch_thresholds_match_numpy_quantile(demo: ModuleType) -> None:
    generator = torch.Generator().manual_seed(1)
    view_a, view_b = torch.randn(50, 6, generator=generator), torch.randn(50, 6, generator=generator)
    alpha, batch_size = 0.1, 16
    thresholds, items = demo.minibatch_thresholds(
        view_a, view_b, batch_size, alpha, shuffles=2, generator=torch.Generator().manual_seed(0)
    )
    assert thresholds.shape == (2, 2 * 3 * batch_size) and items.shape == (2 * 3 * batch_size,)
    assert all(np.bincount(items.numpy(), minlength=50) <= 2)

    a = torch.nn.functional.normalize(view_a, dim=1).double().numpy()
    b = torch.nn.functional.normalize(view_b, dim=1).double().numpy()
    for start in range(0, items.numel(), batch_size):
        batch = items[start : start + batch_size].numpy()
        for position, item in enumerate(batch):
            others = batch[batch != item]
            row_a = np.concatenate([a[item] @ b[others].T, a[item] @ a[others].T])
            row_b = np.concatenate([b[item] @ a[others].T, b[item] @ b[others].T])
            expected = [np.quantile(row, 1 - alpha) for row in (row_a, row_b)]
            assert thresholds[:, start + position].double().numpy() == pytest.approx(expected, abs=1e-5)


# ------------------------------------------------------------------------------------------ precision / recall
def test_fn_precision_recall_by_hand(demo: ModuleType) -> None:
    # Items 0 and 1 (label 0) nearly coincide; item 2 (label 1) points elsewhere. Each row has
    # 2 * (3 - 1) = 4 negatives and FNC at alpha = 0.25 flags the single highest one.
    # Anchors 0 and 1: each row flags a view of the other (a true FN): precision 1; 2 of their
    # 4 true FNs flagged: recall 1/2. Anchor 2 has no true FN (recall 1) but flags one in each
    # row (precision 0). Means: P = (1 + 1 + 0) / 3, R = (1/2 + 1/2 + 1) / 3.
    z1 = torch.tensor([[1.0, 0.00], [1.0, 0.20], [-0.3, 1.0]])
    z2 = torch.tensor([[1.0, 0.05], [1.0, 0.25], [-0.2, 1.0]])
    loss_fn = GloFNDSogCLRLoss(num_samples=3, alpha=0.25, detector="fnc")
    loss_fn(z1, z2, torch.arange(3), labels=torch.tensor([0, 0, 1]))
    stats = loss_fn.last_stats
    assert stats["fn_precision"].item() == pytest.approx(2 / 3)
    assert stats["fn_recall"].item() == pytest.approx(2 / 3)
    assert stats["flagged_fraction"].item() == pytest.approx(6 / 24)

    branch = demo.Branch("fnc", "SogCLR + FNC", "fnc")
    record = demo.epoch_record(branch, 0, {key: float(stats.get(key, 0.0)) for key in demo.STAT_KEYS})
    assert record.fn_f1 == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))


def test_batch_precision_recall_pools_rows_then_averages_anchors() -> None:
    flagged = torch.zeros(2, 2, 4, dtype=torch.bool)
    truth = torch.zeros(2, 4, dtype=torch.bool)
    truth[0, [0, 1]] = True  # anchor 0: two true FNs per row
    flagged[0, 0, [0, 2]] = True  # row a: one hit, one miss
    flagged[1, 0, 1] = True  # row b: one hit
    # anchor 0 pooled: TP 2 of 3 predicted, 2 of 4 true -> P 2/3, R 1/2.
    # anchor 1: nothing predicted, nothing true -> P 1, R 1.
    precision, recall = metrics.batch_precision_recall(flagged, truth)
    assert precision.item() == pytest.approx((2 / 3 + 1) / 2)
    assert recall.item() == pytest.approx((1 / 2 + 1) / 2)


# ------------------------------------------------------------------------------------------ pieces
def test_label_subset_is_stratified(demo: ModuleType) -> None:
    labels = np.repeat(np.arange(10), 40)
    subset = demo.label_subset(labels, 0.01, np.random.default_rng(0))
    assert np.bincount(labels[subset]).tolist() == [1] * 10
    subset = demo.label_subset(labels, 0.1, np.random.default_rng(0))
    assert np.bincount(labels[subset]).tolist() == [4] * 10 and len(set(subset)) == 40


def test_random_view_shape_range_and_determinism(demo: ModuleType) -> None:
    images = torch.rand(5, 3, 28, 28)
    config = demo.AugmentConfig(flip=True)
    first = demo.random_view(images, config, torch.Generator().manual_seed(0))
    second = demo.random_view(images, config, torch.Generator().manual_seed(0))
    assert first.shape == images.shape and 0.0 <= first.min() and first.max() <= 1.0
    assert torch.equal(first, second)
    identity = demo.AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), max_rotation_deg=0.0)
    identity = demo.AugmentConfig(**{**identity.__dict__, "brightness": 0.0, "contrast": 0.0})
    assert torch.allclose(demo.random_view(images, identity, torch.Generator()), images, atol=1e-5)


def test_read_idx_round_trip(offline_data: ModuleType, tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + b"".join(size.to_bytes(4, "big") for size in images.shape)
    (tmp_path / "x-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
    assert np.array_equal(offline_data.read_idx(tmp_path / "x-idx3-ubyte.gz"), images)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        offline_data.read_idx(tmp_path / "bad")


def test_image_folder_and_fashion_mnist_errors(offline_data: ModuleType, tmp_path: Path) -> None:
    from PIL import Image

    for label, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / label).mkdir()
        for index in range(3):
            Image.new("RGB", (40, 30), colour).save(tmp_path / label / f"{index}.png")
    data = offline_data.load_data("imagefolder", data_dir=tmp_path, test_size=2, image_size=16, seed=0)
    assert data.class_names == ("cat", "dog")
    assert data.train.images.shape == (4, 3, 16, 16) and data.test.images.shape == (2, 3, 16, 16)
    gray = offline_data.load_data("imagefolder", data_dir=tmp_path, test_size=2, image_size=8, grayscale=True)
    assert gray.train.images.shape == (4, 1, 8, 8)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        offline_data.find_fashion_mnist_dir(tmp_path)
