"""The ``--glofnd-*`` flags: their parser, the checks on open_clip's arguments, the loss they describe.

Examples:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_glofnd_arguments(parser)
    >>> args = parser.parse_args(["--glofnd-alpha", "5e-4", "--glofnd-estimator", "sogclr"])
    >>> args.glofnd_alpha, args.glofnd_estimator, is_enabled(args)
    (0.0005, 'sogclr', True)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from typing import Any

import open_clip_train.data as oc_data

from glofnd_losses.clip import GloFNDClipLoss
from glofnd_losses.image_text import ImageTextLossBase
from glofnd_losses.integrations.open_clip.indices import SampleKeyIndex
from glofnd_losses.siglip import GloFNDSigLipLoss
from glofnd_losses.thresholds import ThresholdOptimizer

__all__ = [
    "add_glofnd_arguments",
    "check_supported",
    "create_glofnd_loss",
    "dataset_kind",
    "glofnd_parser",
    "is_enabled",
    "key_index_from_args",
    "resolve_data_size",
    "threshold_optimizer_from_args",
]

_THRESHOLD_OVERRIDES = {  # flag dest -> ThresholdOptimizer field
    "glofnd_threshold_update": "rule",
    "glofnd_threshold_lr": "lr",
    "glofnd_threshold_min_lr": "min_lr",
    "glofnd_threshold_init": "init",
    "glofnd_threshold_decay": "lr_decay",
    "glofnd_threshold_normalize_grad": "normalize_grad",
    "glofnd_threshold_grad_clip": "grad_clip",
    "glofnd_threshold_step_unit": "step_unit",
    "glofnd_threshold_stop_at_batch_quantile": "stop_at_batch_quantile",
}

_AddArgument = Callable[..., Any]


# ---------------------------------------------------------------------------------------------- the flags
def add_glofnd_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``--glofnd-*`` flags (dest ``glofnd_*``) to ``parser``.

    Args:
        parser: Parser to extend; in :func:`~glofnd_losses.integrations.open_clip.patch_open_clip_train`
            a parser of its own, run with ``parse_known_args`` before open_clip's.
    """
    group = parser.add_argument_group("GloFND (glofnd_losses)")
    add = group.add_argument
    _add_loss_arguments(add)
    _add_data_arguments(add)
    _add_threshold_arguments(add)
    _add_estimator_arguments(add)
    add(
        "--glofnd-state-sharding",
        choices=("replicated", "sharded"),
        default="replicated",
        help="Where the per-sample state lives: every row on every process, or each process its block (memory "
        "divided by the processes; checkpoints written with torch.distributed.checkpoint, resumable at another "
        "number of processes).",
    )
    add(
        "--glofnd-fresh-state",
        action="store_true",
        help="With --resume: start a new GloFND state if none was saved beside the checkpoint (default: error).",
    )


def _add_loss_arguments(add: _AddArgument) -> None:
    """Whether GloFND runs, its target fraction, estimator, detector and the epochs it starts at."""
    add("--glofnd-disable", action="store_true", help="Train with open_clip's own loss and data pipeline, untouched.")
    add(
        "--glofnd-alpha",
        type=float,
        default=1e-3,
        help="Target fraction of each anchor's negatives flagged as false negatives (paper: 5e-4 with sogclr, "
        "1e-3 with fastclip).",
    )
    add(
        "--glofnd-estimator",
        choices=("minibatch", "sogclr", "fastclip"),
        default="minibatch",
        help="Contrastive loss: 'minibatch' (open_clip's ClipLoss with filtered negatives), 'sogclr' (FastCLIP-v1) "
        "or 'fastclip' (FastCLIP-v3, learned temperature).",
    )
    add(
        "--glofnd-detector",
        choices=("glofnd", "fnc", "none"),
        default="glofnd",
        help="False-negative detector: learned global thresholds, FNC's mini-batch quantile, or none.",
    )
    add(
        "--glofnd-treatment",
        choices=("eliminate", "attract"),
        default="eliminate",
        help="What flagged negatives become: removed from the loss (the paper), or extra positives (minibatch "
        "estimator and --siglip).",
    )
    add(
        "--glofnd-start-epoch",
        type=int,
        default=0,
        help="First 0-based epoch in which the thresholds learn (paper: 15 sogclr, 20 fastclip).",
    )
    add(
        "--glofnd-filter-start-epoch",
        type=int,
        default=None,
        help="First epoch in which flagged negatives leave the loss (default: --glofnd-start-epoch).",
    )


def _add_data_arguments(add: _AddArgument) -> None:
    """The size of the per-sample state and the webdataset key list."""
    add(
        "--glofnd-data-size",
        type=int,
        default=None,
        help="Rows of the per-sample state: every sample index must be below it. Default: the CSV row count, "
        "or the length of --glofnd-key-list. Required for webdataset with numeric keys (the largest key + 1; "
        "CC3M via img2dataset: 3318333).",
    )
    add(
        "--glofnd-key-list",
        default=None,
        metavar="FILE",
        help="Webdataset only: a file with one sample __key__ per line; a sample's index is its line number. "
        "Without it, keys must be decimal numbers (img2dataset's).",
    )


def _add_threshold_arguments(add: _AddArgument) -> None:
    """The threshold update rule: a preset and single overrides of it."""
    add(
        "--glofnd-threshold-rule",
        choices=("default", "paper"),
        default="default",
        help="Preset of the threshold update: the package default, or the paper's per-sample Adam (lr 0.05, "
        "epoch-number bias correction).",
    )
    add("--glofnd-threshold-update", choices=("adam", "sgd"), default=None, help="Override the preset's rule.")
    add("--glofnd-threshold-lr", type=float, default=None, help="Override the preset's threshold step size.")
    add("--glofnd-threshold-min-lr", type=float, default=None, help="Override the preset's step-size floor.")
    add(
        "--glofnd-threshold-init",
        choices=("one", "minibatch_quantile"),
        default=None,
        help="Override the preset's initial threshold.",
    )
    add(
        "--glofnd-threshold-decay",
        choices=("constant", "inverse_sqrt"),
        default=None,
        help="Override the preset's per-sample step-size decay.",
    )
    add(
        "--glofnd-threshold-normalize-grad",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Override whether the preset divides the threshold subgradient by alpha.",
    )
    add(
        "--glofnd-threshold-grad-clip",
        type=float,
        default=None,
        help="Override the preset's clip of the (normalised) threshold subgradient.",
    )
    add(
        "--glofnd-threshold-step-unit",
        choices=("similarity", "score_std"),
        default=None,
        help="Override the unit of the threshold step size: cosine units, or the anchor's score standard deviation.",
    )
    add(
        "--glofnd-threshold-stop-at-batch-quantile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Override whether a threshold step stops at the mini-batch quantile (robust to abrupt score "
        "changes; costs a per-row topk every step).",
    )


def _add_estimator_arguments(add: _AddArgument) -> None:
    """The temperature and moving-average settings of the sogclr and fastclip estimators."""
    add("--glofnd-temperature", type=float, default=0.03, help="Fixed temperature of --glofnd-estimator sogclr.")
    add("--glofnd-rho", type=float, default=6.5, help="FastCLIP-v3's temperature penalty (fastclip).")
    add(
        "--glofnd-gamma",
        type=float,
        default=None,
        help="Constant moving-average weight of u (sogclr, fastclip) instead of the cosine schedule.",
    )
    add("--glofnd-gamma-min", type=float, default=0.2, help="Final gamma of the cosine schedule.")
    add("--glofnd-gamma-decay-epochs", type=int, default=18, help="Length of the gamma schedule in epochs.")


def glofnd_parser() -> argparse.ArgumentParser:
    """A parser of the ``--glofnd-*`` flags alone, for ``parse_known_args`` before open_clip's parser."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, usage=argparse.SUPPRESS)
    add_glofnd_arguments(parser)
    return parser


def is_enabled(args: argparse.Namespace) -> bool:
    """Whether GloFND is active for these parsed arguments."""
    return not getattr(args, "glofnd_disable", True)


# ---------------------------------------------------------------------------------------------- the loss
def threshold_optimizer_from_args(args: argparse.Namespace) -> ThresholdOptimizer:
    """The threshold update rule: the ``--glofnd-threshold-rule`` preset with the given overrides.

    Examples:
        >>> import argparse
        >>> parser = argparse.ArgumentParser()
        >>> add_glofnd_arguments(parser)
        >>> args = parser.parse_args(["--glofnd-threshold-rule", "paper", "--glofnd-threshold-lr", "0.02"])
        >>> threshold_optimizer_from_args(args).lr, threshold_optimizer_from_args(args).bias_correction
        (0.02, 'epoch')
    """
    preset = ThresholdOptimizer.paper() if args.glofnd_threshold_rule == "paper" else ThresholdOptimizer.default()
    overrides = {field: getattr(args, dest) for dest, field in _THRESHOLD_OVERRIDES.items()}
    return dataclasses.replace(preset, **{field: value for field, value in overrides.items() if value is not None})


def create_glofnd_loss(args: argparse.Namespace, num_samples: int | None = None) -> ImageTextLossBase:
    """The loss the ``--glofnd-*`` flags describe (on the CPU).

    :class:`~glofnd_losses.GloFNDSigLipLoss` with open_clip's ``--siglip`` (and its
    ``--loss-dist-impl``), else :class:`~glofnd_losses.GloFNDClipLoss` with ``--glofnd-estimator``.

    Args:
        args: Parsed arguments with the ``glofnd_*`` attributes.
        num_samples: State size; default ``args.glofnd_data_size``.

    Raises:
        ValueError: An invalid option, or no state size known.
    """
    size = args.glofnd_data_size if num_samples is None else num_samples
    if size is None:
        raise ValueError("the GloFND state size is unknown: pass --glofnd-data-size")
    common = {
        "num_samples": size,
        "alpha": args.glofnd_alpha,
        "start_epoch": args.glofnd_start_epoch,
        "detector": None if args.glofnd_detector == "none" else args.glofnd_detector,
        "threshold_optimizer": threshold_optimizer_from_args(args),
        "filter_start_epoch": args.glofnd_filter_start_epoch,
        "treatment": args.glofnd_treatment,
        "state_sharding": getattr(args, "glofnd_state_sharding", "replicated"),
    }
    if getattr(args, "siglip", False):
        if args.glofnd_estimator != "minibatch":
            raise ValueError(
                f"--glofnd-estimator {args.glofnd_estimator} is for CLIP's softmax loss; with --siglip the loss is "
                "SigLIP's sigmoid loss with GloFND (leave --glofnd-estimator at minibatch)"
            )
        return GloFNDSigLipLoss(**common, dist_impl=getattr(args, "loss_dist_impl", None))
    return GloFNDClipLoss(
        **common,
        estimator=args.glofnd_estimator,
        temperature=args.glofnd_temperature,
        rho=args.glofnd_rho,
        gamma=args.glofnd_gamma,
        gamma_min=args.glofnd_gamma_min,
        gamma_decay_epochs=args.glofnd_gamma_decay_epochs,
    )


def loss_kind(loss: ImageTextLossBase) -> str:
    """``"siglip"``, or the CLIP loss's estimator: what a saved state must match on resume."""
    return "siglip" if isinstance(loss, GloFNDSigLipLoss) else str(getattr(loss, "estimator", type(loss).__name__))


# ---------------------------------------------------------------------------------------------- the training data
def dataset_kind(args: argparse.Namespace) -> str:
    """``"csv"``, ``"webdataset"`` or ``"synthetic"``, resolved as open_clip resolves it."""
    build = oc_data.get_dataset_fn(args.train_data, args.dataset_type)
    kinds = {oc_data.get_csv_dataset: "csv", oc_data.get_wds_dataset: "webdataset"}
    return kinds.get(build, "synthetic")


def key_index_from_args(args: argparse.Namespace) -> SampleKeyIndex:
    """The webdataset key mapping of the ``--glofnd-*`` flags."""
    if args.glofnd_key_list is not None:
        return SampleKeyIndex.from_file(args.glofnd_key_list, args.glofnd_data_size)
    return SampleKeyIndex(args.glofnd_data_size)


def _check_data_size(args: argparse.Namespace, num_rows: int) -> None:
    """Refuse an explicit ``--glofnd-data-size`` smaller than the training data's ``num_rows``."""
    if args.glofnd_data_size < num_rows:
        raise ValueError(
            f"--glofnd-data-size {args.glofnd_data_size} is smaller than the {num_rows} rows of {args.train_data}: "
            "every row index must fit in the GloFND state"
        )


def resolve_data_size(args: argparse.Namespace, num_rows: int) -> None:
    """Default ``args.glofnd_data_size`` to ``num_rows``; refuse a smaller explicit size."""
    if args.glofnd_data_size is None:
        args.glofnd_data_size = num_rows
    _check_data_size(args, num_rows)


# ---------------------------------------------------------------------------------------------- the checks
def check_supported(args: argparse.Namespace) -> None:
    """Refuse set-ups the GloFND loss cannot serve (call on open_clip's parsed arguments).

    Raises:
        ValueError: With what to change.
    """
    _check_training_mode(args)
    if args.train_data is None and args.dataset_type != "synthetic":
        return
    _check_training_data(args, dataset_kind(args))
    create_glofnd_loss(args, num_samples=1)  # validates every other loss option without allocating the state


def _check_training_mode(args: argparse.Namespace) -> None:
    """Refuse open_clip's modes whose loss GloFND does not replace."""
    problems = [
        (
            bool(args.distill_model and args.distill_pretrained),
            "distillation (--distill-model)",
            "it trains with open_clip's DistillClipLoss, which matches the teacher's logits: another objective "
            "than the contrastive loss GloFND filters",
        ),
        (
            is_coca(args) and args.siglip,
            "--siglip with a CoCa model",
            "open_clip trains CoCa models with CoCaLoss, CLIP's softmax loss plus the caption term, whatever --siglip "
            "says",
        ),
        (args.horovod, "--horovod", "the GloFND losses communicate through torch.distributed"),
    ]
    for present, what, why in problems:
        if present:
            raise ValueError(
                f"GloFND does not support {what}: {why}. Pass --glofnd-disable to train with open_clip's own loss."
            )


def is_coca(args: argparse.Namespace) -> bool:
    """Whether open_clip trains this model with its CoCa loss (its own test: the model name)."""
    return "coca" in str(args.model).lower()


def _check_training_data(args: argparse.Namespace, kind: str) -> None:
    """Refuse training data whose samples cannot be given stable indices below the state size."""
    if kind == "synthetic":
        raise ValueError("GloFND needs real samples with stable identities: use a CSV or webdataset --train-data")
    if kind == "webdataset" and "::" in args.train_data:
        raise ValueError(
            "GloFND does not support several webdataset sources joined with '::' in --train-data: the sample "
            "index comes from __key__, and img2dataset numbers every source's keys from 0, so samples of two "
            "sources would share GloFND state rows; write the sources as one set of shards with unique keys"
        )
    if args.glofnd_key_list is not None and kind != "webdataset":
        raise ValueError("--glofnd-key-list applies to webdataset training data only")
    if args.glofnd_key_list is not None:
        if not os.path.isfile(args.glofnd_key_list):
            raise ValueError(f"--glofnd-key-list: no such file {args.glofnd_key_list!r}")
        key_index_from_args(args)  # duplicate keys, more keys than --glofnd-data-size: refused before any write
    if kind == "webdataset" and args.glofnd_data_size is None and args.glofnd_key_list is None:
        raise ValueError(
            "webdataset training needs --glofnd-data-size (the largest numeric sample key + 1; 3318333 for CC3M "
            "downloaded with img2dataset) or --glofnd-key-list FILE"
        )
    if args.glofnd_data_size is not None and args.glofnd_data_size < 1:
        raise ValueError(f"--glofnd-data-size must be positive, got {args.glofnd_data_size}")
    if kind == "csv" and args.glofnd_data_size is not None and os.path.isfile(args.train_data):
        # Before open_clip creates the run's log folder (a rerun under the same --name is refused).
        import pandas

        rows = len(pandas.read_csv(args.train_data, sep=args.csv_separator, usecols=[args.csv_img_key]))
        _check_data_size(args, rows)
