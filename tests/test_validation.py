"""The accelerator-side (deferred) checks, exercised on CPU tensors."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from glofnd_losses import GloFNDSogCLRLoss, validation
from tests import dist_cases


def test_error_bits_name_each_problem() -> None:
    good = torch.zeros(3, 2)
    bad = torch.tensor([[float("nan"), 0.0]])
    assert int(validation.value_error_bits(torch.tensor([0, 4]), 5, [("z1", good), ("z2", good)])) == 0
    bits = validation.value_error_bits(torch.tensor([0, 5]), 5, [("z1", good), ("z2", bad)])
    deferred = validation.DeferredErrors()
    deferred.record(bits, 5, ["z1", "z2"])
    with pytest.raises(ValueError, match=r"indices must lie in \[0, num_samples=5\); z2 contains NaN") as info:
        deferred.raise_if_any()
    assert "z1" not in str(info.value)
    deferred.raise_if_any()  # reported once, then cleared


def test_clean_batches_raise_nothing() -> None:
    deferred = validation.DeferredErrors()
    deferred.record(validation.value_error_bits(torch.tensor([1]), 5, [("z1", torch.ones(1, 2))]), 5, ["z1"])
    deferred.raise_if_any(wait=True)


class InFlightEvent:
    """Stands in for a ``torch.cuda.Event`` of a copy still in flight: it cannot be pickled."""

    def __init__(self) -> None:
        self.synchronized = False

    def query(self) -> bool:
        return self.synchronized

    def synchronize(self) -> None:
        self.synchronized = True

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("cannot pickle 'Event' object")


def test_a_loss_with_reads_in_flight_can_be_copied_and_pickled() -> None:
    # After an accelerator step the loss holds device results on their way to the host (a CUDA
    # event each). deepcopy (an EMA of a model holding the loss) and torch.save(model) must work
    # and carry the landed values: here a bad batch, whose error the copy must still raise.
    loss_fn = GloFNDSogCLRLoss(num_samples=5)
    bits = validation.value_error_bits(torch.tensor([5]), 5, [("z1", torch.ones(1, 2))])
    loss_fn._deferred.record(bits, 5, ["z1"])
    pending = loss_fn._deferred._pending[0][0]
    pending._event = InFlightEvent()  # a CPU value lands at once; this one now looks in flight
    assert not pending.ready()
    copied = copy.deepcopy(loss_fn)
    restored = pickle.loads(pickle.dumps(loss_fn))
    for loss in (copied, restored):
        with pytest.raises(ValueError, match=r"indices must lie in \[0, num_samples=5\)"):
            loss.check_errors()


def test_accelerator_checks_also_run_in_eval_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    # Eval writes no state, but an index out of range would silently read another sample's
    # threshold (indices are clamped on the device): the error must still surface.
    dist_cases.take_accelerator_path(monkeypatch)
    loss_fn = GloFNDSogCLRLoss(num_samples=10).eval()
    views = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    loss_fn(views[0], views[1], torch.tensor([0, 99, 2]))  # no host read: nothing raised yet
    with pytest.raises(ValueError, match=r"indices must lie in \[0, num_samples=10\)"):
        loss_fn.check_errors()
