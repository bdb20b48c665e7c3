"""Behaviour shared by the losses: convergence, checkpoints, bad input, low precision."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glofnd_losses import GloFNDClipLoss, GloFNDNTXent, GloFNDSogCLRLoss, ThresholdOptimizer
from glofnd_losses.base import GloFNDLossBase
from glofnd_losses.detectors import Step

LOSSES: dict[str, Callable[..., GloFNDLossBase]] = {"sogclr": GloFNDSogCLRLoss, "ntxent": GloFNDNTXent}


def clustered_views(num_samples: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(5, dim, generator=generator)
    base = centres[torch.arange(num_samples) % 5] + 0.8 * torch.randn(num_samples, dim, generator=generator)
    view_a = F.normalize(base + 0.3 * torch.randn(num_samples, dim, generator=generator), dim=1)
    view_b = F.normalize(base + 0.3 * torch.randn(num_samples, dim, generator=generator), dim=1)
    return view_a, view_b


def brute_force_quantile(view_a: torch.Tensor, view_b: torch.Tensor, alpha: float) -> np.ndarray:
    """The k-th largest of each item's 4(N-1) scores against all other items, by full sorting."""
    a, b = view_a.double().numpy(), view_b.double().numpy()
    size = a.shape[0]
    k = int(np.ceil(alpha * 4 * (size - 1)))
    targets = np.empty(size)
    for i in range(size):
        others = np.arange(size) != i
        scores = np.concatenate([a[others] @ a[i], b[others] @ a[i], a[others] @ b[i], b[others] @ b[i]])
        targets[i] = np.sort(scores)[::-1][k - 1]
    return targets


@pytest.mark.parametrize(
    "optimizer", [ThresholdOptimizer.default(), ThresholdOptimizer(rule="sgd", lr=1.0, lr_decay="inverse_sqrt")]
)
def test_thresholds_converge_to_the_exact_data_set_quantile(optimizer: ThresholdOptimizer) -> None:
    num_samples, batch, alpha = 400, 50, 0.05
    view_a, view_b = clustered_views(num_samples, dim=16, seed=0)
    targets = torch.from_numpy(brute_force_quantile(view_a, view_b, alpha)).float()
    loss_fn = GloFNDSogCLRLoss(num_samples, alpha=alpha, threshold_optimizer=optimizer)
    generator = torch.Generator().manual_seed(1)
    flagged = []
    for epoch in range(40):
        loss_fn.set_epoch(epoch)
        for batch_indices in torch.randperm(num_samples, generator=generator).split(batch):
            loss_fn(view_a[batch_indices], view_b[batch_indices], batch_indices)
            if epoch >= 30:
                flagged.append(float(loss_fn.last_stats["flagged_fraction"]))
    error = (loss_fn.thresholds - targets).abs()
    spread = (targets.max() - targets.min()).item()
    assert error.mean() < 0.02, f"mean error {error.mean():.4f} (targets span {spread:.2f})"
    assert np.mean(flagged) == pytest.approx(alpha, abs=0.01)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_checkpoint_restore_continues_identically(name: str) -> None:
    view_a, view_b = clustered_views(60, dim=8, seed=3)
    batches = [torch.randperm(60, generator=torch.Generator().manual_seed(step))[:12] for step in range(8)]

    def run(loss_fn: GloFNDLossBase, steps: list[torch.Tensor], first_step: int = 0) -> list[torch.Tensor]:
        values = []
        for step, indices in enumerate(steps, start=first_step):
            loss_fn.set_epoch(step // 2)
            values.append(loss_fn(view_a[indices], view_b[indices], indices).detach())
        return values

    uninterrupted = LOSSES[name](60, alpha=0.1, start_epoch=1)
    expected = run(uninterrupted, batches)
    first = LOSSES[name](60, alpha=0.1, start_epoch=1)
    run(first, batches[:5])
    checkpoint = {key: value for key, value in first.state_dict().items()}
    resumed = LOSSES[name](60, alpha=0.1, start_epoch=1)
    resumed.load_state_dict(checkpoint)
    assert resumed.step == 5
    got = run(resumed, batches[5:], first_step=5)
    assert len(got) == 3
    for value, reference in zip(got, expected[5:]):
        assert torch.equal(value, reference)
    for key, value in uninterrupted.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(resumed.state_dict()[key], value), key


class EncoderWithLoss(torch.nn.Module):
    """The Lightning / accelerate pattern: the criterion is a submodule of the trained module."""

    def __init__(self, num_samples: int) -> None:
        super().__init__()
        self.projection = torch.nn.Linear(8, 8)
        self.criterion = GloFNDSogCLRLoss(num_samples, alpha=0.1)

    def train_steps(self, view_a: torch.Tensor, view_b: torch.Tensor, steps: int) -> None:
        for step in range(steps):
            indices = torch.arange(step * 10, step * 10 + 10) % view_a.shape[0]
            self.criterion(self.projection(view_a[indices]), self.projection(view_b[indices]), indices)


def test_a_model_holding_the_loss_saves_with_safetensors_and_timm_ema(tmp_path: pytest.TempPathFactory) -> None:
    # safetensors (accelerate's save_model / save_state) and timm's EMA take tensors only.
    safetensors_torch = pytest.importorskip("safetensors.torch")
    timm_utils = pytest.importorskip("timm.utils")
    view_a, view_b = clustered_views(30, dim=8, seed=5)
    model = EncoderWithLoss(30)
    model.criterion.set_epoch(2)
    model.train_steps(view_a, view_b, steps=3)
    path = str(tmp_path / "model.safetensors")  # type: ignore[operator]
    safetensors_torch.save_file(model.state_dict(), path)
    restored = EncoderWithLoss(30)
    restored.load_state_dict(safetensors_torch.load_file(path))
    assert (restored.criterion.epoch, restored.criterion.step) == (2, 3)
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    assert (restored.criterion.thresholds < 1).any(), "nothing was learned: the round trip would be vacuous"
    ema = timm_utils.ModelEmaV3(model, decay=0.5)
    model.train_steps(view_a, view_b, steps=1)
    ema.update(model)  # raised on the dict the schedule position used to be
    assert torch.equal(ema.module.criterion.threshold_visits, model.criterion.threshold_visits)


def test_a_schedule_position_of_another_shape_is_refused_by_name() -> None:
    loss_fn = GloFNDSogCLRLoss(30)
    checkpoint = loss_fn.state_dict()
    checkpoint["_extra_state"] = torch.tensor([3, 17])
    loss_fn.load_state_dict(checkpoint)
    assert (loss_fn.epoch, loss_fn.step) == (3, 17)
    checkpoint["_extra_state"] = torch.tensor([3, 17, 0])
    with pytest.raises(ValueError, match=r"extra state must be \[epoch, step\], a tensor of shape \(2,\); got \(3,\)"):
        loss_fn.load_state_dict(checkpoint)
    checkpoint["_extra_state"] = {"epoch": 3, "step": 17}  # a development build's form, never released
    with pytest.raises(ValueError, match="a tensor of shape"):
        loss_fn.load_state_dict(checkpoint)


def test_state_keeps_its_dtypes_when_a_checkpoint_is_assigned() -> None:
    # load_state_dict(assign=True) keeps the checkpoint's tensors: one stored in bf16 would leave
    # bf16 thresholds that round every later update by up to 0.004.
    view_a, view_b = clustered_views(30, dim=8, seed=6)
    trained = EncoderWithLoss(30)
    trained.train_steps(view_a, view_b, steps=3)
    stored = {
        key: value.bfloat16() if value.is_floating_point() else value for key, value in trained.state_dict().items()
    }
    restored = EncoderWithLoss(30)
    restored.load_state_dict(stored, assign=True)
    for name, field in restored.criterion.state.fields.items():
        buffer = restored.criterion.state.buffer(name)
        assert buffer.dtype == field.dtype, name
        expected = trained.criterion.state.buffer(name)
        torch.testing.assert_close(buffer, expected, rtol=1e-2, atol=1e-2, check_dtype=False)
    assert restored.projection.weight.dtype == torch.bfloat16  # the model's own tensors are assigned as given


def test_a_model_built_on_the_meta_device_starts_from_the_initial_state() -> None:
    with torch.device("meta"):
        model = EncoderWithLoss(30)
    model.to_empty(device="cpu")
    fresh = GloFNDSogCLRLoss(30, alpha=0.1)
    for name in fresh.state.fields:
        assert torch.equal(model.criterion.state.buffer(name), fresh.state.buffer(name)), name
    view_a, view_b = clustered_views(30, dim=8, seed=7)
    model.train_steps(view_a, view_b, steps=1)
    assert model.criterion.threshold_visits.sum() == 10


BAD_INPUTS = [
    (
        "index too large",
        lambda a, b, i: (a, b, torch.tensor([0, 1, 2, 50])),
        r"indices must lie in \[0, num_samples=50\), got 50",
    ),
    (
        "negative index",
        lambda a, b, i: (a, b, torch.tensor([0, -1, 2, 3])),
        r"indices must lie in \[0, num_samples=50\), got -1",
    ),
    ("views differ", lambda a, b, i: (a, b[:, :3], i), r"must have the same shape"),
    ("indices 2-D", lambda a, b, i: (a, b, i[None]), r"indices must have shape \(4,\)"),
    ("indices too short", lambda a, b, i: (a, b, i[:3]), r"indices must have shape \(4,\)"),
    ("float indices", lambda a, b, i: (a, b, i.float()), r"integer"),
    ("NaN", lambda a, b, i: (a.clone().fill_(float("nan")), b, i), r"contains NaN or infinite"),
    ("inf", lambda a, b, i: (a, b.clone().fill_(float("inf")), i), r"contains NaN or infinite"),
    ("1-D view", lambda a, b, i: (a[0], b, i), r"must have shape \(batch_size, dim\)"),
]


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize(("case", "corrupt", "message"), BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_raises_and_leaves_state_unchanged(name: str, case: str, corrupt: Callable, message: str) -> None:
    loss_fn = LOSSES[name](50, alpha=0.2)
    view_a, view_b = clustered_views(4, dim=5, seed=0)
    loss_fn(view_a, view_b, torch.arange(4))
    before = {key: value.clone() for key, value in loss_fn.state_dict().items() if isinstance(value, torch.Tensor)}
    with pytest.raises(ValueError, match=message):
        loss_fn(*corrupt(view_a, view_b, torch.arange(4) + 10))
    for key, value in before.items():
        assert torch.equal(loss_fn.state_dict()[key], value), key
    assert loss_fn.step == 1


def test_bad_constructor_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        GloFNDSogCLRLoss(0)
    with pytest.raises(ValueError, match="alpha"):
        GloFNDSogCLRLoss(10, alpha=1.5)
    with pytest.raises(ValueError, match="detector"):
        GloFNDNTXent(10, detector="topk")
    with pytest.raises(ValueError, match="filter_start_epoch"):
        GloFNDNTXent(10, start_epoch=3, filter_start_epoch=1)
    with pytest.raises(ValueError, match="labels"):
        GloFNDNTXent(10, detector="oracle")(torch.randn(4, 3), torch.randn(4, 3), torch.arange(4))
    with pytest.raises(ValueError, match=r"temperature must be >= 0.0125 \(1/80\).*got 0.011"):
        GloFNDSogCLRLoss(10, temperature=0.011)
    assert GloFNDSogCLRLoss(np.int64(10)).num_samples == 10  # any integer type


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: GloFNDSogCLRLoss(10, start_epoch=float("nan")), "start_epoch"),
        (lambda: GloFNDNTXent(10, start_epoch=1.5), "start_epoch"),
        (lambda: GloFNDSogCLRLoss(10, start_step=-1), "start_step"),
        (lambda: GloFNDNTXent(10, filter_start_epoch=float("inf")), "filter_start_epoch"),
        (lambda: GloFNDSogCLRLoss(10, temperature=float("inf")), "temperature"),
        (lambda: GloFNDClipLoss(10, "sogclr", temperature=float("inf")), "temperature"),
        (lambda: GloFNDClipLoss(10, "fastclip", gamma_decay_epochs=0), "gamma_decay_epochs"),
        (lambda: GloFNDClipLoss(10, "fastclip", gamma_decay_epochs=2.5), "gamma_decay_epochs"),
        (lambda: GloFNDSogCLRLoss(10, threshold_optimizer="adam"), "threshold_optimizer"),
    ],
)
def test_out_of_range_settings_are_refused_by_name(make: Callable[[], object], name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name} must be"):
        make()


def test_a_state_too_large_to_allocate_names_num_samples() -> None:
    # 4 * 10**14 bytes: beyond a 47-bit address space, so no allocator or overcommit setting grants it.
    with pytest.raises(RuntimeError, match=r"num_samples=100000000000000: cannot allocate .*'threshold'"):
        GloFNDSogCLRLoss(10**14)


def test_the_smallest_sogclr_temperature_stays_finite() -> None:
    # exp(s / tau) over cosines up to 1 (the anchor's own column among them): finite at tau = 1/80.
    loss_fn = GloFNDSogCLRLoss(8, temperature=1 / 80, alpha=0.1)
    base = F.normalize(torch.randn(1, 16), dim=1)
    views = [F.normalize(base + 0.05 * torch.randn(8, 16), dim=1).requires_grad_(True) for _ in range(2)]
    loss = loss_fn(*views, torch.arange(8))  # near-identical items: every score close to 1
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(view.grad).all() for view in views)
    assert torch.isfinite(loss_fn.u).all()


TwoViewCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def loss_and_call(name: str) -> tuple[GloFNDLossBase, TwoViewCall]:
    """A loss by name (``clip_<estimator>`` for CLIP) and a call taking two views and indices."""
    from glofnd_losses import GloFNDClipLoss

    if name.startswith("clip_"):
        clip = GloFNDClipLoss(10, name.removeprefix("clip_"), alpha=0.1)
        return clip, lambda a, b, indices: clip(a, b, 10.0, indices=indices)  # open_clip's float logit_scale
    loss_fn = LOSSES[name](10, alpha=0.1)
    return loss_fn, loss_fn


@pytest.mark.parametrize("name", ["sogclr", "ntxent", "clip_minibatch", "clip_sogclr", "clip_fastclip"])
def test_a_batch_of_one_item_gives_zero_like_lightly_and_open_clip(name: str) -> None:
    # A last batch of one sample (drop_last=False) has no negatives. lightly's NTXentLoss and open_clip's
    # ClipLoss give 0; so do ours, without touching the state (before, SogCLR stored u = NaN for good).
    from lightly.loss import NTXentLoss
    from open_clip.loss import ClipLoss

    loss_fn, call = loss_and_call(name)
    view_a, view_b = clustered_views(10, dim=8, seed=10)
    a, b = view_a[3:4].clone().requires_grad_(True), view_b[3:4].clone().requires_grad_(True)
    before = copy.deepcopy(loss_fn.state.state_dict())
    with pytest.warns(UserWarning, match="no negatives") as caught:
        loss = call(a, b, torch.tensor([3]))
    assert caught[0].filename == __file__  # the line that called the loss
    loss.backward()
    assert loss.item() == 0.0 and NTXentLoss()(a, b).item() == 0.0 and ClipLoss()(a, b, 10.0).item() == 0.0
    assert a.grad is not None and torch.equal(a.grad, torch.zeros_like(a))
    for key, value in loss_fn.state.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert loss_fn.last_stats[f"{loss_fn.banks[0]}flagged_fraction"] == 0.0
    assert torch.isfinite(call(view_a[:4], view_b[:4], torch.arange(4)))  # the next, ordinary batch


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_finite_losses_and_fp32_thresholds(name: str, dtype: torch.dtype) -> None:
    # The loss is computed in float32: half-precision inputs give the loss of their float32 values.
    view_a, view_b = clustered_views(16, dim=8, seed=4)
    view_a, view_b = view_a.to(dtype), view_b.to(dtype)
    results = []
    for inputs in ((view_a, view_b), (view_a.float(), view_b.float())):
        loss_fn = LOSSES[name](50, alpha=0.1)
        a = inputs[0].clone().requires_grad_(True)
        loss = loss_fn(a, inputs[1], torch.arange(16))
        loss.backward()
        assert a.grad is not None and a.grad.dtype == inputs[0].dtype
        assert loss_fn.thresholds.dtype == torch.float32
        results.append((loss.detach(), a.grad.float(), loss_fn.thresholds))
    assert torch.isfinite(results[0][0]) and torch.isfinite(results[0][1]).all()
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][2], results[1][2])
    torch.testing.assert_close(results[0][1], results[1][1].to(dtype).float())  # the gradient is cast back
    assert (results[0][2] < 1).any(), "no threshold moved: the comparison would be vacuous"


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_cpu_autocast_computes_the_loss_in_float32(name: str) -> None:
    view_a, view_b = clustered_views(16, dim=8, seed=4)
    projection = torch.nn.Linear(8, 8)
    results = []
    for autocast in (True, False):
        loss_fn = LOSSES[name](50, alpha=0.1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out_a, out_b = projection(view_a), projection(view_b)
            loss = loss_fn(out_a, out_b, torch.arange(16))
        assert (out_a.dtype == torch.bfloat16) == autocast and loss.dtype == torch.float32
        results.append((loss.detach(), loss_fn.thresholds, out_a.float().detach(), out_b.float().detach()))
    # With autocast the projections are rounded to bf16; from there the loss is float32 maths.
    reference = LOSSES[name](50, alpha=0.1)(results[0][2], results[0][3], torch.arange(16))
    assert torch.equal(results[0][0], reference.detach())
    torch.testing.assert_close(results[0][0], results[1][0], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_anchor_with_every_negative_flagged_stays_finite(name: str) -> None:
    loss_fn = LOSSES[name](8, alpha=0.5)
    loss_fn.state.buffer("threshold").fill_(-1.0)  # every negative scores above -1 ...
    loss_fn.set_epoch(0)
    view_a, view_b = clustered_views(4, dim=3, seed=5)
    loss_fn.eval()  # ... and thresholds stay there (no learning in eval mode)
    a = view_a.clone().requires_grad_(True)
    loss = loss_fn(a, view_b, torch.arange(4))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all()
    assert loss_fn.last_stats["flagged_fraction"] == 1.0
    # Such an anchor keeps all its negatives: every row does here, so this is the plain loss.
    plain = LOSSES[name](8, detector=None).eval()
    plain_a = view_a.clone().requires_grad_(True)
    plain_loss = plain(plain_a, view_b, torch.arange(4))
    plain_loss.backward()
    assert torch.equal(loss, plain_loss) and torch.equal(a.grad, plain_a.grad)


# The default's stop at the batch quantile needs the quantile at every step; without it, only the
# first visit of a sample does.
WITHOUT_STOP = ThresholdOptimizer.clipped()


def test_first_visit_quantile_stops_once_every_sample_was_visited(monkeypatch: pytest.MonkeyPatch) -> None:
    # The detector is told when every sample has been visited (on an accelerator that skips the
    # quantile of every row; on CPU only first visits compute it anyway).
    from glofnd_losses import functional
    from glofnd_losses.detectors import GloFNDDetector

    quantile_calls = []
    told_all_seeded = []
    original_quantile, original_detect = functional.pooled_quantile, GloFNDDetector.detect

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        quantile_calls.append(1)
        return original_quantile(*args, **kwargs)  # type: ignore[arg-type]

    def recording(self: GloFNDDetector, rows: object, state_rows: object, prefix: str, step: Step) -> object:
        told_all_seeded.append(step.all_seeded)
        return original_detect(self, rows, state_rows, prefix, step)  # type: ignore[arg-type]

    monkeypatch.setattr(functional, "pooled_quantile", counting)
    monkeypatch.setattr(GloFNDDetector, "detect", recording)
    view_a, view_b = clustered_views(40, dim=8, seed=5)
    loss_fn = GloFNDSogCLRLoss(40, alpha=0.1, threshold_optimizer=WITHOUT_STOP)
    fresh_state = copy.deepcopy(loss_fn.state_dict())

    def epoch(number: int) -> tuple[int, list[bool]]:
        quantile_calls.clear()
        told_all_seeded.clear()
        loss_fn.set_epoch(number)
        for indices in torch.arange(40).split(10):
            loss_fn(view_a[indices], view_b[indices], indices)
        return len(quantile_calls), list(told_all_seeded)

    assert epoch(0) == (4, [False] * 4)  # every batch seeds thresholds
    assert epoch(1) == (0, [True] * 4)  # set_epoch found every sample visited
    loss_fn.load_state_dict(fresh_state)  # a state with unvisited samples: seeding is back on
    assert epoch(2) == (4, [False] * 4)
    assert epoch(3) == (0, [True] * 4)
    # The same through the state table itself (no hook of the loss runs).
    table = {name[len("state.") :]: value for name, value in fresh_state.items() if name.startswith("state.")}
    loss_fn.state.load_state_dict(table)
    assert epoch(4) == (4, [False] * 4)


def test_skipping_the_first_visit_quantile_changes_nothing() -> None:
    view_a, view_b = clustered_views(40, dim=8, seed=6)
    skipping = GloFNDSogCLRLoss(40, alpha=0.1, threshold_optimizer=WITHOUT_STOP)
    computing = GloFNDSogCLRLoss(40, alpha=0.1, threshold_optimizer=WITHOUT_STOP)
    generator = torch.Generator().manual_seed(0)
    for number in range(3):
        skipping.set_epoch(number)
        computing.set_epoch(number)
        for indices in torch.randperm(40, generator=generator).split(10):
            computing._all_seeded.reset()  # never learns that every sample was visited
            expected = computing(view_a[indices], view_b[indices], indices)
            assert torch.equal(skipping(view_a[indices], view_b[indices], indices), expected)
    assert skipping._all_seeded.known_true and not computing._all_seeded.known_true
    for name, value in computing.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(skipping.state_dict()[name], value), name


def test_threshold_visits_count_the_steps_that_learned() -> None:
    from glofnd_losses import GloFNDClipLoss

    view_a, view_b = clustered_views(20, dim=8, seed=7)
    indices = torch.tensor([3, 5, 5, 9])  # a duplicate counts once: the last occurrence wins
    for loss_fn in (GloFNDSogCLRLoss(20, alpha=0.1), GloFNDClipLoss(20, estimator="minibatch", alpha=0.1)):
        for _ in range(2):
            if isinstance(loss_fn, GloFNDClipLoss):
                loss_fn(view_a[indices], view_b[indices], torch.tensor(10.0), indices=indices)
            else:
                loss_fn(view_a[indices], view_b[indices], indices)
        expected = torch.zeros(20, dtype=torch.int32)
        expected[[3, 5, 9]] = 2
        assert torch.equal(loss_fn.threshold_visits, expected)
    with pytest.raises(RuntimeError, match="detector 'fnc' keeps no per-sample thresholds"):
        _ = GloFNDSogCLRLoss(20, detector="fnc").threshold_visits


def test_glofnd_starts_from_a_checkpoint_without_a_detector() -> None:
    view_a, view_b = clustered_views(30, dim=8, seed=8)
    warm_up = GloFNDSogCLRLoss(30, detector=None)
    warm_up(view_a[:10], view_b[:10], torch.arange(10))
    branch = GloFNDSogCLRLoss(30, alpha=0.1)
    result = branch.load_state_dict(warm_up.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(f"state.{name}" for name in branch.state.fields if "threshold" in name)
    assert torch.equal(branch.u, warm_up.u)  # SogCLR's u carries over; thresholds start fresh
    assert torch.equal(branch.threshold_visits, torch.zeros(30, dtype=torch.int32))


def test_repr_shows_the_settings_a_run_is_configured_with() -> None:
    from glofnd_losses import GloFNDClipLoss

    assert "temperature=0.2, gamma=0.9, num_samples=50, alpha=0.05" in repr(GloFNDSogCLRLoss(50, 0.2, alpha=0.05))
    assert "temperature=0.5, gather_distributed=True" in repr(GloFNDNTXent(50, gather_distributed=True))
    clip = repr(GloFNDClipLoss(50, "sogclr", temperature=0.03, gamma=0.5))
    assert "estimator='sogclr', temperature=0.03, gamma=0.5" in clip
    assert "fields=(image_threshold, " in clip


def test_adam_moments_are_stored_only_under_an_adam_rule() -> None:
    default, paper = GloFNDSogCLRLoss(30), GloFNDSogCLRLoss(30, threshold_optimizer=ThresholdOptimizer.paper())
    assert list(default.state.fields) == ["threshold", "threshold_visits", "u", "u_initialized"]
    assert list(paper.state.fields) == [
        "threshold", "threshold_visits", "threshold_exp_avg", "threshold_exp_avg_sq", "u", "u_initialized"
    ]  # fmt: skip
    view_a, view_b = clustered_views(30, dim=8, seed=9)
    paper(view_a[:10], view_b[:10], torch.arange(10))
    assert (paper.state.buffer("threshold_exp_avg_sq")[:10] > 0).all()  # the moments learn
    assert (paper.state.buffer("threshold_exp_avg_sq")[10:] == 0).all()
    # A checkpoint of one rule does not load silently into a loss of the other.
    with pytest.raises(RuntimeError, match="threshold_exp_avg"):
        default.load_state_dict(paper.state_dict())


def test_a_loop_that_never_calls_set_epoch_is_warned_when_the_epoch_matters() -> None:
    view_a, view_b = clustered_views(20, dim=8, seed=7)

    def train(loss_fn: GloFNDSogCLRLoss | GloFNDClipLoss, epochs: int, call_set_epoch: bool) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for epoch in range(epochs):
                if call_set_epoch:
                    loss_fn.set_epoch(epoch)
                for indices in torch.arange(20).split(8):
                    if isinstance(loss_fn, GloFNDClipLoss):
                        images, texts = F.normalize(view_a[indices], dim=1), F.normalize(view_b[indices], dim=1)
                        loss_fn(images, texts, torch.tensor(10.0), indices=indices)
                    else:
                        loss_fn(view_a[indices], view_b[indices], indices)
        messages = [warning for warning in caught if "set_epoch" in str(warning.message)]
        assert all(warning.filename == __file__ for warning in messages)  # the line that called the loss
        return [str(warning.message) for warning in messages]

    forgotten = GloFNDSogCLRLoss(20, alpha=0.1, start_epoch=1)
    messages = train(forgotten, epochs=3, call_set_epoch=False)
    assert len(messages) == 1  # once, after more than num_samples samples
    assert "28 samples (num_samples=20)" in messages[0] and "start_epoch=1" in messages[0]
    assert torch.all(forgotten.thresholds == 1.0)  # what it warns about: the thresholds never learned
    clip_messages = train(GloFNDClipLoss(20, estimator="fastclip", alpha=0.1), epochs=2, call_set_epoch=False)
    assert len(clip_messages) == 1 and "gamma_decay_epochs=18" in clip_messages[0]
    # Nothing to warn about: set_epoch is called, or nothing depends on the epoch.
    assert train(GloFNDSogCLRLoss(20, alpha=0.1, start_epoch=1), epochs=3, call_set_epoch=True) == []
    assert train(GloFNDSogCLRLoss(20, alpha=0.1), epochs=3, call_set_epoch=False) == []
    assert train(GloFNDClipLoss(20, estimator="minibatch", alpha=0.1), epochs=2, call_set_epoch=False) == []


def test_flagged_fraction_metric_agrees_with_the_step_diagnostic() -> None:
    from glofnd_losses import metrics

    view_a, view_b = clustered_views(16, dim=8, seed=8)
    loss_fn = GloFNDSogCLRLoss(16, alpha=0.2)
    indices = torch.arange(16)
    for _ in range(3):
        loss_fn(view_a, view_b, indices)
    # By hand: the rows [a_i | b_i] against [A | B], negatives all but the anchor's own two columns,
    # flagged above the anchor's updated threshold.
    z = torch.cat([F.normalize(view_a, dim=1), F.normalize(view_b, dim=1)])
    scores = (z @ z.T).view(2, 16, 32)
    negatives = torch.ones(16, 32, dtype=torch.bool)
    negatives[indices, indices] = negatives[indices, indices + 16] = False
    flagged = negatives & (scores > loss_fn.thresholds[None, :, None])
    fraction = metrics.flagged_fraction(flagged, negatives)
    assert 0 < float(fraction) < 1
    torch.testing.assert_close(fraction, loss_fn.last_stats["flagged_fraction"])
    assert float(metrics.flagged_fraction(flagged.float(), negatives.float())) == float(fraction)
    # The other diagnostics by hand: kept negatives per row (a row with every negative flagged keeps
    # them all), the share filtered out, the batch's mean threshold.
    kept = (negatives & ~flagged).sum(-1)
    kept = torch.where(kept == 0, negatives.sum(-1), kept).float()
    stats = loss_fn.last_stats
    torch.testing.assert_close(stats["kept_negatives"], kept.mean())
    torch.testing.assert_close(stats["filtered_fraction"], 1 - kept.sum() / (32 * 30))
    torch.testing.assert_close(stats["mean_threshold"], loss_fn.thresholds.mean())


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("name", ["sogclr", "ntxent", "clip_minibatch", "clip_sogclr", "clip_fastclip"])
def test_a_training_mode_forward_without_gradients_learns_nothing(name: str, no_grad: Callable[[], Any]) -> None:
    # A validation loop whose loss is not a submodule of the model: model.eval() leaves the loss in training mode.
    loss_fn, call = loss_and_call(name)
    view_a, view_b = clustered_views(10, dim=8, seed=11)
    call(view_a, view_b, torch.arange(10))  # one training step: thresholds (and u) learned
    before = copy.deepcopy(loss_fn.state_dict())
    with no_grad():
        validation_loss = call(view_b, view_a, torch.arange(10))
    for key, value in loss_fn.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert loss_fn.step == 1 and loss_fn.training
    loss_fn.eval()
    assert torch.equal(validation_loss, call(view_b, view_a, torch.arange(10)))  # as in eval() mode


@pytest.mark.parametrize(("num_samples", "expected_checks"), [(40, 8), (4096, 0)])
def test_the_seeding_check_is_rarer_for_larger_data_sets(
    monkeypatch: pytest.MonkeyPatch, num_samples: int, expected_checks: int
) -> None:
    # A check reads every row: at most 16 per epoch's worth of steps keeps its cost per step flat in num_samples.
    from glofnd_losses import base
    from glofnd_losses.state import PerSampleState

    monkeypatch.setattr(base, "SEEDING_CHECK_INTERVAL", 1)
    checks = []

    def counting(self: PerSampleState, *args: Any, **kwargs: Any) -> torch.Tensor:
        checks.append(1)
        return torch.tensor(False)  # never all visited: every due check runs

    monkeypatch.setattr(PerSampleState, "all_true", counting)
    loss_fn = GloFNDSogCLRLoss(num_samples, alpha=0.1)
    view_a, view_b = clustered_views(8, dim=8, seed=1)
    for step in range(8):  # 4096 rows / (16 checks x 4 per batch): one check every 64 steps
        indices = torch.arange(4) + 4 * step
        loss_fn(view_a[:4], view_b[:4], indices)
    assert len(checks) == expected_checks
