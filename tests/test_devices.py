"""Accelerators: no host reads in the training step, and CUDA against CPU.

The losses run one program on every device; only the input checks differ: on an accelerator they
are deferred (their result travels to the host without blocking), on CPU tensors they raise at once.

* On the ``meta`` device (always available, so in CI) tensors carry no data: any ``.item()``,
  ``bool(tensor)``, ``nonzero``, boolean-mask indexing or copy to the host raises. A training step
  that completes there reads nothing from the device. The one intended read, the non-blocking
  :class:`~glofnd_losses.host.PendingHostValue`, is replaced by a recorder (a ``meta`` tensor has
  nothing to copy). ``torch.quantile`` (which syncs on CUDA) is made to raise. What ``meta`` cannot
  see: host-to-device copies of CPU data, which the CUDA test below catches.
* On CPU with :func:`~glofnd_losses.host.reads_without_sync` patched to False (so in CI): the
  deferred checks' run, whose numbers must be the eager run's bit for bit.
* On CUDA (only where a GPU is present): the same steps under
  ``torch.cuda.set_sync_debug_mode("error")``, fp16/bf16 autocast, and thresholds, ``u`` and
  gradients against the same steps on the CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from glofnd_losses import (
    GloFNDClipLoss,
    GloFNDNTXent,
    GloFNDSigLipLoss,
    GloFNDSogCLRLoss,
    ThresholdOptimizer,
    functional,
    host,
    validation,
)
from glofnd_losses.base import GloFNDLossBase
from glofnd_losses.image_text import ImageTextLossBase
from tests import dist_cases

NUM_SAMPLES = 64
BATCH = 16
DIM = 8

PAPER_RULE = ThresholdOptimizer.paper()
NO_STOP_RULE = ThresholdOptimizer.clipped()
LOSSES: dict[str, Callable[[], GloFNDLossBase]] = {
    "sogclr": lambda: GloFNDSogCLRLoss(NUM_SAMPLES, alpha=0.1, start_epoch=1, filter_start_epoch=2),
    "sogclr_paper_rule": lambda: GloFNDSogCLRLoss(NUM_SAMPLES, alpha=0.1, threshold_optimizer=PAPER_RULE),
    "sogclr_no_stop": lambda: GloFNDSogCLRLoss(NUM_SAMPLES, alpha=0.1, threshold_optimizer=NO_STOP_RULE),
    "sogclr_fnc": lambda: GloFNDSogCLRLoss(NUM_SAMPLES, alpha=0.1, detector="fnc"),
    "sogclr_oracle": lambda: GloFNDSogCLRLoss(NUM_SAMPLES, detector="oracle"),
    "ntxent": lambda: GloFNDNTXent(NUM_SAMPLES, alpha=0.1, start_epoch=1),
    "ntxent_no_detector": lambda: GloFNDNTXent(NUM_SAMPLES, detector=None),
    "clip_minibatch": lambda: GloFNDClipLoss(NUM_SAMPLES, "minibatch", alpha=0.1, start_epoch=1),
    "clip_sogclr": lambda: GloFNDClipLoss(NUM_SAMPLES, "sogclr", alpha=0.1, start_epoch=1),
    "clip_fastclip": lambda: GloFNDClipLoss(NUM_SAMPLES, "fastclip", alpha=0.1, start_epoch=1),
    "clip_attract": lambda: GloFNDClipLoss(NUM_SAMPLES, "minibatch", alpha=0.1, start_epoch=1, treatment="attract"),
    "siglip": lambda: GloFNDSigLipLoss(NUM_SAMPLES, alpha=0.1, start_epoch=1),
    "siglip_attract": lambda: GloFNDSigLipLoss(NUM_SAMPLES, alpha=0.1, start_epoch=1, treatment="attract"),
}


def batches(device: torch.device) -> Iterator[tuple[torch.Tensor, ...]]:
    """Three epochs of four batches over the data set (indices and labels already on ``device``)."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(NUM_SAMPLES, DIM, generator=generator)
    labels = torch.arange(NUM_SAMPLES) % 4
    for _ in range(3):
        order = torch.randperm(NUM_SAMPLES, generator=generator)
        for start in range(0, NUM_SAMPLES, BATCH):
            indices = order[start : start + BATCH]
            views = [base[indices] + 0.3 * torch.randn(BATCH, DIM, generator=generator) for _ in range(2)]
            yield tuple(tensor.to(device) for tensor in (*views, indices, labels[indices]))


def forward(
    loss_fn: GloFNDLossBase,
    view_a: torch.Tensor,
    view_b: torch.Tensor,
    indices: torch.Tensor,
    labels: torch.Tensor | None,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    if isinstance(loss_fn, ImageTextLossBase):
        images, texts = F.normalize(view_a, dim=1), F.normalize(view_b, dim=1)
        bias = (torch.full_like(logit_scale, -5.0),) if isinstance(loss_fn, GloFNDSigLipLoss) else ()
        loss: torch.Tensor = loss_fn(images, texts, logit_scale, *bias, indices=indices, labels=labels)
        return loss
    return loss_fn(view_a, view_b, indices, labels)


def run(
    loss_fn: GloFNDLossBase,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    autocast: torch.dtype | None = None,
    steps_context: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
) -> dict[str, torch.Tensor]:
    """Train through three epochs (thresholds start learning and filtering), then one eval step.

    The data, the loss and ``logit_scale`` are on ``device`` before the steps start; the steps
    (``set_epoch``, forward, backward) run inside ``steps_context()``. Returns the losses, the
    gradients of the last step and the final state buffers.
    """
    loss_fn.to(device)
    logit_scale = torch.tensor(10.0, device=device, requires_grad=True)
    data = list(batches(device))
    losses, epoch = [], -1
    with steps_context():
        for step, (view_a, view_b, indices, labels) in enumerate(data):
            if step % (NUM_SAMPLES // BATCH) == 0:
                epoch += 1
                loss_fn.set_epoch(epoch)
            view_a, view_b = (view.to(dtype).requires_grad_() for view in (view_a, view_b))
            logit_scale.grad = None
            with torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext():
                loss = forward(loss_fn, view_a, view_b, indices, labels, logit_scale)
            loss.backward()
            losses.append(loss.detach())
        loss_fn.eval()
        with torch.no_grad():
            forward(loss_fn, view_a, view_b, indices, labels, logit_scale)
        loss_fn.train()
    results = {f"state.{name}": buffer for name, buffer in loss_fn.state.state_dict().items()}
    results["losses"] = torch.stack(losses)
    assert view_a.grad is not None
    results["grad_a"] = view_a.grad
    if isinstance(loss_fn, ImageTextLossBase) and logit_scale.grad is not None:
        results["grad_logit_scale"] = logit_scale.grad
    return results


class RecordedHostValue:
    """Stands in for :class:`~glofnd_losses.host.PendingHostValue` on ``meta``: never lands."""

    created: list[torch.Tensor] = []

    def __init__(self, value: torch.Tensor) -> None:
        assert value.dim() == 0, "only 0-d results may travel to the host"
        RecordedHostValue.created.append(value)

    def ready(self) -> bool:
        return False

    def get(self, wait: bool = False) -> int | None:
        assert not wait, "a training step waited for the device"
        return None


def forbidden(*args: object, **kwargs: object) -> None:
    raise AssertionError("torch.quantile synchronises with the device (and is limited to 16M elements)")


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_training_step_reads_nothing_from_the_device(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "PendingHostValue", RecordedHostValue)
    monkeypatch.setattr(validation, "PendingHostValue", RecordedHostValue)
    monkeypatch.setattr(torch, "quantile", forbidden)
    monkeypatch.setattr(torch.Tensor, "quantile", forbidden)
    RecordedHostValue.created.clear()
    loss_fn = LOSSES[name]()
    results = run(loss_fn, torch.device("meta"))
    assert all(value.device.type == "meta" for value in results.values())
    # The deferred input checks of every training step did go out (their reads never landed).
    assert len(RecordedHostValue.created) >= 3 * NUM_SAMPLES // BATCH


def test_a_host_read_in_the_step_is_caught_on_meta(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: a blocking read on the accelerator path raises on ``meta``."""
    monkeypatch.setattr(host, "PendingHostValue", RecordedHostValue)
    monkeypatch.setattr(validation, "PendingHostValue", RecordedHostValue)
    original = functional.keep_nonempty

    def keep_nonempty_with_a_host_read(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keep, kept_count = original(*args)
        float(kept_count.sum())  # what a careless logger would do inside forward
        return keep, kept_count

    monkeypatch.setattr(functional, "keep_nonempty", keep_nonempty_with_a_host_read)
    with pytest.raises(RuntimeError, match="meta"):
        run(LOSSES["sogclr"](), torch.device("meta"))


class Float64Forbidden(TorchDispatchMode):
    """Any operator that produces a float64 tensor raises (Apple's MPS has no float64)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(value, torch.Tensor) and value.dtype == torch.float64:
                raise AssertionError(f"{func} made a float64 tensor")
        return out


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_one_process_step_needs_no_float64(name: str, device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The state's cross-rank pack is float64 (exact for indices and every field); with one process
    # nothing is gathered and nothing is packed, so single-device backends without float64 work.
    monkeypatch.setattr(host, "PendingHostValue", RecordedHostValue)
    monkeypatch.setattr(validation, "PendingHostValue", RecordedHostValue)
    run(LOSSES[name](), torch.device(device), steps_context=Float64Forbidden)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_deferred_input_checks_give_the_eager_checks_results(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Accelerators check inputs on the device and raise later (no host read in the step); CPU
    # tensors are checked at once. Everything else is one program: the numbers must be equal, bit
    # for bit (same device, same kernels), and every anchor's batch quantile is taken at every
    # learning step of the default rule.
    expected = run(LOSSES[name](), torch.device("cpu"))
    deferred_checks: list[int] = []
    quantile_rows: list[int] = []
    original_bits, original_quantile = validation.value_error_bits, functional.pooled_quantile

    def recording_bits(indices: torch.Tensor, *args: Any) -> torch.Tensor:
        deferred_checks.append(len(indices))
        return original_bits(indices, *args)

    def recording_quantile(scores: torch.Tensor, *args: Any) -> torch.Tensor:
        quantile_rows.append(scores.shape[1])
        return original_quantile(scores, *args)

    dist_cases.take_accelerator_path(monkeypatch)
    monkeypatch.setattr(validation, "value_error_bits", recording_bits)
    monkeypatch.setattr(functional, "pooled_quantile", recording_quantile)
    actual = run(LOSSES[name](), torch.device("cpu"))
    assert deferred_checks, "the accelerator path checks inputs without reading them on the host"
    if quantile_rows:  # the default rule's stop: every anchor's quantile at every learning step
        assert set(quantile_rows) == {BATCH}
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@contextlib.contextmanager
def cuda_syncs_raise() -> Iterator[None]:
    """Any synchronising CUDA call (a blocking copy, ``.item()``, ``nonzero``) raises inside."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_cuda_step_does_not_synchronise(name: str) -> None:
    loss_fn = LOSSES[name]()
    run(loss_fn, torch.device("cuda"), steps_context=cuda_syncs_raise)
    loss_fn.check_errors()  # the one blocking read, outside the step: nothing was wrong


@cuda
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_cuda_matches_cpu(name: str) -> None:
    on_cpu = run(LOSSES[name](), torch.device("cpu"))
    on_cuda = run(LOSSES[name](), torch.device("cuda"))
    assert on_cpu.keys() == on_cuda.keys()
    for key, expected in on_cpu.items():
        actual = on_cuda[key].cpu()
        if not expected.dtype.is_floating_point:  # visit counts, init flags
            assert torch.equal(actual, expected), key
            continue
        # The GEMMs differ by ulps between devices, so a score lying within an ulp of a threshold
        # may count differently and move that one threshold by a step: a bound on the mean error,
        # a loose one on the largest.
        error = (actual - expected).abs()
        assert error.mean() < 1e-3 and error.max() < 0.05, (key, error.mean().item(), error.max().item())


@cuda
@pytest.mark.parametrize("autocast", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["sogclr", "ntxent", "clip_fastclip", "clip_minibatch"])
def test_cuda_autocast_keeps_state_in_float32(name: str, autocast: torch.dtype) -> None:
    loss_fn = LOSSES[name]()
    results = run(loss_fn, torch.device("cuda"), dtype=autocast, autocast=autocast)
    assert torch.isfinite(results["losses"]).all()
    assert torch.isfinite(results["grad_a"]).all()
    for name_, buffer in loss_fn.state_dict().items():
        if name_.endswith("threshold"):
            assert buffer.dtype == torch.float32
            assert torch.isfinite(buffer).all()
