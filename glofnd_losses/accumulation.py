"""Gradient accumulation: the loss calls of one optimiser step on one accumulated batch.

open_clip's ``--accum-freq N`` (and any loop that recomputes one micro-batch's features at a time)
calls the loss N times on the whole accumulated batch, each time with one micro-batch's features
carrying gradients. Every call reads the per-sample state as it was before the step, so each
computes what one call on the whole batch would; only the last one writes the state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from glofnd_losses import host
from glofnd_losses.validation import check_int_at_least


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


class AccumulatingLoss:
    """The accumulation API of the GloFND losses (a base of :class:`~glofnd_losses.base.GloFNDLossBase`).

    The loss checks each call's indices against the window (``_accumulation``) and writes the
    state only when :meth:`_count_call` says the call ends the step.
    """

    _accumulation: AccumulationWindow | None = None

    def begin_accumulation(self, num_calls: int) -> None:
        """The next ``num_calls`` calls form one optimiser step of gradient accumulation.

        As open_clip's ``--accum-freq``: every call gets the whole accumulated batch (the same
        ``indices``), with one micro-batch's features carrying gradients. Every call reads the
        state as it was before the step, so each computes what one call on the whole batch would
        (its masks, ``u`` and learned rows), and only the last call writes the state and counts
        the step: the summed feature gradients and the state equal those of one call on the whole
        batch. The window closes after the last call. Prefer :meth:`accumulation` where the calls
        are in your own loop.

        Args:
            num_calls: Calls of the optimiser step (open_clip's ``accum_freq``); 1 is a plain step.
        """
        calls = check_int_at_least("num_calls", num_calls, 1, "loss calls per optimiser step")
        if self._accumulation is not None:
            window = self._accumulation
            raise RuntimeError(
                f"begin_accumulation({calls}) during an accumulation of {window.calls} calls of which {window.made} "
                "were made: finish its calls first"
            )
        self._accumulation = AccumulationWindow(calls) if calls > 1 else None

    @contextlib.contextmanager
    def accumulation(self, num_calls: int) -> Iterator[None]:
        """Context manager around the ``num_calls`` loss calls of one accumulated optimiser step.

        See :meth:`begin_accumulation`. Leaving the block after another number of calls raises
        a ``RuntimeError``; the state is then unchanged by the step.

        Examples:
            >>> import torch
            >>> from glofnd_losses import GloFNDSogCLRLoss
            >>> loss_fn, model = GloFNDSogCLRLoss(num_samples=100), torch.nn.Linear(16, 8)
            >>> inputs = [torch.randn(8, 16) for _ in range(2)]  # two views of the accumulated batch
            >>> with torch.no_grad():
            ...     cached = [model(view) for view in inputs]
            >>> with loss_fn.accumulation(2):
            ...     for part in (slice(0, 4), slice(4, 8)):  # each micro-batch's features with gradients
            ...         z1, z2 = (torch.cat([old[: part.start], model(view[part]), old[part.stop :]])
            ...                   for old, view in zip(cached, inputs))
            ...         loss_fn(z1, z2, torch.arange(8)).backward()
            >>> loss_fn.step
            1
        """
        self.begin_accumulation(num_calls)
        window = self._accumulation
        try:
            yield
        finally:
            unfinished = window is not None and self._accumulation is window
            self._accumulation = None
        if unfinished and window is not None:
            raise RuntimeError(f"an accumulation of {window.calls} loss calls ended after {window.made}")

    def _count_call(self) -> bool:
        """Count a call of an accumulated step; whether this call ends its step (always, outside one)."""
        window = self._accumulation
        if window is None:
            return True
        last = window.count_call()
        if last:
            self._accumulation = None
        return last
