"""SigLIP's pairwise sigmoid loss with GloFND: a drop-in for open_clip's SigLipLoss."""

from __future__ import annotations

import functools

import torch
from torch import nn

from glofnd_losses import distributed, image_text
from glofnd_losses.base import autocast_disabled, check_int_at_least
from glofnd_losses.engine import RowInputs
from glofnd_losses.functional import RowTerms, sigmoid_rows
from glofnd_losses.image_text import ImageTextLossBase
from glofnd_losses.thresholds import ThresholdOptimizer

_BIAS = "open_clip's logit_bias"
SCORE_TOLERANCE = 2.0**-16
"""How far above a text's threshold an image row's score of the pair may lie and still count as kept
by the text. The text rows compare their own product's scores; the image rows' product gives the
same pair's score up to float32 accumulation order (~1e-6 at d = 512). A seeded or stopped threshold
often sits exactly at one negative's score, which the text keeps: so must the image rows."""
DIST_IMPLS = ("bidir", "shift", "reduce", "gather")
"""open_clip's communication schedules of SigLipLoss; all compute the same sum."""


class GloFNDSigLipLoss(ImageTextLossBase):
    """SigLIP's sigmoid loss whose negative pairs skip GloFND's false negatives.

    open_clip's ``SigLipLoss`` is ``-(1/b) sum_i sum_j log sigmoid(z_ij (t s_ij + bias))`` over
    the local images ``i`` and the global texts ``j``, with ``z = +1`` for a pair and ``-1``
    otherwise. Every negative pair appears once, so its term is split in two halves, one owned by
    each side: the image's half leaves the sum when image ``i``'s threshold flags text ``j``
    (``s_ij > lambda^img_i``), the text's half when text ``j``'s threshold flags image ``i``.
    Thresholds learn on the raw cosines as in :class:`~glofnd_losses.GloFNDClipLoss`. With
    ``detector=None`` the loss equals ``SigLipLoss``, values and gradients (features,
    ``logit_scale``, ``logit_bias``).

    A step first runs the local texts against the global images to learn (and flag with) the text
    thresholds; those thresholds are all-gathered (``b`` floats per rank), and then the local
    images' rows against the global texts give the loss and every gradient: four ``b x B x d``
    products to ``SigLipLoss``'s three. Each rank's value and gradients equal ``SigLipLoss``'s for
    every ``dist_impl``: the features are all-gathered once per modality whatever ``dist_impl``
    says, and scores are computed in chunks, so peak memory stays flat as the batch grows.

    Args:
        num_samples: Number of image-text pairs; ``indices`` must lie in ``[0, num_samples)``.
        alpha: Target fraction of negatives flagged.
        start_epoch: First 0-based epoch in which thresholds learn and filter.
        detector: ``"glofnd"``, ``"fnc"``, ``"oracle"`` (needs labels) or None.
        threshold_optimizer: GloFND's update rule (default :meth:`ThresholdOptimizer.default`).
        cache_labels: open_clip's argument; accepted for compatibility (no label matrix is built).
        rank: This process's rank, as passed to open_clip; None (default) reads it from
            ``torch.distributed``. A value must agree with it.
        world_size: The number of processes, as passed to open_clip; None reads it from
            ``torch.distributed``. A value must agree with it.
        dist_impl: open_clip's communication schedule (``"bidir"``, ``"shift"``, ``"reduce"``,
            ``"gather"`` or None); accepted for compatibility, the result is the same.
        start_step: First training step in which thresholds learn.
        filter_start_epoch: First epoch in which flagged negatives are removed.
        chunk_size: Anchors per chunk of the score rows; None (default) keeps each chunk's scores
            within a fixed memory budget.
        treatment: ``"eliminate"`` (a flagging side's half of the pair's negative term leaves the
            sum) or ``"attract"`` (that half's label flips to ``+1``: the pair is pulled together).
        state_sharding: ``"replicated"`` (every rank stores every sample's row) or ``"sharded"``
            (each rank stores a contiguous block of rows and a step fetches its anchors' rows from
            their owners: per-rank memory divided by the world size; see docs/sharded_state.md).

    Examples:
        >>> import torch
        >>> from glofnd_losses import GloFNDSigLipLoss
        >>> loss_fn = GloFNDSigLipLoss(num_samples=100, alpha=1e-3)
        >>> images = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> texts = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> logit_scale, logit_bias = torch.tensor(10.0), torch.tensor(-10.0)
        >>> out = loss_fn(images, texts, logit_scale, logit_bias, output_dict=True, indices=torch.arange(8))
        >>> sorted(out)
        ['contrastive_loss']
        >>> loss_fn.text_thresholds.shape
        torch.Size([100])
    """

    def __init__(
        self,
        num_samples: int,
        alpha: float = 1e-3,
        start_epoch: int = 0,
        detector: str | None = "glofnd",
        threshold_optimizer: ThresholdOptimizer | None = None,
        *,
        cache_labels: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        dist_impl: str | None = None,
        start_step: int = 0,
        filter_start_epoch: int | None = None,
        chunk_size: int | None = None,
        treatment: str = "eliminate",
        state_sharding: str = "replicated",
    ) -> None:
        super().__init__(
            num_samples, alpha, detector, threshold_optimizer, start_epoch, start_step, filter_start_epoch,
            chunk_size, banks=("image_", "text_"), treatment=treatment, state_sharding=state_sharding,
        )  # fmt: skip
        if dist_impl is not None and dist_impl not in DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {DIST_IMPLS} or None, got {dist_impl!r}")
        self.cache_labels = bool(cache_labels)
        self.dist_impl = dist_impl
        self.expected_rank = None if rank is None else check_int_at_least("rank", rank, 0)
        self.expected_world_size = None if world_size is None else check_int_at_least("world_size", world_size, 1)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
        output_dict: bool = False,
        *,
        indices: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Loss of a batch of image-text pairs.

        Args:
            image_features: L2-normalised image embeddings, ``(b, d)``.
            text_features: L2-normalised text embeddings of the paired captions, ``(b, d)``.
            logit_scale: The exponentiated scale ``t`` (open_clip's ``logit_scale.exp()``).
            logit_bias: The bias added to every logit (open_clip's ``logit_bias``), or None.
            output_dict: Return ``{"contrastive_loss": loss}`` as open_clip's losses do.
            indices: Data set indices of the ``b`` pairs, ``(b,)`` integers.
            labels: Optional ``(b,)`` class labels (oracle detector, FN precision/recall).

        Returns:
            The scalar loss, or open_clip's dict.
        """
        self._check_process_group()
        settings = self._begin_step()
        device = image_features.device
        with autocast_disabled(device.type):
            checked, scale = self._checked_inputs(image_features, text_features, indices, logit_scale)
            bias = None if logit_bias is None else image_text.scalar_input(logit_bias, device, "logit_bias", _BIAS)
            local_size = image_features.shape[0]
            image_bank, text_bank = image_text.banks(
                image_features.float(), text_features.float(), labels, 1.0 / local_size
            )
            if image_bank.columns.shape[0] == 1:
                positive = _positive_term(image_features, text_features, scale, bias)
                loss = self._loss_without_negatives([image_features, text_features, scale], checked, positive)
                return image_text.as_output(loss, output_dict)
            state_rows = self.state.read(checked.indices)
            # The text anchors only detect (and learn); their flags reach the image rows' loss as
            # thresholds on the columns, gathered from the texts' ranks.
            text = self._run_bank(text_bank, None, state_rows, settings, scale)
            text_bounds = (
                None if text.thresholds is None else distributed.gather_rows(text.thresholds) + SCORE_TOLERANCE
            )
            formula = functools.partial(_sigmoid, text_bounds, self.treatment == "attract")
            image = self._run_bank(image_bank, formula, state_rows, settings, scale, bias)
        self._end_step(checked, {**image.new_rows, **text.new_rows}, {**image.stats, **text.stats}, local_size)
        return image_text.as_output(image.loss, output_dict)

    def _check_process_group(self) -> None:
        """A ``rank`` or ``world_size`` given to the constructor must be torch.distributed's."""
        actual = {"rank": distributed.rank(), "world_size": distributed.world_size()}
        for name, expected in (("rank", self.expected_rank), ("world_size", self.expected_world_size)):
            if expected is not None and expected != actual[name]:
                raise ValueError(
                    f"{name}={expected} was given to {type(self).__name__}, but torch.distributed reports "
                    f"{name}={actual[name]}: pass the process group's values or None"
                )

    def _loss_settings(self) -> str:
        return f"dist_impl={self.dist_impl!r}" if self.dist_impl is not None else ""


def _sigmoid(text_bounds: torch.Tensor | None, attract: bool, rows: RowInputs) -> RowTerms:
    """Image rows' sigmoid terms; a negative's weight is 1/2 per side (image, text) that keeps it.

    ``text_bounds``: ``(C,)`` the columns' thresholds plus :data:`SCORE_TOLERANCE`, or None where
    the texts flag what the images flag (no detector, not filtering, or the oracle's symmetric
    same-label flags). ``attract``: the flagging sides' halves become positive terms.
    """
    bias = rows.scale.new_zeros(()) if rows.bias is None else rows.bias
    weight = rows.keep.float()
    if text_bounds is not None:
        text_keep = (rows.scores <= text_bounds).scatter_(-1, rows.positive_index[..., None], False)
        weight.add_(text_keep).mul_(0.5)
    attracted = None
    if attract and rows.flagged is not None:
        # Every column but the positive is a negative: what its sides do not keep, they attract.
        attracted = torch.ones_like(weight).scatter_(-1, rows.positive_index[..., None], 0.0).sub_(weight)
    return sigmoid_rows(rows.scores, rows.scale, bias, rows.positive_index, weight, attracted)


def _positive_term(
    images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The loss of a lone pair: ``-log sigmoid(t s + bias)``, averaged over the local pairs."""
    logits = scale * (images.float() * texts.float()).sum(dim=1)
    if bias is not None:
        logits = logits + bias
    return nn.functional.softplus(-logits).mean()
