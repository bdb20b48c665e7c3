"""Gradient accumulation: the loss calls of one optimiser step on one accumulated batch.

open_clip's ``--accum-freq N`` (and any loop that recomputes one micro-batch's features at a time)
calls the loss N times on the whole accumulated batch, each time with one micro-batch's features
carrying gradients. Every call reads the per-sample state as it was before the step, so each
computes what one call on the whole batch would; only the last one writes the state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glofnd_losses import host


@dataclass
class AccumulationWindow:
    """The calls of one accumulated optimiser step.

    Attributes:
        calls: Calls of the step.
        made: Calls made so far.
        indices: The first call's data set indices, which every later call must repeat.
    """

    calls: int
    made: int = 0
    indices: torch.Tensor | None = None

    def check_indices(self, indices: torch.Tensor) -> None:
        """Record the first call's indices; a later call's must equal them (compared where the host reads them)."""
        if self.indices is None:
            self.indices = indices
            return
        same_shape = self.indices.shape == indices.shape
        if not same_shape or (host.reads_without_sync(indices.device) and not torch.equal(self.indices, indices)):
            raise ValueError(
                f"indices: call {self.made + 1} of an accumulation of {self.calls} got other indices than the "
                "first call: every call of an accumulated step takes the whole accumulated batch's indices"
            )

    def count_call(self) -> bool:
        """Count a call; whether it is the step's last (the one that writes the state)."""
        self.made += 1
        return self.made == self.calls
