"""The chunked engine: chunked == dense for every loss x estimator x detector, on 1 and 2 ranks.

Chunk sizes that divide the local batch and that do not; loss values, every gradient (features
and logit_scale), every state buffer and the diagnostics within float32 rounding; visit counts
identical. Plus the chunk-size rule and its argument checks.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from glofnd_losses import GloFNDClipLoss, GloFNDNTXent, GloFNDSogCLRLoss, engine
from tests import engine_cases
from tests.multiprocess import run_ranks

TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def assert_close_to_scale(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal within float32 rounding of sums whose terms reach the tensor's largest magnitude.

    A gradient entry is a sum over columns (and over ranks); chunks change the order of its
    terms, so an entry that cancels to near zero differs by the rounding of the largest terms.
    """
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(got, expected, rtol=TOLERANCE["rtol"], atol=TOLERANCE["atol"] * scale)


def assert_same_results(chunked: dict[str, Any], dense: dict[str, Any]) -> None:
    for got, expected in zip(chunked["values"], dense["values"]):
        torch.testing.assert_close(got, expected, **TOLERANCE)
    for got_grads, expected_grads in zip(chunked["grads"], dense["grads"]):
        for got, expected in zip(got_grads, expected_grads):
            assert_close_to_scale(got, expected)
    for name in ("scale_grad", "bias_grad"):
        if dense[name] is None:
            assert chunked[name] is None
        else:
            torch.testing.assert_close(chunked[name], dense[name], **TOLERANCE)
    assert chunked["state"].keys() == dense["state"].keys()
    for name, expected in dense["state"].items():
        if expected.is_floating_point():
            torch.testing.assert_close(chunked["state"][name], expected, **TOLERANCE, msg=name)
        else:
            assert torch.equal(chunked["state"][name], expected), name
    assert chunked["stats"].keys() == dense["stats"].keys()
    for name, expected in dense["stats"].items():
        torch.testing.assert_close(chunked["stats"][name], expected, **TOLERANCE, msg=name)


@pytest.mark.parametrize("chunk_size", [1, 4, 5])
@pytest.mark.parametrize("detector", list(engine_cases.DETECTORS))
@pytest.mark.parametrize("loss", engine_cases.LOSSES)
def test_chunked_equals_dense_in_one_process(loss: str, detector: str, chunk_size: int) -> None:
    dense = engine_cases.run(loss, detector, engine_cases.GLOBAL_BATCH)
    assert_same_results(engine_cases.run(loss, detector, chunk_size), dense)
    if detector != "none":
        visits_or_flags = [value for name, value in dense["stats"].items() if name.endswith("flagged_fraction")]
        assert any(value > 0 for value in visits_or_flags)  # the case exercises filtering


def test_chunked_equals_dense_on_two_ranks() -> None:
    # 6 anchors per rank: chunks of 4 (not a divisor) and 3 (a divisor), every loss and detector.
    configs = [
        (loss, detector, chunk_size)
        for loss in engine_cases.LOSSES
        for detector in engine_cases.DETECTORS
        for chunk_size in (3, 4)
    ]
    per_rank = run_ranks(engine_cases.chunked_and_dense_case, 2, configs)
    for results in per_rank:
        assert len(results) == len(configs)
        for result in results:
            assert_same_results(result["chunked"], result["dense"])
    # The state is the same on both ranks after every step.
    for first, second in zip(*per_rank):
        for name, value in first["chunked"]["state"].items():
            assert torch.equal(value, second["chunked"]["state"][name]), name


def test_chunk_size_none_keeps_a_chunk_within_the_budget() -> None:
    columns = 16384
    rows = engine.chunk_anchors(None, 1, columns, 16384)
    assert rows * columns * 4 <= engine.SCORE_CHUNK_BYTES < (rows + 1) * columns * 4
    assert engine.chunk_anchors(None, 2, columns, 16384) == rows // 2  # two rows per anchor
    assert engine.chunk_anchors(None, 2, 10**9, 8) == 1  # at least one anchor
    assert engine.chunk_anchors(64, 2, columns, 8) == 8  # at most the batch: the dense case


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True, "8"])
@pytest.mark.parametrize("make", [GloFNDSogCLRLoss, GloFNDNTXent, GloFNDClipLoss])
def test_bad_chunk_size_is_refused_by_name(make: Any, chunk_size: Any) -> None:
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        make(10, chunk_size=chunk_size)
