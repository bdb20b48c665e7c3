"""Fault matrix, one process: bad checkpoints, writes through the public views, alpha=0, misspelled
keywords, second-order gradients, a process killed while saving the loss state.

Each case states what happens and checks that the per-sample state and the schedule position
(epoch, step) are what they were before the fault (docs/reliability.md lists the cases).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from glofnd_losses import GloFNDClipLoss, GloFNDNTXent, GloFNDSigLipLoss, GloFNDSogCLRLoss, ThresholdOptimizer
from glofnd_losses.base import GloFNDLossBase

NUM_SAMPLES = 24
BATCH = 8

LOSSES: dict[str, Callable[..., GloFNDLossBase]] = {
    "sogclr": lambda n, **kw: GloFNDSogCLRLoss(n, alpha=kw.pop("alpha", 0.2), **kw),
    "ntxent": lambda n, **kw: GloFNDNTXent(n, alpha=kw.pop("alpha", 0.2), **kw),
    "clip_minibatch": lambda n, **kw: GloFNDClipLoss(n, "minibatch", alpha=kw.pop("alpha", 0.2), **kw),
    "clip_fastclip": lambda n, **kw: GloFNDClipLoss(n, "fastclip", alpha=kw.pop("alpha", 0.2), **kw),
    "siglip": lambda n, **kw: GloFNDSigLipLoss(n, alpha=kw.pop("alpha", 0.2), **kw),
}
PAPER = ThresholdOptimizer.paper()


def pairs(seed: int, size: int = BATCH, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Two L2-normalised views of ``size`` items that share a component (positives score high)."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(size, dim, generator=generator)
    view_a = F.normalize(shared + 0.5 * torch.randn(size, dim, generator=generator), dim=1)
    view_b = F.normalize(shared + 0.5 * torch.randn(size, dim, generator=generator), dim=1)
    return view_a, view_b


def call(loss_fn: GloFNDLossBase, view_a: torch.Tensor, view_b: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    if isinstance(loss_fn, GloFNDSigLipLoss):
        out = loss_fn(view_a, view_b, torch.tensor(10.0), torch.tensor(-5.0), indices=indices)
    elif isinstance(loss_fn, GloFNDClipLoss):
        out = loss_fn(view_a, view_b, torch.tensor(10.0), indices=indices)
    else:
        out = loss_fn(view_a, view_b, indices)
    assert isinstance(out, torch.Tensor)
    return out


def trained(name: str, seed: int, steps: int = 3, epoch: int = 1, **kwargs: Any) -> GloFNDLossBase:
    """A loss whose state has moved away from its initial values (every field, epoch and step)."""
    loss_fn = LOSSES[name](NUM_SAMPLES, **kwargs)
    loss_fn.set_epoch(epoch)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        indices = torch.randperm(NUM_SAMPLES, generator=generator)[:BATCH]
        call(loss_fn, *pairs(seed * 100 + step), indices)
    return loss_fn


def snapshot(loss_fn: GloFNDLossBase) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in loss_fn.state_dict().items()}


def assert_unchanged(loss_fn: GloFNDLossBase, before: dict[str, torch.Tensor]) -> None:
    after = loss_fn.state_dict()
    assert sorted(after) == sorted(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


# ---------------------------------------------------------------- loading a bad state
def _corrupt(checkpoint: dict[str, torch.Tensor], field: str, row_value: float, prefix: str = "") -> str:
    """Write ``row_value`` into row 5 of ``<prefix>state.<field>`` (as float64, so any value fits); its key."""
    key = f"{prefix}state.{field}"
    values = checkpoint[key].to(torch.float64).clone()
    values[5] = row_value
    checkpoint[key] = values
    return key


BAD_VALUES = [
    # (loss, field, value, what the error says the field must hold)
    ("sogclr", "threshold", float("nan"), r"finite values in \[-1.0, 1.0\]"),
    ("sogclr", "threshold", 1.5, r"finite values in \[-1.0, 1.0\]"),
    ("sogclr", "u", float("inf"), r"finite values in \[0.0, inf\]"),
    ("sogclr", "u", -1.0, r"finite values in \[0.0, inf\]"),
    ("sogclr", "u_initialized", 2.0, r"whole numbers in \[0.0, 1.0\]"),
    ("ntxent", "threshold", float("-inf"), r"finite values in \[-1.0, 1.0\]"),
    ("ntxent", "threshold_visits", -2.0, r"whole numbers in \[0.0, 255.0\]"),  # a saturating uint8 count
    ("ntxent", "threshold_visits", 2.5, r"whole numbers in \[0.0, 255.0\]"),
    ("clip_minibatch", "text_threshold", float("nan"), r"finite values in \[-1.0, 1.0\]"),
    ("clip_minibatch", "image_threshold", -1.25, r"finite values in \[-1.0, 1.0\]"),
    ("clip_fastclip", "u_text", float("nan"), r"finite values in \[0.0, inf\]"),
    ("clip_fastclip", "u_image", float("inf"), r"finite values in \[0.0, inf\]"),
    ("clip_fastclip", "u_text", 1e39, r"finite values in \[0.0, inf\]"),  # overflows float32
]


@pytest.mark.parametrize(("name", "field", "value", "expected"), BAD_VALUES)
def test_a_state_with_a_bad_value_is_refused_by_name_and_nothing_is_loaded(
    name: str, field: str, value: float, expected: str
) -> None:
    target, source = trained(name, seed=1), trained(name, seed=2, steps=5, epoch=3)
    checkpoint = snapshot(source)
    key = _corrupt(checkpoint, field, value)
    before = snapshot(target)
    with pytest.raises(ValueError, match=rf"^{key} must hold {expected} .*at row 5"):
        target.load_state_dict(checkpoint)
    assert_unchanged(target, before)
    assert (target.epoch, target.step) == (1, 3)
    target.load_state_dict(snapshot(source))  # the same state, uncorrupted, loads: the check was not vacuous
    assert (target.epoch, target.step) == (3, 5)
    assert_unchanged(target, snapshot(source))


@pytest.mark.parametrize(("name", "field"), [("sogclr", "threshold_exp_avg"), ("ntxent", "threshold_exp_avg")])
def test_a_nan_adam_moment_is_refused(name: str, field: str) -> None:
    target, source = trained(name, seed=1, threshold_optimizer=PAPER), trained(name, seed=2, threshold_optimizer=PAPER)
    checkpoint = snapshot(source)
    key = _corrupt(checkpoint, field, float("nan"))
    before = snapshot(target)
    with pytest.raises(ValueError, match=rf"^{key} must hold finite values"):
        target.load_state_dict(checkpoint)
    assert_unchanged(target, before)


@pytest.mark.parametrize("name", list(LOSSES))
def test_a_state_of_another_num_samples_is_refused_and_nothing_is_loaded(name: str) -> None:
    target = trained(name, seed=1)
    bigger = LOSSES[name](NUM_SAMPLES + 6)
    bigger.set_epoch(4)
    call(bigger, *pairs(3), torch.arange(BATCH))
    before = snapshot(target)
    shapes = rf"must have shape \(num_samples={NUM_SAMPLES},\), got \({NUM_SAMPLES + 6},\)"
    with pytest.raises(ValueError, match=shapes):
        target.load_state_dict(bigger.state_dict())
    assert_unchanged(target, before)
    assert (target.epoch, target.step) == (1, 3)  # was overwritten with (4, 1) before the size error


@pytest.mark.parametrize(
    ("source_name", "source_kwargs", "target_name", "target_kwargs", "named"),
    [
        ("sogclr", {"threshold_optimizer": PAPER}, "sogclr", {}, "threshold_exp_avg"),  # another threshold rule
        ("ntxent", {}, "ntxent", {"threshold_optimizer": PAPER}, "threshold_exp_avg"),
        ("sogclr", {}, "ntxent", {}, "state.u"),  # another loss
        ("clip_fastclip", {}, "clip_minibatch", {}, "state.u_image"),  # another estimator
    ],
)
def test_a_state_of_another_loss_or_rule_is_refused_and_nothing_is_loaded(
    source_name: str, source_kwargs: dict[str, Any], target_name: str, target_kwargs: dict[str, Any], named: str
) -> None:
    target = trained(target_name, seed=1, **target_kwargs)
    source = trained(source_name, seed=2, steps=5, epoch=3, **source_kwargs)
    before = snapshot(target)
    with pytest.raises(RuntimeError, match=rf"Error\(s\) in loading state_dict .*{named}.*Nothing was loaded"):
        target.load_state_dict(source.state_dict())
    assert_unchanged(target, before)
    assert (target.epoch, target.step) == (1, 3)


@pytest.mark.parametrize(
    ("extra_state", "message"),
    [
        (torch.tensor([-1, 3]), r"whole numbers >= 0, got \[-1.0, 3.0\]"),
        (torch.tensor([2.5, 3.0]), r"whole numbers >= 0, got \[2.5, 3.0\]"),
        (torch.tensor([float("nan"), 3.0]), r"whole numbers >= 0"),
        (torch.tensor([2, 3, 4]), r"a tensor of shape \(2,\); got \(3,\)"),
    ],
)
def test_a_bad_schedule_position_is_refused_before_the_state_is_written(
    extra_state: torch.Tensor, message: str
) -> None:
    target, source = trained("sogclr", seed=1), trained("sogclr", seed=2, steps=5, epoch=3)
    checkpoint = snapshot(source)
    checkpoint["_extra_state"] = extra_state
    before = snapshot(target)
    with pytest.raises(ValueError, match=rf"the loss's extra state .*{message}"):
        target.load_state_dict(checkpoint)
    assert_unchanged(target, before)


class ModelWithLoss(torch.nn.Module):
    """The Lightning / accelerate pattern: the criterion is loaded as part of a model's state dict."""

    def __init__(self, loss_fn: GloFNDLossBase) -> None:
        super().__init__()
        self.projection = torch.nn.Linear(4, 4)
        self.criterion = loss_fn


@pytest.mark.parametrize("name", list(LOSSES))
def test_a_bad_state_inside_a_model_s_state_dict_leaves_the_loss_unchanged(name: str) -> None:
    target = ModelWithLoss(trained(name, seed=1))
    source = ModelWithLoss(trained(name, seed=2, steps=5, epoch=3))
    checkpoint = {key: value.clone() for key, value in source.state_dict().items()}
    last_field = list(target.criterion.state.fields)[-1]  # loaded last: everything else would be written first
    _corrupt(checkpoint, last_field, float("nan") if "visits" not in last_field else -1.0, prefix="criterion.")
    before = snapshot(target.criterion)
    with pytest.raises(ValueError, match=rf"^criterion\.state\.{last_field} must hold"):
        target.load_state_dict(checkpoint)
    assert_unchanged(target.criterion, before)


def test_strict_false_keeps_missing_fields_and_still_checks_present_ones() -> None:
    target, source = trained("sogclr", seed=1), trained("sogclr", seed=2, steps=5, epoch=3)
    partial = {key: value for key, value in snapshot(source).items() if key != "state.u"}
    result = target.load_state_dict(partial, strict=False)
    assert result.missing_keys == ["state.u"]
    u_before = target.u
    assert torch.equal(target.thresholds, source.thresholds) and (target.epoch, target.step) == (3, 5)
    partial["state.threshold"] = torch.full((NUM_SAMPLES,), float("nan"))
    before = snapshot(target)
    with pytest.raises(ValueError, match="state.threshold must hold finite values"):
        target.load_state_dict(partial, strict=False)
    assert_unchanged(target, before)
    assert torch.equal(target.u, u_before)


# ---------------------------------------------------------------- public views
VIEWS = [
    ("sogclr", "thresholds", "threshold"),
    ("sogclr", "u", "u"),
    ("sogclr", "threshold_visits", "threshold_visits"),
    ("ntxent", "thresholds", "threshold"),
    ("ntxent", "threshold_visits", "threshold_visits"),
    ("clip_minibatch", "image_thresholds", "image_threshold"),
    ("clip_minibatch", "text_thresholds", "text_threshold"),
    ("clip_fastclip", "threshold_visits", "image_threshold_visits"),
]


@pytest.mark.parametrize(("name", "view", "field"), VIEWS)
def test_writing_to_a_public_view_leaves_the_state_unchanged(name: str, view: str, field: str) -> None:
    loss_fn = trained(name, seed=1)
    before = snapshot(loss_fn)
    values = getattr(loss_fn, view)
    assert torch.equal(values, loss_fn.state.buffer(field))  # it shows the state
    values.fill_(0)  # torch.Tensor.detach() alone would write this into the state
    values[3] = 1
    assert_unchanged(loss_fn, before)


# ---------------------------------------------------------------- alpha = 0
RULES = {"default": None, "paper": PAPER, "clipped": ThresholdOptimizer.clipped()}


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("name", ["sogclr", "ntxent", "clip_minibatch"])
def test_alpha_zero_flags_nothing_and_fewer_than_a_small_alpha(name: str, rule: str) -> None:
    flagged = {}
    for alpha in (0.0, 1e-3):
        loss_fn = LOSSES[name](64, alpha=alpha, threshold_optimizer=RULES[rule])
        loss_fn.set_epoch(0)
        generator = torch.Generator().manual_seed(0)
        flagged[alpha] = []
        for step in range(10):
            indices = torch.randperm(64, generator=generator)[:32]
            call(loss_fn, *pairs(step, size=32), indices)
            flagged[alpha].append(sum(float(loss_fn.last_stats[f"{bank}flagged_fraction"]) for bank in loss_fn.banks))
    assert flagged[0.0] == [0.0] * 10
    assert sum(flagged[1e-3]) > 0  # the comparison is not vacuous: a small alpha does flag


@pytest.mark.parametrize("name", ["sogclr", "ntxent", "clip_minibatch"])
def test_alpha_zero_with_fnc_flags_nothing(name: str) -> None:
    loss_fn = LOSSES[name](64, alpha=0.0, detector="fnc")
    call(loss_fn, *pairs(0, size=32), torch.arange(32))
    assert all(float(loss_fn.last_stats[f"{bank}flagged_fraction"]) == 0.0 for bank in loss_fn.banks)


# ---------------------------------------------------------------- misspelled keywords
def test_a_misspelled_keyword_of_the_clip_loss_is_a_type_error() -> None:
    loss_fn = GloFNDClipLoss(NUM_SAMPLES, "minibatch")
    images, texts = pairs(0)
    before = snapshot(loss_fn)
    with pytest.raises(TypeError, match="unexpected keyword argument 'outputdict'"):
        loss_fn(images, texts, torch.tensor(10.0), outputdict=True, indices=torch.arange(BATCH))
    assert_unchanged(loss_fn, before)


def test_the_clip_loss_takes_open_clip_s_other_model_outputs() -> None:
    # CoCa returns image_embs / logits; distillation adds the teacher's outputs as dist_<name>.
    images, texts = pairs(0)
    plain, extra = GloFNDClipLoss(NUM_SAMPLES, "minibatch"), GloFNDClipLoss(NUM_SAMPLES, "minibatch")
    expected = plain(images, texts, torch.tensor(10.0), output_dict=True, indices=torch.arange(BATCH))
    model_out = {"image_embs": images, "text_embs": texts, "logits": torch.zeros(BATCH, 3)}
    model_out["dist_image_features"] = images
    got = extra(image_features=images, text_features=texts, logit_scale=torch.tensor(10.0), **model_out,
                output_dict=True, indices=torch.arange(BATCH))  # fmt: skip
    assert isinstance(got, dict) and isinstance(expected, dict)
    assert torch.equal(got["contrastive_loss"], expected["contrastive_loss"])


# ---------------------------------------------------------------- backward twice, second order
def _reference(name: str, view_a: torch.Tensor, view_b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """The independent loss a filter-free GloFND loss equals (lightly, open_clip), or None."""
    if name == "ntxent":
        from lightly.loss import NTXentLoss

        return NTXentLoss(temperature=0.5)(view_a, view_b)
    if name == "clip_minibatch":
        from open_clip.loss import ClipLoss

        return ClipLoss()(view_a, view_b, scale)
    if name == "siglip":
        from open_clip.loss import SigLipLoss

        return SigLipLoss()(view_a, view_b, scale, None)
    return None


@pytest.mark.parametrize("name", list(LOSSES))
def test_a_second_backward_with_retain_graph_accumulates_the_same_gradient(name: str) -> None:
    view_a, view_b = (view.requires_grad_() for view in pairs(4))
    scale = torch.tensor(10.0, requires_grad=True)
    loss_fn = LOSSES[name](NUM_SAMPLES, detector=None)
    loss = loss_fn(view_a, view_b, scale, indices=torch.arange(BATCH)) if "clip" in name or name == "siglip" else call(
        loss_fn, view_a, view_b, torch.arange(BATCH))  # fmt: skip
    loss.backward(retain_graph=True)
    assert view_a.grad is not None and view_b.grad is not None
    first = view_a.grad.clone(), view_b.grad.clone()
    loss.backward(retain_graph=True)
    torch.testing.assert_close(view_a.grad, 2 * first[0], rtol=0, atol=0)
    torch.testing.assert_close(view_b.grad, 2 * first[1], rtol=0, atol=0)
    reference_a, reference_b = (view.detach().double().requires_grad_() for view in (view_a, view_b))
    reference = _reference(name, reference_a, reference_b, scale.detach().double())
    if reference is not None:  # the gradient itself is the independent loss's
        reference.backward()
        torch.testing.assert_close(first[0].double(), reference_a.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(LOSSES))
def test_second_order_gradients_are_refused_with_a_clear_error(name: str) -> None:
    # Before: NT-Xent's gradient penalty came out 35% off lightly's, CLIP's gradient had no graph.
    weights = torch.nn.Linear(8, 8).double()
    view_a, view_b = (view.double() for view in pairs(5))
    loss_fn = LOSSES[name](NUM_SAMPLES)
    before = snapshot(loss_fn)
    loss_fn.eval()  # the penalty's forward learns nothing, so the state is comparable
    projected = F.normalize(weights(view_a), dim=1), F.normalize(weights(view_b), dim=1)
    loss = call(loss_fn, *projected, torch.arange(BATCH))
    with pytest.raises(RuntimeError, match=r"do not support second-order gradients .*create_graph=True"):
        torch.autograd.grad(loss, list(weights.parameters()), create_graph=True)
    assert_unchanged(loss_fn, before)
    first_order = torch.autograd.grad(call(loss_fn, *projected, torch.arange(BATCH)), weights.weight)[0]
    assert torch.isfinite(first_order).all()  # the first-order gradient still works


# ---------------------------------------------------------------- a process killed while saving
SAVER = textwrap.dedent(
    """
    import sys, torch
    from glofnd_losses import GloFNDClipLoss
    from glofnd_losses.integrations.open_clip.checkpoint_files import save_loss_state
    loss = GloFNDClipLoss(int(sys.argv[2]), "minibatch")
    for step in range(1, 10**6):
        loss.step = step
        loss.state.buffer("image_threshold").fill_(1.0 / step)  # the file's content says which save it is
        save_loss_state(loss, sys.argv[1], checkpoint_epoch=step)
        print(step, flush=True)
    """
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_process_killed_while_saving_leaves_the_previous_complete_state(tmp_path: Path, seed: int) -> None:
    pytest.importorskip("open_clip_train")
    from glofnd_losses.integrations.open_clip.checkpoint_files import load_loss_state, save_loss_state

    num_samples, path = 2_000_000, str(tmp_path / "epoch_latest.glofnd.pth")  # ~16 MB per save
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *sys.path])}
    saver = subprocess.Popen([sys.executable, "-c", SAVER, path, str(num_samples)], stdout=subprocess.PIPE, env=env)
    assert saver.stdout is not None
    first = saver.stdout.readline()  # the first save is complete
    assert first.strip() == b"1", first
    time.sleep(random.Random(seed).uniform(0.0, 0.5))
    saver.send_signal(signal.SIGKILL)
    saver.wait()
    loss = GloFNDClipLoss(num_samples, "minibatch")
    checkpoint_epoch = load_loss_state(loss, path)
    assert checkpoint_epoch == loss.step and loss.step >= 1
    assert torch.equal(loss.image_thresholds, torch.full((num_samples,), 1.0 / loss.step))
    # A temporary file left by the killed process breaks neither the next save nor the resume.
    loss.step = 10**6
    Path(f"{path}.{os.getpid()}.tmp").write_bytes(b"the start of a state")  # as a crash of this pid would leave
    save_loss_state(loss, path, checkpoint_epoch=7)
    resumed = GloFNDClipLoss(num_samples, "minibatch")
    assert load_loss_state(resumed, path) == 7 and resumed.step == 10**6
    assert not os.path.exists(f"{path}.{os.getpid()}.tmp")


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0.0, -2.0])
@pytest.mark.parametrize("name", ["clip_minibatch", "clip_fastclip"])
def test_a_logit_scale_that_is_not_finite_and_positive_is_refused_by_name(name: str, scale: float) -> None:
    loss_fn = trained(name, seed=7)
    before = snapshot(loss_fn)
    with pytest.raises(ValueError, match="logit_scale must be finite and > 0"):
        loss_fn(*pairs(8), torch.tensor(scale), indices=torch.arange(BATCH))
    assert_unchanged(loss_fn, before)
