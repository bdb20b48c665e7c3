"""The losses under ``torch.compile`` (inductor, on CPU): eager results, bounded compiles, checks kept.

A compiled step runs the same program as an eager one, with the input checks deferred (no host
reads inside a graph); the host-side bookkeeping (step counters, deferred input checks, the
state's collective) runs between graphs.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from glofnd_losses import GloFNDSogCLRLoss
from tests import test_devices
from tests.test_devices import BATCH, DIM, LOSSES, NUM_SAMPLES

# The phases (not learning, learning, filtering), the epoch inside the threshold rule, both
# bank layouts and CLIP's gamma schedule; each compiles in 15-35 s on two cores.
COMPILED = ["sogclr", "sogclr_paper_rule", "ntxent", "clip_minibatch", "clip_fastclip"]


@pytest.fixture(autouse=True)
def fresh_compile_caches() -> Any:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def assert_same_results(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if value.is_floating_point():
            # Fused kernels sum in another order: u (sums of exponentials up to e^10) moves in the 6th digit.
            torch.testing.assert_close(actual[key], value, rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(actual[key], value), key


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_loss_gives_the_eager_results(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Rows of at least 128 columns (CLIP: the batch; two views: twice it).
    monkeypatch.setattr(test_devices, "BATCH", 144)
    monkeypatch.setattr(test_devices, "NUM_SAMPLES", 4 * 144)
    expected = test_devices.run(LOSSES[name](), torch.device("cpu"))
    loss_fn = LOSSES[name]()
    counter = CompileCounterWithBackend("inductor")
    loss_fn.compile(backend=counter)
    actual = test_devices.run(loss_fn, torch.device("cpu"))
    assert counter.frame_count > 0, "nothing was compiled: the test would be vacuous"
    assert_same_results(actual, expected)
    assert (expected["losses"][-4:] != expected["losses"][:4]).all()  # the phases changed the loss


def run_epochs(name: str, epochs: int) -> list[int]:
    """Train a compiled loss (aot_eager: dynamo's graphs, no code generation) and count compiled frames per epoch."""
    loss_fn = LOSSES[name]()
    counter = CompileCounterWithBackend("aot_eager")
    loss_fn.compile(backend=counter)
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(NUM_SAMPLES, DIM, generator=generator)
    logit_scale = torch.tensor(10.0, requires_grad=True)
    frames = []
    for epoch in range(epochs):
        loss_fn.set_epoch(epoch)
        for indices in torch.randperm(NUM_SAMPLES, generator=generator).split(BATCH):
            noise = [0.3 * torch.randn(BATCH, DIM, generator=generator) for _ in "ab"]
            views = [(base[indices] + view_noise).requires_grad_() for view_noise in noise]
            test_devices.forward(loss_fn, *views, indices, None, logit_scale).backward()
        frames.append(counter.frame_count)
    return frames


@pytest.mark.parametrize("name", ["sogclr", "sogclr_paper_rule", "clip_fastclip"])
def test_compiled_loss_stops_compiling_once_every_phase_was_seen(name: str) -> None:
    # The step counter, the epoch (inside the paper rule's bias correction) and CLIP's gamma
    # schedule change every step or epoch; a graph that specialised on them would recompile until
    # dynamo's recompile limit (8) and then silently run eagerly: here reaching it raises.
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        frames = run_epochs(name, epochs=12)
    assert frames[-1] == frames[3], f"compiled frames per epoch: {frames}"


def run_ragged_epochs(loss_fn: Any, num_samples: int, batch: int) -> dict[str, torch.Tensor]:
    """Four epochs whose last batch is smaller (``drop_last=False``); returns losses, last gradient, state."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(num_samples, DIM, generator=generator)
    labels = torch.arange(num_samples) % 4
    logit_scale = torch.tensor(10.0, requires_grad=True)
    losses = []
    for epoch in range(4):
        loss_fn.set_epoch(epoch)
        for indices in torch.randperm(num_samples, generator=generator).split(batch):
            noise = [0.3 * torch.randn(len(indices), DIM, generator=generator) for _ in "ab"]
            views = [(base[indices] + view_noise).requires_grad_() for view_noise in noise]
            loss = test_devices.forward(loss_fn, *views, indices, labels[indices], logit_scale)
            loss.backward()
            losses.append(loss.detach())
    results = {name: value for name, value in loss_fn.state_dict().items() if torch.is_tensor(value)}
    results["losses"] = torch.stack(losses)
    assert views[0].grad is not None
    results["grad_last_batch"] = views[0].grad
    return results


@pytest.mark.parametrize("name", ["sogclr", "clip_fastclip"])
def test_compiled_loss_takes_a_smaller_last_batch(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Batches of 48, 48, 48, 16: dynamo recompiles with a symbolic batch size, which the step's
    # shape arithmetic (quantile ranks, column offsets) must survive.
    monkeypatch.setattr(test_devices, "NUM_SAMPLES", 160)
    expected = run_ragged_epochs(LOSSES[name](), 160, 48)
    loss_fn = LOSSES[name]()
    counter = CompileCounterWithBackend("aot_eager")
    loss_fn.compile(backend=counter)
    actual = run_ragged_epochs(loss_fn, 160, 48)
    assert counter.frame_count > 0
    assert actual["grad_last_batch"].shape[0] == 16
    assert_same_results(actual, expected)


def test_compiled_loss_raises_bad_input_and_keeps_the_state() -> None:
    loss_fn = GloFNDSogCLRLoss(NUM_SAMPLES, alpha=0.1)
    loss_fn.compile(backend="aot_eager")
    generator = torch.Generator().manual_seed(0)
    views = [torch.randn(BATCH, DIM, generator=generator) for _ in "ab"]
    loss_fn(*views, torch.arange(BATCH))
    before = {name: value.clone() for name, value in loss_fn.state.state_dict().items()}
    bad_indices = torch.arange(BATCH)
    bad_indices[3] = NUM_SAMPLES
    loss_fn(*views, bad_indices)  # checked inside the graph: the result reaches the host after the step
    for name, value in loss_fn.state.state_dict().items():  # the per-sample rows (the step counter moved on)
        assert torch.equal(value, before[name]), name
    with pytest.raises(ValueError, match=rf"indices must lie in \[0, num_samples={NUM_SAMPLES}\)"):
        loss_fn.check_errors()
    nan_views = [views[0].clone(), views[1]]
    nan_views[0][2, 1] = float("nan")
    loss_fn(*nan_views, torch.arange(BATCH))
    with pytest.raises(ValueError, match="z1 contains NaN"):
        loss_fn(*views, torch.arange(BATCH))  # the next call raises what the last one found
