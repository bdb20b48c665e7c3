"""PerSampleState: scatter by index, deterministic duplicates, invalid steps write nothing."""

from __future__ import annotations

import torch

from glofnd_losses.state import Field, PerSampleState


def make_state() -> PerSampleState:
    return PerSampleState(6, {"value": Field(torch.float32, 1.0), "count": Field(torch.int32, 0)})


def test_commit_writes_rows_and_keeps_others() -> None:
    state = make_state()
    state.commit(torch.tensor([4, 1]), {"value": torch.tensor([0.25, -0.5]), "count": torch.tensor([3, 7])})
    assert state.buffer("value").tolist() == [1.0, -0.5, 1.0, 1.0, 0.25, 1.0]
    assert state.buffer("count").tolist() == [0, 7, 0, 0, 3, 0]
    assert state.buffer("count").dtype == torch.int32


def test_duplicate_indices_last_occurrence_wins() -> None:
    for _ in range(20):  # a racing scatter would not give the same answer every time
        state = make_state()
        state.commit(torch.tensor([2, 5, 2, 2, 5]), {"value": torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])})
        assert state.buffer("value")[2].item() == torch.tensor(0.4).item()
        assert state.buffer("value")[5].item() == torch.tensor(0.5).item()


def test_invalid_step_writes_nothing() -> None:
    state = make_state()
    before = {name: tensor.clone() for name, tensor in state.state_dict().items()}
    state.commit(torch.tensor([0, 3]), {"value": torch.tensor([0.0, 0.0])}, error_bits=torch.tensor(1))
    for name, tensor in state.state_dict().items():
        assert torch.equal(tensor, before[name])


def test_buffers_are_persistent_and_follow_the_module() -> None:
    state = make_state()
    assert set(state.state_dict()) == {"value", "count"}
    state.half()  # a model-wide dtype cast must not round the per-sample state
    assert state.buffer("value").dtype == torch.float32 and state.buffer("count").dtype == torch.int32
