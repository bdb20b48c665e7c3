"""Shared machinery of the GloFND losses: schedule, state, validation, the step around the engine.

A loss's ``forward`` is a short sequence: begin the step (host settings), check the inputs,
gather, run its banks through :mod:`glofnd_losses.engine`, apply its formula to the banks'
results, commit the state rows, keep the diagnostics. Subclasses declare their per-sample fields
(:meth:`GloFNDLossBase.add_state`) and their formulas; this class owns when thresholds learn and
filter, the per-sample state and its one sync per step, and input validation without host syncs.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from glofnd_losses import agreement, distributed, engine, functional, host, validation
from glofnd_losses.accumulation import AccumulatingLoss
from glofnd_losses.detectors import Detector, Step, make_detector
from glofnd_losses.host import LatchedHostFlag
from glofnd_losses.sharding import check_state_sharding
from glofnd_losses.state import Field, PerSampleState
from glofnd_losses.thresholds import ThresholdOptimizer
from glofnd_losses.validation import check_int_at_least

TREATMENTS = ("eliminate", "attract")
"""What a loss does with flagged negatives: remove them, or pull them in as extra positives."""

SEEDING_CHECK_INTERVAL = 256
"""Fewest training steps between two non-blocking checks of whether every sample has been visited."""

SEEDING_CHECKS_PER_EPOCH = 16
"""Checks per epoch's worth of steps at most: a check reads every row, so with this bound its cost
per step stays flat in ``num_samples`` (a large data set is checked every ``num_samples / (16 x
global batch)`` steps)."""


@dataclass(frozen=True)
class StepSettings:
    """Host-side values a step reads, fixed for its duration (see :meth:`GloFNDLossBase._begin_step`).

    Attributes:
        detector_step: What the detector knows about the step.
        filtering: Whether flagged negatives leave the loss.
        gamma: This epoch's weight of the new estimate in ``u`` (losses with a schedule), or None.
    """

    detector_step: Step
    filtering: bool
    gamma: float | None = None


@dataclass
class CheckedIndices:
    """A batch's data set indices after the input checks.

    Attributes:
        indices: ``(b,)`` int64 local data set indices, safe to index the state with.
        error_bits: 0-d int device tensor of deferred check results (0: valid), or None when the
            inputs were checked eagerly.
        names: Names of the checked embeddings, for the deferred error message.
        collective: Whether the ranks share the check results (several ranks, and the step makes
            a collective: every rank then raises in the same call).
    """

    indices: torch.Tensor
    error_bits: torch.Tensor | None
    names: tuple[str, ...]
    collective: bool = False


@dataclass
class TwoViewInputs:
    """The normalised, gathered inputs of a two-view (unimodal) loss, as the engine's bank.

    Attributes:
        bank: Both views' local rows ``(2, b, d)`` against the global ``[A; B]`` columns.
        checked: The local data set indices and their check results.
        global_size: Items in the global batch.
    """

    bank: engine.Bank
    checked: CheckedIndices
    global_size: int


class GloFNDLossBase(AccumulatingLoss, nn.Module):
    """Base class of the GloFND losses. Not used directly.

    Args:
        num_samples: Number of data set items; indices must lie in ``[0, num_samples)``.
        alpha: Target fraction of each anchor's negatives flagged as false negatives.
        detector: ``"glofnd"``, ``"fnc"``, ``"oracle"`` or None.
        threshold_optimizer: Update rule of GloFND's thresholds (default
            :meth:`ThresholdOptimizer.default`; :meth:`ThresholdOptimizer.paper` for parity).
        start_epoch: First epoch (0-based, see :meth:`set_epoch`) in which thresholds learn
            and filter.
        start_step: First training step (counted by the loss) in which thresholds learn and
            filter; for iterable data sets without epochs. Both conditions must hold.
        filter_start_epoch: First epoch in which flagged negatives leave the loss; defaults to
            ``start_epoch``; a later value warms the thresholds up first.
        chunk_size: Anchors per chunk of the score rows (see :mod:`glofnd_losses.engine`); None
            picks it from a memory budget so that peak memory stays flat as the batch grows; a
            value at least the batch size computes the rows in one piece.
        banks: Threshold bank prefixes (one per anchor modality).
        treatment: What becomes of flagged negatives: ``"eliminate"`` (they leave the loss, the
            paper) or ``"attract"`` (they become extra positives, Huynh et al.'s other treatment).
        state_sharding: ``"replicated"`` or ``"sharded"`` (see :mod:`glofnd_losses.sharding`).

    Examples:
        See :class:`~glofnd_losses.GloFNDSogCLRLoss` and :class:`~glofnd_losses.GloFNDNTXent`.
    """

    def __init__(
        self,
        num_samples: int,
        alpha: float,
        detector: str | None,
        threshold_optimizer: ThresholdOptimizer | None,
        start_epoch: int,
        start_step: int,
        filter_start_epoch: int | None,
        chunk_size: int | None = None,
        banks: Sequence[str] = ("",),
        treatment: str = "eliminate",
        state_sharding: str = "replicated",
    ) -> None:
        super().__init__()
        num_samples = check_int_at_least("num_samples", num_samples, 1, "the data set size")
        if treatment not in TREATMENTS:
            raise ValueError(f"treatment must be one of {TREATMENTS}, got {treatment!r}")
        self.treatment = treatment
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        self.start_epoch, self.start_step, self.filter_start_epoch = _schedule_starts(
            start_epoch, start_step, filter_start_epoch
        )
        self.num_samples = num_samples
        self.alpha = float(alpha)
        self.detector: Detector = make_detector(detector, alpha, threshold_optimizer)
        if chunk_size is not None:
            chunk_size = check_int_at_least("chunk_size", chunk_size, 1, "anchors per chunk; or None")
        self.chunk_size = chunk_size
        self.banks = tuple(banks)
        fields: dict[str, Field] = {}
        for prefix in self.banks:
            fields.update(self.detector.fields(prefix))
        self.state = PerSampleState(num_samples, fields, check_state_sharding(state_sharding))
        self.epoch = 0
        self.step = 0
        self.last_stats: dict[str, torch.Tensor] = {}
        self._deferred = validation.DeferredErrors()
        # Forward calls, for raising a deferred error on every rank in the same call.
        self._calls = 0
        # Several ranks: how many more calls compare the ranks' settings: the first call, and with a
        # sharded state the second too (its block mark exists from the first call's read on, and
        # DDP would overwrite it at the second forward). Not again after a load: a rank that loads
        # alone would run the comparison's collectives alone.
        self._comparisons_left = 2 if self.state.sharding == "sharded" else 1
        # Once every sample has been visited, first-visit work (the mini-batch quantile that seeds
        # a threshold) is skipped. Learned without blocking; forgotten when a state is loaded
        # (through this module, a parent, or self.state directly).
        self._all_seeded = LatchedHostFlag()
        self._all_seeded_loads = self.state.loads
        # A loop that never calls set_epoch stays in epoch 0: warned once after an epoch's worth of samples.
        self._epoch_was_set = False
        self._samples_in_epoch_zero = 0
        self._accumulation = None

    def add_state(
        self, name: str, dtype: torch.dtype, init: float, minimum: float | None = None, maximum: float | None = None
    ) -> None:
        """Declare a per-sample field of the loss (one row per data set item, synced by index).

        ``minimum`` and ``maximum`` bound the values a loaded state may hold (see :class:`Field`).
        """
        self.state.add(name, Field(dtype, init, minimum, maximum))

    # ------------------------------------------------------------------ schedule
    def set_epoch(self, epoch: int) -> None:
        """Set the current 0-based epoch (call at the start of every epoch, on every rank)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)
        self._epoch_was_set = True
        self._check_seeding()

    def _epoch_dependence(self) -> list[str]:
        """What in this loss's configuration changes with the epoch (empty: nothing)."""
        reasons = []
        if self.start_epoch > 0:
            reasons.append(f"thresholds learn from start_epoch={self.start_epoch}")
        if self.filter_start_epoch > self.start_epoch:
            reasons.append(f"flagged negatives leave the loss from filter_start_epoch={self.filter_start_epoch}")
        optimizer = getattr(self.detector, "optimizer", None)
        if (
            isinstance(optimizer, ThresholdOptimizer)
            and optimizer.rule == "adam"
            and optimizer.bias_correction == "epoch"
        ):
            reasons.append("the threshold rule's bias correction counts epochs")
        return reasons

    def _count_samples_without_epoch(self, local_size: int) -> None:
        """Warn once when an epoch's worth of samples went by without :meth:`set_epoch` and it matters."""
        if self._epoch_was_set or self._samples_in_epoch_zero > self.num_samples:
            return
        self._samples_in_epoch_zero += local_size * distributed.world_size()
        reasons = self._epoch_dependence()
        if self._samples_in_epoch_zero > self.num_samples and reasons:
            warnings.warn(
                f"{type(self).__name__}: {self._samples_in_epoch_zero} samples (num_samples={self.num_samples}) went "
                f"through training but set_epoch() was never called, so the loss is still in epoch 0, and "
                f"{'; '.join(reasons)}. Call loss.set_epoch(epoch) at the start of every epoch (the open_clip and "
                "lightly adapters do), or use start_step for data without epochs.",
                stacklevel=_caller_stacklevel(),
            )

    def _known_all_seeded(self) -> bool:
        """Whether every sample is known to have been visited, forgetting it if a state was loaded."""
        if self._all_seeded_loads != self.state.loads:
            self._all_seeded.reset()
            self._all_seeded_loads = self.state.loads
        return self._all_seeded.known_true

    def _check_seeding(self) -> None:
        """Start a non-blocking check of whether every sample's threshold has been visited.

        Reads every row: skipped once known (or while a read is in flight), except with a sharded
        state, where it is a collective that every rank must make in the same step whatever its own
        reads found.
        """
        self._known_all_seeded()  # first forget what a loaded state made stale
        visits = [name for name in self.state.fields if name.endswith("threshold_visits")]
        if not visits:
            return
        if self.state.sharding == "sharded":
            # Not before the ranks compared their settings: a rank built replicated makes no all-reduce.
            if self._calls > 0 or not distributed.is_distributed():
                self._all_seeded.check(self.state.all_true(lambda count: count > 0, visits))
        elif self._all_seeded.needs_check:
            self._all_seeded.check(self.state.all_true(lambda count: count > 0, visits))

    @property
    def learning(self) -> bool:
        """Whether thresholds learn in the current step."""
        return self.epoch >= self.start_epoch and self.step >= self.start_step

    @property
    def updates_state(self) -> bool:
        """Whether a forward now writes the per-sample state and counts a step.

        In training mode with gradients enabled. A training-mode forward under ``torch.no_grad()``
        or ``torch.inference_mode()`` (a validation loop whose loss is not a submodule of the
        model, so ``model.eval()`` does not reach it) filters as in training but learns nothing,
        as in ``eval()`` mode.
        """
        return self.training and torch.is_grad_enabled()

    @property
    def filtering(self) -> bool:
        """Whether flagged negatives are removed from the loss in the current step."""
        return self.learning and self.epoch >= self.filter_start_epoch

    # ------------------------------------------------------------------ loading a state
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict`` that writes nothing unless the whole state loads.

        With ``strict=True`` a state with missing or unexpected entries (another loss, another
        threshold rule) is refused before anything is written; with ``strict=False`` missing
        entries keep their values and unexpected ones are ignored. Either way every entry is
        checked (shape, dtype, finite values in range, see :meth:`_load_from_state_dict`) first.

        Raises:
            RuntimeError: ``strict=True`` and the keys differ (as ``nn.Module``'s message).
            ValueError: An entry of another size, dtype or range, naming its key and what it must be.
        """
        if strict:
            expected = set(self.state_dict(keep_vars=True))
            missing = sorted(expected - set(state_dict))
            unexpected = sorted(set(state_dict) - expected)
            if missing or unexpected:
                problems = [f"{kind} key(s) in state_dict: {', '.join(map(repr, keys))}."
                            for kind, keys in (("Missing", missing), ("Unexpected", unexpected)) if keys]  # fmt: skip
                raise RuntimeError(
                    f"Error(s) in loading state_dict for {type(self).__name__}: {' '.join(problems)} Nothing was "
                    "loaded: was the state saved by another loss or threshold rule? (strict=False loads the "
                    "entries that match)"
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Check the loss's whole incoming state before any of it is written.

        ``nn.Module`` loads a module's own entries (here the schedule position) before its
        submodules' (the per-sample table), whether the loss is loaded directly or as part of a
        model: checking everything under ``prefix`` here makes the load all or nothing.
        """
        extra_key = prefix + "_extra_state"
        if extra_key in state_dict:
            _schedule_position(state_dict[extra_key], extra_key)
        self.state.checked_fields(state_dict, prefix + "state.")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_extra_state(self) -> torch.Tensor:
        """The host-side schedule position, ``[epoch, step]`` as an int64 tensor.

        A tensor, not a dict, so that a state dict holding the loss stays all tensors: safetensors
        (accelerate's ``save_model`` / ``save_state``) and timm's model EMA refuse other values.
        """
        return torch.tensor([self.epoch, self.step], dtype=torch.int64)

    def set_extra_state(self, state: torch.Tensor) -> None:
        """Restore :meth:`get_extra_state`'s value."""
        self.epoch, self.step = _schedule_position(state)

    # ------------------------------------------------------------------ state access
    def _threshold_buffer(self, prefix: str, field: str = "threshold") -> torch.Tensor:
        name = f"{prefix}{field}"
        if name not in self.state.fields:
            # Not AttributeError: nn.Module.__getattr__ would replace this message with its own.
            raise RuntimeError(
                f"detector {self.detector.name!r} keeps no per-sample thresholds (only detector='glofnd' does)"
            )
        return self.state.buffer(name)

    @property
    def threshold_visits(self) -> torch.Tensor:
        """Training steps that updated each sample's thresholds, ``(num_samples,)``.

        0 marks a sample whose threshold was never learned (still at its initial value). With two
        threshold banks (CLIP) both are updated by the same steps. A ``uint8`` that stops at 255
        where the threshold rule stops reading the count after a few visits (the default rule),
        else ``int32`` (:func:`glofnd_losses.thresholds.threshold_fields`). With
        ``state_sharding="sharded"`` this and the other per-sample views hold this rank's rows
        only, ``loss.state.owned_rows``.

        A copy (``num_samples`` values per access; nothing in the training step reads it), so
        that writing to it cannot change the state: a view would write through. The same holds
        for the losses' ``thresholds``, ``image_thresholds``, ``text_thresholds`` and ``u``.
        """
        return self._threshold_buffer(self.banks[0], "threshold_visits").detach().clone()

    # ------------------------------------------------------------------ validation
    def _validate(
        self,
        embeddings: Sequence[tuple[str, torch.Tensor]],
        indices: torch.Tensor,
        unit_norm: bool = False,
        gathers: bool = True,
    ) -> CheckedIndices:
        """Check the inputs: at once where the host can read them, else as bits :meth:`_end_step` records.

        With several ranks a bad batch on one rank raises on every rank in the same call: on CPU
        here (one all-gather of the ranks' check results, before the step's other collectives),
        on an accelerator at a later call (the results ride with the state rows).

        Args:
            embeddings: The batch's embeddings, by name (the names appear in error messages).
            indices: The batch's data set indices.
            unit_norm: The embeddings must also be L2-normalised (inputs that are not normalised here).
            gathers: Whether the step gathers the embeddings across ranks; False only for a loss
                that contrasts locally (``GloFNDNTXent(gather_distributed=False)``).

        Returns:
            The indices, safe to index the state with, and the deferred check results.
        """
        validation.check_embeddings(embeddings)
        validation.check_index_shape(indices, embeddings[0][1].shape[0])
        device = embeddings[0][1].device
        indices = indices.to(device=device, dtype=torch.int64)
        if self._accumulation is not None:
            self._accumulation.check_indices(indices)
        names = tuple(name for name, _ in embeddings)
        # A step without any collective (local contrast, no state rows to sync) keeps its errors to itself.
        # A sharded state's read is a collective in every call, evaluation included.
        state_collective = bool(self.state.fields) and (self.updates_state or self.state.sharding == "sharded")
        collective = distributed.is_distributed() and (gathers or state_collective)
        if host.reads_without_sync(device):
            if collective:
                validation.raise_together(indices, self.num_samples, embeddings, unit_norm)
            else:
                validation.check_values_eagerly(indices, self.num_samples, embeddings, unit_norm)
            return CheckedIndices(indices, None, names, collective)
        bits = validation.value_error_bits(indices, self.num_samples, embeddings, unit_norm)
        return CheckedIndices(indices.clamp(0, self.num_samples - 1), bits, names, collective)

    def check_errors(self) -> None:
        """Raise any pending ``ValueError`` from accelerator-side input checks (blocks)."""
        self._deferred.raise_if_any(wait=True)

    # ------------------------------------------------------------------ host side of a step
    # A step is _begin_step (host), the tensor work (one torch.compile graph where the loss is
    # compiled), then _end_step (host). The host parts stay out of compiled graphs: they read and
    # advance counters that change every step (a graph would specialise on them and recompile),
    # start non-blocking reads, and run the state's collective.
    @torch.compiler.disable
    def _begin_step(self) -> StepSettings:
        """Start a step: agree with the other ranks, raise earlier steps' deferred errors, read the settings.

        The ranks compare their settings and state at the first call of a run (once, a sync): a
        checkpoint loaded before it on some ranks only is found there. A deferred error is raised
        when found (one process) or when due (several ranks).
        """
        self._calls += 1
        if self._comparisons_left > 0 and distributed.is_distributed():
            validation.raise_if_settings_differ(agreement.loss_settings(self), agreement.state_device(self))
            self._comparisons_left -= 1
        self._deferred.raise_if_any(call=self._calls)
        step = Step(learn=self.updates_state and self.learning, epoch=self.epoch, all_seeded=self._known_all_seeded())
        return StepSettings(step, self.filtering)

    @torch.compiler.disable
    def _end_step(
        self,
        checked: CheckedIndices,
        new_rows: dict[str, torch.Tensor],
        stats: dict[str, torch.Tensor],
        local_size: int,
    ) -> None:
        """Record the deferred input checks, write the state rows (training) and count the step."""
        updates_state = self._count_call() and self.updates_state
        per_rank_bits = None
        if updates_state and new_rows:
            per_rank_bits = self.state.commit(checked.indices, new_rows, checked.error_bits)
        if checked.error_bits is not None:
            # Also in eval mode: nothing is written there, but clamped indices read other samples' thresholds.
            self._record_checks(checked, per_rank_bits)
        self.last_stats = stats
        if updates_state:
            self.step += 1
            if self.step % seeding_check_interval(self.num_samples, local_size * distributed.world_size()) == 0:
                self._check_seeding()
            self._count_samples_without_epoch(local_size)

    def _record_checks(self, checked: CheckedIndices, per_rank_bits: torch.Tensor | None) -> None:
        """Send the step's deferred check results to the host: this rank's, or every rank's."""
        assert checked.error_bits is not None
        if not checked.collective:
            self._deferred.record(checked.error_bits, self.num_samples, checked.names)
            return
        if per_rank_bits is None:  # no state rows this step (eval): the results travel on their own
            per_rank_bits = distributed.gather_rows(checked.error_bits.to(torch.int64).reshape(1))
        rank = distributed.rank()
        combined = validation.combine_rank_bits(per_rank_bits, rank)
        due = self._calls + validation.COLLECTIVE_ERROR_DELAY
        self._deferred.record(combined, self.num_samples, checked.names, due=due, rank=rank)

    # ------------------------------------------------------------------ the engine
    def _run_bank(
        self,
        bank: engine.Bank,
        formula: engine.Formula | None,
        state_rows: dict[str, torch.Tensor],
        settings: StepSettings,
        scale: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> engine.BankResult:
        """Run one bank of rows through the engine with this loss's detector and schedule."""
        work = engine.Pass(
            bank, formula, self.detector, state_rows, settings.detector_step, settings.filtering, self.chunk_size,
            attract=self.treatment == "attract",
        )  # fmt: skip
        return engine.run(work, scale, bias)

    def _loss_without_negatives(
        self, inputs: Sequence[torch.Tensor], checked: CheckedIndices, value: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The loss of a batch whose contrast set is a single item, and the state is unchanged.

        Such a batch has no negatives (a last batch of one sample, or one sample per process
        without a gather); its loss is ``value`` where the loss has a term without negatives
        (SigLIP's positive), else 0, as in lightly's and open_clip's losses. Every input stays in
        the graph (DDP expects a gradient for every parameter); nothing is learned.
        All processes take this path together: the global batch size is the same on each.
        """
        warnings.warn(
            f"{type(self).__name__}: a batch whose contrast set is a single item has no negatives; its loss is "
            f"{'0' if value is None else 'its positive term'} and the per-sample state is unchanged",
            stacklevel=_caller_stacklevel(),
        )
        if (self.updates_state or self.state.sharding == "sharded") and distributed.is_distributed():
            # The others' state collectives compare the sizes: a rank that skipped them would leave them waiting.
            distributed.check_equal_sizes(inputs[0])
        zero = inputs[0].new_zeros((), dtype=torch.float32)
        stats = {
            f"{prefix}{name}": zero
            for prefix in self.banks
            for name in ("flagged_fraction", "filtered_fraction", "kept_negatives")
        }
        self._end_step(checked, {}, stats, inputs[0].shape[0])
        loss = zero if value is None else value
        for tensor in inputs:
            loss = loss + 0.0 * tensor.float().sum()
        return loss

    # ------------------------------------------------------------------ two-view inputs
    def _two_view_inputs(
        self,
        view_a: torch.Tensor,
        view_b: torch.Tensor,
        indices: torch.Tensor,
        labels: torch.Tensor | None,
        names: tuple[str, str],
        gather: bool,
        row_weight: float,
    ) -> TwoViewInputs:
        """Validate, normalise in fp32 and gather (with gradient) the two views as one bank."""
        checked = self._validate([(names[0], view_a), (names[1], view_b)], indices, gathers=gather)
        view_a = nn.functional.normalize(view_a.float(), dim=1)
        view_b = nn.functional.normalize(view_b.float(), dim=1)
        local_size = view_a.shape[0]
        use_gather = gather and distributed.is_distributed()
        if use_gather:
            all_a, all_b = distributed.gather_with_grad(view_a), distributed.gather_with_grad(view_b)
            offset = distributed.rank() * local_size
        else:
            all_a, all_b, offset = view_a, view_b, 0
        anchors, columns = functional.two_view_features(view_a, view_b, all_a, all_b)
        global_size = all_a.shape[0]
        column_labels = None
        if labels is not None:
            validation.check_index_shape(labels, local_size, name="labels")
            labels = labels.to(view_a.device)
            batch_labels = distributed.gather_rows(labels) if use_gather else labels
            column_labels = torch.cat([batch_labels, batch_labels])
        bank = engine.Bank(
            "",
            anchors,
            columns,
            functional.two_view_excluded(local_size, global_size, offset, view_a.device),
            functional.two_view_positives(local_size, global_size, offset, view_a.device),
            row_weight,
            labels,
            column_labels,
        )
        return TwoViewInputs(bank, checked, global_size)

    def _loss_settings(self) -> str:
        """The subclass's own settings, first in its ``repr``."""
        return ""

    def extra_repr(self) -> str:
        settings = self._loss_settings()
        return (
            (f"{settings}, " if settings else "")
            + f"num_samples={self.num_samples}, alpha={self.alpha}, detector={self.detector.name!r}, "
            + f"start_epoch={self.start_epoch}, start_step={self.start_step}, "
            + f"filter_start_epoch={self.filter_start_epoch}"
            + (f", treatment={self.treatment!r}" if self.treatment != "eliminate" else "")
            + (f", chunk_size={self.chunk_size}" if self.chunk_size is not None else "")
            + (f", state_sharding={self.state.sharding!r}" if self.state.sharding != "replicated" else "")
        )


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _caller_stacklevel() -> int:
    """The ``warnings.warn`` stacklevel of the code that called the loss.

    The first frame outside this package and torch, whatever lies between: nn.Module's call
    wrappers, ``torch.compile``'s frames, the loss's own helpers.
    """
    frame = sys._getframe(1)  # the function that warns: stacklevel 1
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith((_PACKAGE_DIR, _TORCH_DIR)):
        frame = frame.f_back
        level += 1
    return level


def seeding_check_interval(num_samples: int, global_batch: int) -> int:
    """Training steps between two checks of whether every sample has been visited.

    Every :data:`SEEDING_CHECK_INTERVAL` steps, or :data:`SEEDING_CHECKS_PER_EPOCH` times per
    epoch's worth of steps where that is rarer.

    Examples:
        >>> seeding_check_interval(1_000_000, 512), seeding_check_interval(10**8, 512)
        (256, 12207)
    """
    return max(SEEDING_CHECK_INTERVAL, num_samples // (SEEDING_CHECKS_PER_EPOCH * global_batch))


def check_finite_positive(name: str, value: float) -> None:
    """A ValueError naming ``name`` unless ``0 < value < inf`` (NaN fails too)."""
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be finite and > 0, got {value}")


def _schedule_position(state: Any, key: str = "_extra_state") -> tuple[int, int]:
    """``(epoch, step)`` from a stored schedule position, or a ValueError naming its entry ``key``."""
    if not isinstance(state, torch.Tensor) or state.shape != (2,):
        shape = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
        raise ValueError(f"the loss's extra state must be [epoch, step], a tensor of shape (2,); got {shape} ({key})")
    values = state.detach().to(torch.float64).tolist() if not state.is_complex() else [math.nan]
    if state.dtype == torch.bool or not all(math.isfinite(v) and v >= 0 and v == int(v) for v in values):
        raise ValueError(f"the loss's extra state [epoch, step] must hold whole numbers >= 0, got {values} ({key})")
    return int(values[0]), int(values[1])


def _schedule_starts(start_epoch: Any, start_step: Any, filter_start_epoch: Any) -> tuple[int, int, int]:
    """The first epoch and step that learn and the first epoch that filters, checked by name."""
    start_epoch = check_int_at_least("start_epoch", start_epoch, 0)
    start_step = check_int_at_least("start_step", start_step, 0)
    if filter_start_epoch is None:
        return start_epoch, start_step, start_epoch
    filter_start_epoch = check_int_at_least("filter_start_epoch", filter_start_epoch, 0)
    if filter_start_epoch < start_epoch:
        raise ValueError(
            f"filter_start_epoch must be >= start_epoch={start_epoch} (thresholds must learn before they "
            f"filter), got {filter_start_epoch}"
        )
    return start_epoch, start_step, filter_start_epoch


def autocast_disabled(device_type: str) -> Any:
    """Context manager computing the loss in float32 even inside an autocast region.

    A device type without autocast (e.g. ``meta``) has no autocast region to leave.
    """
    is_available = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4
    if is_available is not None and not is_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)
