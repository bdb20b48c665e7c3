"""Input checks that never add a host-device sync to the training step.

Shape, dtype and length checks read host metadata only and raise at once. Value checks (indices
in range, finite embeddings) need the data:

* on CPU tensors they run eagerly and raise ``ValueError`` before anything is written;
* on an accelerator they are computed on the device as a bit mask. The step then writes no state
  (:meth:`glofnd_losses.state.PerSampleState.commit` gets ``valid=False`` on every rank), the mask
  is copied to pinned host memory without blocking, and the ``ValueError`` is raised by the next
  call of the loss (or :meth:`DeferredErrors.raise_if_any`) once the copy has landed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from glofnd_losses.host import PendingHostValue

_INDEX_BIT = 1
UNIT_NORM_TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 2e-2}
"""Largest ``| ||x|| - 1 |`` of an embedding that must be L2-normalised, by dtype (default 1e-3)."""


def _norm_offsets(tensor: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Each row's ``| ||x|| - 1 |``, and the tolerance of the tensor's dtype."""
    offsets = (torch.linalg.vector_norm(tensor.detach().float(), dim=1) - 1).abs()
    return offsets, UNIT_NORM_TOLERANCE.get(tensor.dtype, 1e-3)


def check_embeddings(named: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Embeddings must be 2-D floating tensors of one shape and device."""
    first_name, first = named[0]
    for name, tensor in named:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 2:
            raise ValueError(f"{name} must have shape (batch_size, dim), got {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {tensor.dtype}")
        if tensor.shape != first.shape:
            raise ValueError(
                f"{name} must have the same shape as {first_name} {tuple(first.shape)}, got {tuple(tensor.shape)}"
            )
        if tensor.device != first.device:
            raise ValueError(f"{name} is on {tensor.device} but {first_name} is on {first.device}")
    if first.shape[0] < 1:
        raise ValueError(f"{first_name} must hold at least one sample, got batch size 0")


def check_index_shape(indices: torch.Tensor, batch_size: int, name: str = "indices") -> None:
    """Indices must be a 1-D integer tensor with one entry per sample."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D integer torch.Tensor, got {type(indices).__name__}")
    if indices.dim() != 1 or indices.shape[0] != batch_size:
        raise ValueError(
            f"{name} must have shape ({batch_size},) (one data set index per sample), got {tuple(indices.shape)}"
        )
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer data set indices, got dtype {indices.dtype}")


def _not_unit_norm(name: str) -> str:
    return (
        f"{name} must be L2-normalised (rows of norm 1, as open_clip's models return them): its scores are "
        "compared with thresholds in [-1, 1]"
    )


def _message(bits: int, num_samples: int, names: Sequence[str]) -> str:
    problems = []
    if bits & _INDEX_BIT:
        problems.append(f"indices must lie in [0, num_samples={num_samples})")
    for position, name in enumerate(names):
        if bits & (2 << position):
            problems.append(f"{name} contains NaN or infinite values")
        if bits & (2 << (len(names) + position)):
            problems.append(_not_unit_norm(name))
    return "; ".join(problems) + " (the state was left unchanged)"


def value_error_bits(
    indices: torch.Tensor,
    num_samples: int,
    embeddings: Sequence[tuple[str, torch.Tensor]],
    unit_norm: bool = False,
) -> torch.Tensor:
    """0-d int tensor whose bits flag out-of-range indices, non-finite and (``unit_norm``) unnormalised embeddings."""
    bits = ((indices < 0) | (indices >= num_samples)).any().to(torch.int64) * _INDEX_BIT
    for position, (_, tensor) in enumerate(embeddings):
        bits = bits + (~torch.isfinite(tensor).all()).to(torch.int64) * (2 << position)
        if unit_norm:
            offsets, tolerance = _norm_offsets(tensor)
            bits = bits + (offsets > tolerance).any().to(torch.int64) * (2 << (len(embeddings) + position))
    return bits


def check_values_eagerly(
    indices: torch.Tensor,
    num_samples: int,
    embeddings: Sequence[tuple[str, torch.Tensor]],
    unit_norm: bool = False,
) -> None:
    """Raise ``ValueError`` for bad index or embedding values (CPU tensors: no device sync)."""
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_samples):
        bad = indices[(indices < 0) | (indices >= num_samples)][0]
        raise ValueError(f"indices must lie in [0, num_samples={num_samples}), got {int(bad)}")
    for name, tensor in embeddings:
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} contains NaN or infinite values (the state was left unchanged)")
        if not unit_norm:
            continue
        offsets, tolerance = _norm_offsets(tensor)
        worst = int(offsets.argmax())
        if float(offsets[worst]) > tolerance:
            norm = float(torch.linalg.vector_norm(tensor[worst].float()))
            raise ValueError(f"{_not_unit_norm(name)}, got a row of norm {norm:.4g} (the state was left unchanged)")


class DeferredErrors:
    """Carries device-side check results to the host without blocking the step."""

    def __init__(self) -> None:
        self._pending: list[tuple[PendingHostValue, str, int]] = []

    def record(self, bits: torch.Tensor, num_samples: int, names: Sequence[str]) -> None:
        """Start a non-blocking copy of ``bits`` to the host."""
        self._pending.append((PendingHostValue(bits), ",".join(names), num_samples))

    def raise_if_any(self, wait: bool = False) -> None:
        """Raise ``ValueError`` for any recorded bad batch whose result has reached the host.

        Args:
            wait: Block until every pending result is available (for the end of training).
        """
        still_pending: list[tuple[PendingHostValue, str, int]] = []
        for pending, names, num_samples in self._pending:
            bits = pending.get(wait=wait)
            if bits is None:
                still_pending.append((pending, names, num_samples))
            elif bits:
                self._pending = []
                raise ValueError(_message(bits, num_samples, names.split(",")))
        self._pending = still_pending


OPEN_CLIP_MODEL_OUTPUTS = frozenset({"image_features", "text_features", "logit_scale", "logit_bias", "image_embs",
                                     "text_embs", "logits", "labels"})  # fmt: skip
"""Names of the outputs open_clip's models return (``CLIP``, ``CustomTextCLIP``, ``CoCa``, open_clip 3.x).

open_clip's training loop calls ``loss(**model_out, output_dict=True)``; with distillation it adds
each of the teacher's outputs as ``dist_<name>``.
"""


def check_model_outputs(extra: Mapping[str, object], loss_name: str) -> None:
    """Refuse keyword arguments that are not open_clip model outputs (a misspelled argument).

    A loss that takes ``**kwargs`` to swallow the model outputs it does not use would also swallow
    ``outputdict=True`` and return a tensor where a dict was asked for.

    Args:
        extra: The keyword arguments the loss did not name.
        loss_name: The loss's class name, for the message.

    Raises:
        TypeError: As Python's for an unknown keyword: ``unexpected keyword argument 'outputdict'``.
    """
    unknown = [name for name in extra if name.removeprefix("dist_") not in OPEN_CLIP_MODEL_OUTPUTS]
    if unknown:
        known = ", ".join(sorted(OPEN_CLIP_MODEL_OUTPUTS))
        raise TypeError(
            f"{loss_name}.forward() got an unexpected keyword argument {unknown[0]!r} (besides its own arguments it "
            f"takes only the outputs of open_clip's models, ignored: {known}, and their 'dist_' forms)"
        )
