"""What the image-text losses share: two threshold banks, their rows, open_clip's scalars and output."""

from __future__ import annotations

import math
from typing import Any

import torch

from glofnd_losses import distributed, engine, functional, host, validation
from glofnd_losses.base import CheckedIndices, GloFNDLossBase

_SCALE_EXAMPLE = "open_clip's logit_scale.exp()"


class ImageTextLossBase(GloFNDLossBase):
    """Base of the image-text losses: one threshold bank per modality. Not used directly.

    Each item has two thresholds: ``image_thresholds`` (image anchor against the batch's texts)
    and ``text_thresholds`` (text anchor against the images).
    """

    @property
    def image_thresholds(self) -> torch.Tensor:
        """Per-sample thresholds of image anchors against texts, ``(num_samples,)`` (a copy of the state's)."""
        return self._threshold_buffer("image_").detach().clone()

    def _checked_inputs(
        self, image_features: torch.Tensor, text_features: torch.Tensor, indices: torch.Tensor, logit_scale: Any
    ) -> tuple[CheckedIndices, torch.Tensor]:
        """The checked indices of a pair batch (L2-normalised features) and its ``logit_scale`` as a 0-d tensor."""
        named = [("image_features", image_features), ("text_features", text_features)]
        checked = self._validate(named, indices, unit_norm=True)
        scale = scalar_input(logit_scale, image_features.device, "logit_scale", _SCALE_EXAMPLE, positive=True)
        return checked, scale

    @property
    def text_thresholds(self) -> torch.Tensor:
        """Per-sample thresholds of text anchors against images, ``(num_samples,)`` (a copy of the state's)."""
        return self._threshold_buffer("text_").detach().clone()


def scalar_input(
    value: torch.Tensor | float, device: torch.device, name: str, example: str, positive: bool = False
) -> torch.Tensor:
    """open_clip's ``logit_scale`` or ``logit_bias`` as a 0-d float32 tensor (a float is accepted too).

    Its value is checked where the host reads it without a device sync (CPU): finite, and > 0 if
    ``positive``. Every rank holds the same value (a model parameter), so every rank raises.

    Args:
        value: The scalar, a tensor of one element or a float.
        device: Device of the features.
        name: The argument's name, for the error.
        example: What such a tensor usually is, for the error.
        positive: Whether the value must be > 0 (an inverse temperature).
    """
    scalar = torch.as_tensor(value, device=device).float()
    if scalar.numel() != 1:
        raise ValueError(
            f"{name} must be a scalar (a float, or a tensor of one element such as {example}), "
            f"got shape {tuple(scalar.shape)}"
        )
    if host.reads_without_sync(scalar.device):
        number = float(scalar.detach())
        if not math.isfinite(number) or (positive and number <= 0):
            requirement = "finite and > 0 (it is 1 / temperature)" if positive else "finite"
            raise ValueError(f"{name} must be {requirement}, got {number}")
    return scalar.reshape(())  # a (1,) scalar must not make the loss (1,)


def as_output(loss: torch.Tensor, output_dict: bool) -> torch.Tensor | dict[str, torch.Tensor]:
    """The loss, or open_clip's ``{"contrastive_loss": loss}``."""
    return {"contrastive_loss": loss} if output_dict else loss


def banks(
    images: torch.Tensor, texts: torch.Tensor, labels: torch.Tensor | None, row_weight: float
) -> tuple[engine.Bank, engine.Bank]:
    """Image rows against the global texts and text rows against the global images."""
    local_size = images.shape[0]
    if distributed.is_distributed():
        all_images, all_texts = distributed.gather_with_grad(images), distributed.gather_with_grad(texts)
    else:
        all_images, all_texts = images, texts
    excluded = functional.cross_modal_excluded(local_size, distributed.rank() * local_size, images.device)
    column_labels = None
    if labels is not None:
        validation.check_index_shape(labels, local_size, name="labels")
        labels = labels.to(images.device)
        column_labels = distributed.gather_rows(labels) if distributed.is_distributed() else labels
    return (
        engine.Bank("image_", images[None], all_texts, excluded, excluded.T, row_weight, labels, column_labels),
        engine.Bank("text_", texts[None], all_images, excluded, excluded.T, row_weight, labels, column_labels),
    )
