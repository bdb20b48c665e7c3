"""Reading small device results on the host without blocking the training step.

A 0-d tensor computed on an accelerator is copied to pinned host memory with ``non_blocking=True``
and a CUDA event marks when the copy has landed; the host polls the event instead of waiting.
CPU tensors are available at once (reading them is no device sync). Other accelerators copy
synchronously, which is correct but blocks.

:func:`reads_without_sync` is the one place that decides whether the input checks may read a
tensor's value on the host in the training step (CPU) or must not (accelerators).
"""

from __future__ import annotations

import torch


def compiling() -> bool:
    """Whether ``torch.compile`` is tracing the calling code (``torch.compiler.is_compiling``, torch >= 2.3)."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    if is_compiling is None:  # torch 2.1 / 2.2
        return bool(torch._dynamo.is_compiling())
    return bool(is_compiling())


def reads_without_sync(device: torch.device) -> bool:
    """Whether the host can read a tensor on ``device`` without a device synchronisation.

    True on CPU only, and not while ``torch.compile`` traces the loss (a read would break the
    graph). Only the input checks ask: where it is True they raise at once, elsewhere their result
    travels to the host without blocking (:mod:`glofnd_losses.validation`); and the gathers
    compare the ranks' batch sizes first on CPU. The loss math itself is one program on every
    device. Called through the module (``host.reads_without_sync``) so that tests can run the
    deferred checks on CPU tensors by patching it.

    Examples:
        >>> import torch
        >>> reads_without_sync(torch.device("cpu")), reads_without_sync(torch.device("meta"))
        (True, False)
    """
    return device.type == "cpu" and not compiling()


class PendingHostValue:
    """A 0-d device tensor on its way to the host.

    Args:
        value: 0-d tensor on any device.

    Examples:
        >>> import torch
        >>> pending = PendingHostValue(torch.tensor(3))
        >>> pending.ready(), pending.get()
        (True, 3)
    """

    def __init__(self, value: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if value.is_cuda:
            self._host = torch.empty((), dtype=value.dtype, pin_memory=True)
            self._host.copy_(value, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = value.detach().to("cpu")

    def __getstate__(self) -> dict[str, object]:
        """Copies and pickles carry the landed value, not the CUDA event (which cannot be pickled).

        Waits for the copy if it is still in flight: a ``deepcopy`` of a model holding the loss
        (an EMA, ``torch.save(model)``) happens outside the training step.
        """
        if self._event is not None:
            self._event.synchronize()
        return {"_host": self._host.clone(), "_event": None}

    def ready(self) -> bool:
        """Whether the value has reached the host (never blocks)."""
        return self._event is None or bool(self._event.query())

    def get(self, wait: bool = False) -> int | None:
        """The value as an int, or None if it has not landed and ``wait`` is False."""
        if not self.ready():
            if not wait:
                return None
            assert self._event is not None
            self._event.synchronize()
        return int(self._host)


class LatchedHostFlag:
    """Host-side knowledge of a device condition that, once true, stays true until :meth:`reset`.

    :meth:`check` starts a non-blocking read of the condition; :attr:`known_true` turns True once
    a read that found it true has landed. Until then the caller must act as if it were False, so
    a late read only costs speed, never correctness.

    Examples:
        >>> import torch
        >>> flag = LatchedHostFlag()
        >>> flag.known_true
        False
        >>> flag.check(torch.tensor(True))
        >>> flag.known_true
        True
    """

    def __init__(self) -> None:
        self._known_true = False
        self._pending: PendingHostValue | None = None

    @property
    def known_true(self) -> bool:
        """Whether a landed read found the condition true (never blocks)."""
        if not self._known_true and self._pending is not None:
            value = self._pending.get()
            if value is not None:
                self._known_true, self._pending = bool(value), None
        return self._known_true

    @property
    def needs_check(self) -> bool:
        """Whether a :meth:`check` would start a read (not known true, no read in flight)."""
        return not self.known_true and self._pending is None

    def check(self, condition: torch.Tensor) -> None:
        """Start reading the 0-d bool ``condition``, unless it is known true or a read is in flight."""
        if self.needs_check:
            self._pending = PendingHostValue(condition)

    def reset(self) -> None:
        """Forget what was learned (the condition may have become false, e.g. after loading state)."""
        self._known_true, self._pending = False, None
