"""Image-text contrastive losses with GloFND: a drop-in for open_clip's ClipLoss."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import torch

from glofnd_losses import engine, functional, image_text, validation
from glofnd_losses.base import (
    StepSettings,
    autocast_disabled,
    check_finite_positive,
    check_int_at_least,
)
from glofnd_losses.engine import RowInputs
from glofnd_losses.functional import RowTerms
from glofnd_losses.image_text import ImageTextLossBase
from glofnd_losses.ntxent import cross_entropy
from glofnd_losses.schedules import cosine_gamma
from glofnd_losses.thresholds import ThresholdOptimizer

Estimator = Literal["minibatch", "sogclr", "fastclip"]
_U_EPS = 1e-14


class GloFNDClipLoss(ImageTextLossBase):
    """CLIP's image-text contrastive loss whose negatives skip GloFND's false negatives.

    Call shape of open_clip's ``ClipLoss``: ``loss(image_features, text_features, logit_scale,
    output_dict=True, indices=...)`` returns ``{"contrastive_loss": ...}``. Features must be
    L2-normalised (open_clip's models return them so); ``logit_scale`` is the exponentiated scale,
    ``1 / temperature``. Each item has two thresholds: ``image_thresholds`` (image anchor against
    the batch's texts) and ``text_thresholds`` (text anchor against the images).

    Estimators:

    * ``"minibatch"``: open_clip's symmetric cross-entropy over the global batch; flagged
      negatives are removed and the kept ones rescaled to the full count (as
      :class:`~glofnd_losses.GloFNDNTXent`). Unfiltered it equals
      ``ClipLoss(local_loss=True, gather_with_grad=True)`` (any setting with one process).
    * ``"sogclr"`` (FastCLIP-v1, the paper's bimodal SogCLR): per-item moving averages
      ``u_image``, ``u_text`` with ``gamma`` cosine-decayed from 1 to ``gamma_min`` over
      ``gamma_decay_epochs``, fixed ``temperature``; the loss is
      ``mean_i [g_i^img / (u_i^img + eps) + g_i^txt / (u_i^txt + eps)]``. ``logit_scale`` stays in
      the graph with a zero gradient (DDP needs every parameter used).
    * ``"fastclip"`` (FastCLIP-v3): as ``"sogclr"`` with the learnable global temperature
      ``tau = 1 / logit_scale``: ``sg[tau] * L + rho * tau + tau / 2 * mean_i [log(u^img + eps) +
      log(u^txt + eps)]``. Keep the model's log-scale parameter clamped to ``[0, ln 100]`` as
      open_clip does (the ``logit_scale`` passed here, its exponential, then lies in ``[1, 100]``).

    With several ranks, the gradient equals the single-process gradient of the global batch
    under DDP's averaging, in every estimator.

    Args:
        num_samples: Number of image-text pairs; ``indices`` must lie in ``[0, num_samples)``.
        estimator: ``"minibatch"``, ``"sogclr"`` or ``"fastclip"``.
        alpha: Target fraction of negatives flagged (paper: 5e-4 sogclr, 1e-3 fastclip).
        start_epoch: First 0-based epoch in which thresholds learn and filter (paper: 15 / 20).
        detector: ``"glofnd"``, ``"fnc"``, ``"oracle"`` (needs labels) or None.
        threshold_optimizer: GloFND's update rule (default :meth:`ThresholdOptimizer.default`).
        temperature: Fixed temperature of ``"sogclr"`` (paper 0.03).
        rho: FastCLIP-v3's temperature penalty.
        gamma: A constant ``gamma`` instead of the cosine schedule.
        gamma_min: Final ``gamma`` of the schedule.
        gamma_decay_epochs: Length of the schedule in epochs.
        start_step: First training step in which thresholds learn.
        filter_start_epoch: First epoch in which flagged negatives are removed.
        chunk_size: Anchors per chunk of the score rows; None (default) keeps each chunk's scores
            within a fixed memory budget, so peak memory stays flat as the batch grows.
        treatment: ``"eliminate"`` (flagged negatives leave the loss) or ``"attract"`` (they become
            extra positives: ``-(1/|P|) sum_{q in P} log softmax_q``; ``"minibatch"`` only).
        state_sharding: ``"replicated"`` (every rank stores every sample's row) or ``"sharded"``
            (each rank stores a contiguous block of rows and a step fetches its anchors' rows from
            their owners: per-rank memory divided by the world size; see docs/sharded_state.md).

    Examples:
        >>> import torch
        >>> from glofnd_losses import GloFNDClipLoss
        >>> loss_fn = GloFNDClipLoss(num_samples=100, estimator="fastclip", alpha=1e-3)
        >>> images = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> texts = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> logit_scale = torch.tensor(1 / 0.07, requires_grad=True)
        >>> out = loss_fn(images, texts, logit_scale, output_dict=True, indices=torch.arange(8))
        >>> sorted(out)
        ['contrastive_loss']
        >>> loss_fn.image_thresholds.shape
        torch.Size([100])
    """

    def __init__(
        self,
        num_samples: int,
        estimator: Estimator = "fastclip",
        alpha: float = 1e-3,
        start_epoch: int = 0,
        detector: str | None = "glofnd",
        threshold_optimizer: ThresholdOptimizer | None = None,
        *,
        temperature: float = 0.03,
        rho: float = 6.5,
        gamma: float | None = None,
        gamma_min: float = 0.2,
        gamma_decay_epochs: int = 18,
        start_step: int = 0,
        filter_start_epoch: int | None = None,
        chunk_size: int | None = None,
        treatment: str = "eliminate",
        state_sharding: str = "replicated",
    ) -> None:
        _check_estimator_settings(estimator, temperature, gamma, gamma_min, gamma_decay_epochs)
        if treatment == "attract" and estimator != "minibatch":
            raise ValueError(
                "treatment='attract' needs estimator='minibatch' (the softmax over the batch): the sogclr and "
                f"fastclip estimators track their denominator with u, which has no attracted form; got {estimator!r}"
            )
        super().__init__(
            num_samples, alpha, detector, threshold_optimizer, start_epoch, start_step, filter_start_epoch,
            chunk_size, banks=("image_", "text_"), treatment=treatment, state_sharding=state_sharding,
        )  # fmt: skip
        if estimator != "minibatch":
            self.add_state("u_image", torch.float32, 0.0, minimum=0.0)
            self.add_state("u_text", torch.float32, 0.0, minimum=0.0)
        self.estimator: Estimator = estimator
        self.temperature = float(temperature)
        self.rho = float(rho)
        self.constant_gamma = gamma
        self.gamma_min = float(gamma_min)
        self.gamma_decay_epochs = int(gamma_decay_epochs)

    def _loss_settings(self) -> str:
        if self.estimator == "minibatch":
            return "estimator='minibatch'"
        temperature = f"temperature={self.temperature}" if self.estimator == "sogclr" else f"rho={self.rho}"
        if self.constant_gamma is not None:
            return f"estimator={self.estimator!r}, {temperature}, gamma={self.constant_gamma}"
        schedule = f"gamma_min={self.gamma_min}, gamma_decay_epochs={self.gamma_decay_epochs}"
        return f"estimator={self.estimator!r}, {temperature}, {schedule}"

    def _epoch_dependence(self) -> list[str]:
        reasons = super()._epoch_dependence()
        if self.estimator != "minibatch" and self.constant_gamma is None:
            reasons.append(f"u's weight gamma decays over gamma_decay_epochs={self.gamma_decay_epochs}")
        return reasons

    @property
    def gamma(self) -> float:
        """Weight of the new estimate in ``u`` in the current epoch."""
        if self.constant_gamma is not None:
            return self.constant_gamma
        return cosine_gamma(self.epoch, self.gamma_min, self.gamma_decay_epochs)

    @torch.compiler.disable
    def _begin_step(self) -> StepSettings:
        return dataclasses.replace(super()._begin_step(), gamma=self.gamma)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        output_dict: bool = False,
        *,
        indices: torch.Tensor,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Loss of a batch of image-text pairs.

        Args:
            image_features: L2-normalised image embeddings, ``(b, d)``.
            text_features: L2-normalised text embeddings of the paired captions, ``(b, d)``.
            logit_scale: ``1 / temperature`` (open_clip's exponentiated ``logit_scale``).
            logit_bias: Not supported (SigLIP); must be None.
            output_dict: Return ``{"contrastive_loss": loss}`` as open_clip's losses do.
            indices: Data set indices of the ``b`` pairs, ``(b,)`` integers.
            labels: Optional ``(b,)`` class labels (oracle detector, FN precision/recall).
            **kwargs: Other outputs of open_clip's models, passed along by its training loop
                (ignored; see :data:`~glofnd_losses.validation.OPEN_CLIP_MODEL_OUTPUTS`). Any
                other name is a TypeError, so a misspelled ``output_dict`` is not swallowed.

        Returns:
            The scalar loss, or open_clip's dict.
        """
        validation.check_model_outputs(kwargs, type(self).__name__)
        if logit_bias is not None:
            raise ValueError("logit_bias must be None: GloFNDClipLoss is CLIP's softmax loss, not SigLIP's")
        settings = self._begin_step()
        with autocast_disabled(image_features.device.type):
            checked, scale = self._checked_inputs(image_features, text_features, indices, logit_scale)
            # The minibatch loss averages the two directions; the global estimators add them.
            rows = 2 * image_features.shape[0] if self.estimator == "minibatch" else image_features.shape[0]
            banks = image_text.banks(image_features.float(), text_features.float(), labels, 1.0 / rows)
            if banks[0].columns.shape[0] == 1:
                loss = self._loss_without_negatives([image_features, text_features, scale], checked)
                return image_text.as_output(loss, output_dict)
            state_rows = self.state.read(checked.indices)
            image, text = (self._run_bank(bank, self._formula(bank, settings), state_rows, settings,
                                          self._exponent_scale(scale)) for bank in banks)  # fmt: skip
            loss = self._combine(image, text, scale)
        new_rows = {**image.new_rows, **text.new_rows, **image.outputs, **text.outputs}
        self._end_step(checked, new_rows, {**image.stats, **text.stats}, image_features.shape[0])
        return image_text.as_output(loss, output_dict)

    def _exponent_scale(self, logit_scale: torch.Tensor) -> torch.Tensor:
        """The inverse temperature inside the exponentials: fixed for ``"sogclr"``, learned otherwise."""
        return logit_scale.new_full((), 1.0 / self.temperature) if self.estimator == "sogclr" else logit_scale

    def _formula(self, bank: engine.Bank, settings: StepSettings) -> engine.Formula:
        """The row formula of a bank: cross-entropy, or FastCLIP's ratio with its ``u`` update."""
        if self.estimator == "minibatch":
            return cross_entropy
        assert settings.gamma is not None  # set by this class's _begin_step
        return functools.partial(_global_ratio, "u_image" if bank.prefix == "image_" else "u_text", settings.gamma)

    def _combine(self, image: engine.BankResult, text: engine.BankResult, scale: torch.Tensor) -> torch.Tensor:
        """The estimator's loss from the two banks' terms."""
        total = image.loss + text.loss
        if self.estimator == "minibatch":
            return total
        if self.estimator == "sogclr":
            return total + 0.0 * scale  # keep logit_scale in the graph for DDP
        log_u = torch.log(image.outputs["u_image"] + _U_EPS) + torch.log(text.outputs["u_text"] + _U_EPS)
        return _fastclip_objective(total, log_u.mean(), 1.0 / scale, self.rho)


def _check_estimator_settings(
    estimator: str, temperature: float, gamma: float | None, gamma_min: float, gamma_decay_epochs: int
) -> None:
    """Raises a ValueError naming the first of the estimator's settings that is out of range."""
    if estimator not in ("minibatch", "sogclr", "fastclip"):
        raise ValueError(f"estimator must be 'minibatch', 'sogclr' or 'fastclip', got {estimator!r}")
    check_finite_positive("temperature", temperature)
    check_int_at_least("gamma_decay_epochs", gamma_decay_epochs, 1, "epochs of u's cosine schedule")
    if gamma is not None and not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1] or None (cosine schedule), got {gamma}")
    if not 0 < gamma_min <= 1:
        raise ValueError(f"gamma_min must be in (0, 1], got {gamma_min}")


def _fastclip_objective(total: torch.Tensor, mean_log_u: torch.Tensor, tau: torch.Tensor, rho: float) -> torch.Tensor:
    """FastCLIP-v3's ``sg[tau] * L + rho * tau + tau / 2 * mean_i [log(u^img + eps) + log(u^txt + eps)]``."""
    return tau.detach() * total + rho * tau + tau * 0.5 * mean_log_u


def _global_ratio(u_name: str, gamma: float, rows: RowInputs) -> RowTerms:
    """FastCLIP's ``g / (u' + eps)`` with ``u' = (1 - gamma) u + gamma sg[g]`` (``sg[g]`` where ``u`` is unset).

    ``g`` is :func:`~glofnd_losses.functional.kept_mean_exp_rows`; ``u`` is re-initialised where
    the stored value is below 1e-35, infinite or NaN. The ratio's gradient is ``g``'s over ``u' + eps``.
    """
    terms = functional.kept_mean_exp_rows(rows.scores, rows.scale, rows.positive_index, rows.keep, rows.kept_count)
    estimate, u_previous = terms.value[0], rows.state_rows[u_name]
    fresh = (u_previous < 1e-35) | ~torch.isfinite(u_previous)
    u_new = torch.where(fresh, estimate, (1.0 - gamma) * u_previous + gamma * estimate)
    denominator = u_new + _U_EPS
    return RowTerms(terms.value / denominator, terms.grad_scores.div_(denominator[:, None]), {u_name: u_new})
