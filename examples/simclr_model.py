"""The SimCLR model of the image examples: a timm backbone and lightly's projection head.

Used by ``train_sogclr.py`` (accelerate) and ``lightly_simclr.py`` (Lightning); any model that maps
images to projections works with the GloFND losses. Needs ``pip install timm lightly``.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from lightly.models.modules import SimCLRProjectionHead
from torch import nn

__all__ = ["SimCLRModel", "build_simclr_model", "small_image_stem"]


class SimCLRModel(nn.Module):
    """Backbone and projection head of SimCLR.

    Args:
        backbone: Maps images to ``(b, feature_dim)`` features (a timm model with
            ``num_classes=0``).
        projection_head: Maps features to the projections the contrastive loss sees.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = SimCLRModel(nn.Flatten(), nn.Linear(4, 2))
        >>> model(torch.ones(3, 1, 2, 2)).shape
        torch.Size([3, 2])
    """

    def __init__(self, backbone: nn.Module, projection_head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = projection_head

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features (for linear probes and retrieval), ``(b, feature_dim)``."""
        features: torch.Tensor = self.backbone(images)
        return features.flatten(start_dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Projections of ``images``, ``(b, output_dim)``."""
        projections: torch.Tensor = self.projection_head(self.embed(images))
        return projections


def small_image_stem(backbone: nn.Module, in_chans: int) -> None:
    """Adapt a timm ResNet to 28-32 px images in place: 3x3 stride-1 ``conv1``, no max-pool.

    The ImageNet stem (7x7 stride-2 convolution or resnet10t's three-convolution stem, then a
    stride-2 max-pool) shrinks a 28 px image to 7 px before the first block; CIFAR-style ResNets
    keep full resolution there instead.

    Args:
        backbone: A timm ResNet (``conv1``, ``bn1`` and ``maxpool`` attributes).
        in_chans: Input channels of the new ``conv1``.

    Raises:
        ValueError: If ``backbone`` has no ResNet stem.
    """
    bn1 = getattr(backbone, "bn1", None)
    if not all(hasattr(backbone, name) for name in ("conv1", "maxpool")) or not isinstance(bn1, nn.BatchNorm2d):
        raise ValueError(
            f"small_images=True needs a timm ResNet stem (conv1, bn1, maxpool), "
            f"but {type(backbone).__name__} has none; use small_images=False"
        )
    backbone.conv1 = nn.Conv2d(in_chans, bn1.num_features, kernel_size=3, stride=1, padding=1, bias=False)
    backbone.maxpool = nn.Identity()


def build_simclr_model(
    backbone_name: str,
    *,
    in_chans: int = 3,
    small_images: bool = False,
    hidden_dim: int | None = None,
    output_dim: int = 128,
    **timm_kwargs: Any,
) -> SimCLRModel:
    """A SimCLR model: a randomly initialised timm backbone and lightly's ``SimCLRProjectionHead``.

    Args:
        backbone_name: A timm model name, created with ``pretrained=False, num_classes=0`` (no
            download), e.g. ``"resnet18"`` or ``"resnet10t"``.
        in_chans: Image channels (1 for MNIST).
        small_images: Replace the ResNet stem for 28-32 px images (see :func:`small_image_stem`).
        hidden_dim: Width of the projection head's hidden layer (default: the backbone's
            feature width).
        output_dim: Projection size.
        **timm_kwargs: Further ``timm.create_model`` arguments.

    Returns:
        The model; ``model(images)`` returns projections, ``model.embed(images)`` features.

    Raises:
        ValueError: ``small_images`` with a backbone that has no ResNet stem, or a timm model
            without an integer ``num_features``.

    Examples:
        >>> import torch
        >>> model = build_simclr_model("resnet10t", in_chans=1, small_images=True, output_dim=32)
        >>> model(torch.randn(4, 1, 28, 28)).shape
        torch.Size([4, 32])
    """
    backbone = timm.create_model(backbone_name, pretrained=False, num_classes=0, in_chans=in_chans, **timm_kwargs)
    if small_images:
        small_image_stem(backbone, in_chans)
    feature_dim = backbone.num_features
    if not isinstance(feature_dim, int):
        raise ValueError(f"timm model {backbone_name!r} reports no integer num_features, got {feature_dim!r}")
    head = SimCLRProjectionHead(input_dim=feature_dim, hidden_dim=hidden_dim or feature_dim, output_dim=output_dim)
    return SimCLRModel(backbone, head)
