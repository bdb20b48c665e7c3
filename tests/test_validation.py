"""The accelerator-side (deferred) checks, exercised on CPU tensors."""

from __future__ import annotations

import pytest
import torch

from glofnd_losses import validation


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
