"""A tiny CLIP trained from scratch with GloFNDClipLoss (or GloFNDSigLipLoss), with accelerate.

CAPTIONS COME FROM THE LABELS. There is no image-caption data set that installs offline, so each
image is paired with one caption written from its class name with a fixed template ("a photo of
the digit seven", "handwritten 7", ...). Two pairs of the same class are therefore semantically
matching pairs that CLIP's loss treats as negatives: the same-class pairs are *exactly* the
ground-truth false negatives, and ``fn_precision`` / ``fn_recall`` in the logs measure how many
of them GloFND finds. Labels are used for captions and for those metrics only.

Model: a small CNN image tower, a bag-of-words text tower over the captions' tiny vocabulary (no
tokenizer download) and a learnable ``logit_scale``, as in CLIP. Loss:
:class:`glofnd_losses.GloFNDClipLoss` with ``--estimator minibatch`` (open_clip's ClipLoss with
filtered negatives), ``sogclr`` (FastCLIP-v1) or ``fastclip`` (FastCLIP-v3, learned temperature);
with ``--loss siglip``, :class:`glofnd_losses.GloFNDSigLipLoss` (open_clip's SigLipLoss with
filtered negatives) and a learnable ``logit_bias``, initialised as open_clip's SigLIP models
(``logit_scale = log 10``, ``logit_bias = -10``).

Commands (docs/examples.md has them all)::

    python examples/train_clip.py --max-steps 20                                      # 1 process
    python examples/train_clip.py --max-steps 20 --loss siglip                        # SigLIP
    accelerate launch --multi_gpu --num_processes 2 examples/train_clip.py ...        # 2 processes, CPU
    accelerate launch --num_processes 8 examples/train_clip.py ...                    # 8 GPUs
"""

from __future__ import annotations

import argparse
import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from accelerate.utils import set_seed
from accelerate_common import (
    EpochDataset,
    Training,
    add_common_arguments,
    describe_run,
    fit,
    glofnd_arguments,
    make_accelerator,
    view_transform,
)
from offline_data import ImageSplit, load_train_split
from torch import nn
from torch.utils.data import DataLoader

from glofnd_losses import GloFNDClipLoss, GloFNDSigLipLoss
from glofnd_losses.base import GloFNDLossBase

CAPTION_NOTE = (
    "Captions are generated from the class labels, so same-class pairs are exactly the ground-truth "
    "false negatives (fn_precision / fn_recall measure how many GloFND finds)."
)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = (
    "a photo of the digit {word}",
    "handwritten {numeral}",
    "the number {word}",
    "a handwritten {word}",
    "an image of the numeral {numeral}",
    "a scan of the digit {numeral}",
)
CLASS_TEMPLATES = (
    "a photo of a {word}",
    "a picture of the {word}",
    "an image of a {word}",
    "a small photo of a {word}",
    "a {word}",
)
PAD = "<pad>"
MAX_LOGIT_SCALE = math.log(100.0)
LOSS_CLASSES: dict[str, type[GloFNDLossBase]] = {"clip": GloFNDClipLoss, "siglip": GloFNDSigLipLoss}
CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)  # open_clip_train's init_logit_scale for SigLIP
SIGLIP_INIT_LOGIT_BIAS = -10.0  # open_clip_train's init_logit_bias for SigLIP
DEFAULT_ESTIMATOR = "fastclip"
DEFAULT_TREATMENT = "eliminate"


# ------------------------------------------------------------------------------------------------ captions
def class_captions(class_names: Sequence[str]) -> list[list[str]]:
    """Caption variants per class: digit templates for ``"0"``..``"9"``, generic ones otherwise.

    Examples:
        >>> class_captions(["7"])[0][:2]
        ['a photo of the digit seven', 'handwritten 7']
        >>> class_captions(["ankle boot"])[0][0]
        'a photo of a ankle boot'
    """
    captions = []
    for name in class_names:
        if name.isdigit() and len(name) == 1:
            captions.append([t.format(word=DIGIT_WORDS[int(name)], numeral=name) for t in DIGIT_TEMPLATES])
        else:
            captions.append([t.format(word=name) for t in CLASS_TEMPLATES])
    return captions


class Vocabulary:
    """Whitespace tokens of a fixed set of captions; id 0 pads.

    Args:
        captions: Every caption the data set uses.

    Examples:
        >>> vocabulary = Vocabulary(["handwritten 7", "the number seven"])
        >>> vocabulary.encode(["handwritten 7", "the number seven"]).tolist()
        [[2, 1, 0], [5, 3, 4]]
    """

    def __init__(self, captions: Sequence[str]) -> None:
        words = sorted({word for caption in captions for word in caption.split()})
        self.index = {word: position for position, word in enumerate([PAD, *words])}

    def __len__(self) -> int:
        return len(self.index)

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """``(n, max_words)`` int64 token ids, right-padded with 0."""
        ids = [[self.index[word] for word in caption.split()] for caption in captions]
        tokens = torch.zeros(len(ids), max(len(row) for row in ids), dtype=torch.int64)
        for row, caption_ids in enumerate(ids):
            tokens[row, : len(caption_ids)] = torch.tensor(caption_ids)
        return tokens


def caption_items(labels: torch.Tensor, class_names: Sequence[str], seed: int) -> tuple[list[str], Vocabulary]:
    """One fixed caption per item (a seeded choice of its class's templates) and the vocabulary."""
    variants = class_captions(class_names)
    choice = torch.randint(0, 1 << 30, (labels.shape[0],), generator=torch.Generator().manual_seed(seed))
    captions = [variants[label][pick % len(variants[label])] for label, pick in zip(labels.tolist(), choice.tolist())]
    return captions, Vocabulary([caption for options in variants for caption in options])


class CaptionedImages(EpochDataset):
    """Items ``(image_view, tokens, label, index)``: a random view of an image and its caption.

    Args:
        split: Images and labels.
        tokens: ``(N, L)`` token ids of each item's caption.
        transform: Random view of one uint8 ``(C, H, W)`` image.
        seed: Augmentation seed.

    Examples:
        >>> import torch
        >>> from offline_data import ImageSplit
        >>> split = ImageSplit(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.tensor([4, 7]))
        >>> data = CaptionedImages(split, torch.tensor([[1, 2], [3, 0]]), lambda image: image.float())
        >>> image, tokens, label, index = data[1]
        >>> tokens.tolist(), int(label), index
        ([3, 0], 7, 1)
    """

    def __init__(self, split: ImageSplit, tokens: torch.Tensor, transform: Any, seed: int = 0) -> None:
        super().__init__(split, transform, seed)
        self.tokens = tokens

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        (view,) = self.views(index, 1)
        return view, self.tokens[index], self.split.labels[index], index


# ------------------------------------------------------------------------------------------------ model
def conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class TinyClip(nn.Module):
    """CLIP in miniature: CNN image tower, bag-of-words text tower, learnable ``logit_scale``.

    Args:
        in_chans: Image channels.
        vocab_size: Number of token ids (0 pads).
        embed_dim: Shared embedding size.
        width: Base width of the image tower.
        init_logit_scale: Initial ``logit_scale`` (the log of the inverse temperature).
        init_logit_bias: Initial learnable ``logit_bias`` (SigLIP); None: the model has none.

    Examples:
        >>> import torch
        >>> model = TinyClip(in_chans=1, vocab_size=10, embed_dim=8)
        >>> images, texts, scale = model(torch.randn(2, 1, 28, 28), torch.tensor([[1, 2], [3, 0]]))
        >>> images.shape, texts.shape, round(float(scale.detach()), 2)
        (torch.Size([2, 8]), torch.Size([2, 8]), 14.29)
        >>> siglip = TinyClip(1, 10, 8, init_logit_scale=SIGLIP_INIT_LOGIT_SCALE, init_logit_bias=-10.0)
        >>> *_, scale, bias = siglip(torch.randn(2, 1, 28, 28), torch.tensor([[1, 2], [3, 0]]))
        >>> round(float(scale.detach()), 2), float(bias.detach())
        (10.0, -10.0)
    """

    def __init__(
        self,
        in_chans: int,
        vocab_size: int,
        embed_dim: int = 64,
        width: int = 32,
        init_logit_scale: float = CLIP_INIT_LOGIT_SCALE,
        init_logit_bias: float | None = None,
    ) -> None:
        super().__init__()
        self.image_tower = nn.Sequential(
            conv_block(in_chans, width, 1),
            conv_block(width, 2 * width, 2),
            conv_block(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * width, embed_dim),
        )
        self.word_embedding = nn.EmbeddingBag(vocab_size, 4 * width, mode="mean", padding_idx=0)
        self.text_head = nn.Sequential(nn.ReLU(), nn.Linear(4 * width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = None if init_logit_bias is None else nn.Parameter(torch.tensor(float(init_logit_bias)))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Normalised image and text features, ``exp(logit_scale)`` and ``logit_bias`` if the model has one.

        As open_clip's models return them: three tensors, or four with a ``logit_bias`` (SigLIP).
        """
        image_features = nn.functional.normalize(self.image_tower(images), dim=-1)
        text_features = nn.functional.normalize(self.text_head(self.word_embedding(tokens)), dim=-1)
        if self.logit_bias is None:
            return image_features, text_features, self.logit_scale.exp()
        return image_features, text_features, self.logit_scale.exp(), self.logit_bias


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train_clip.py",
        description="A tiny CLIP with GloFNDClipLoss on MNIST digits paired with captions. " + CAPTION_NOTE,
    )
    add_common_arguments(parser, epochs=20, batch_size=128, lr=2e-3)
    model = parser.add_argument_group("model and loss")
    model.add_argument(
        "--loss",
        choices=sorted(LOSS_CLASSES),
        default="clip",
        help="clip: GloFNDClipLoss; siglip: GloFNDSigLipLoss with a learnable logit_bias (init -10) and "
        "logit_scale init log(10), as open_clip's SigLIP models",
    )
    model.add_argument(
        "--estimator",
        choices=("fastclip", "sogclr", "minibatch"),
        default=DEFAULT_ESTIMATOR,
        help="GloFNDClipLoss's estimator (--loss clip only)",
    )
    model.add_argument(
        "--treatment",
        choices=("eliminate", "attract"),
        default=DEFAULT_TREATMENT,
        help="what becomes of flagged negatives (attract: needs a loss that accepts treatment=)",
    )
    model.add_argument("--embed-dim", type=int, default=64)
    model.add_argument("--width", type=int, default=32, help="image tower base width")
    model.add_argument("--temperature", type=float, default=0.03, help="fixed temperature of --estimator sogclr")
    args = parser.parse_args(argv)
    check_loss_options(parser, args)
    return args


def accepts_treatment(loss_class: type[GloFNDLossBase]) -> bool:
    """Whether ``loss_class``'s constructor takes a ``treatment`` keyword.

    Examples:
        >>> isinstance(accepts_treatment(GloFNDSigLipLoss), bool)
        True
    """
    return "treatment" in inspect.signature(loss_class).parameters


def check_loss_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse flags the chosen loss cannot honour (exits with an argparse error).

    Args:
        parser: The script's parser (for ``parser.error``).
        args: The parsed flags.
    """
    if args.loss == "siglip" and args.estimator != DEFAULT_ESTIMATOR:
        parser.error(f"--estimator {args.estimator} applies to --loss clip only (SigLIP has no estimator)")
    loss_class = LOSS_CLASSES[args.loss]
    if args.treatment != DEFAULT_TREATMENT and not accepts_treatment(loss_class):
        parser.error(
            f"--treatment {args.treatment}: this version of {loss_class.__name__} takes no treatment= "
            f"argument (only --treatment {DEFAULT_TREATMENT} is available)"
        )


def make_model(args: argparse.Namespace, in_chans: int, vocab_size: int) -> TinyClip:
    """The model of ``--loss``: SigLIP's gets open_clip's SigLIP initial scale and a bias."""
    if args.loss == "siglip":
        return TinyClip(
            in_chans, vocab_size, args.embed_dim, args.width, SIGLIP_INIT_LOGIT_SCALE, SIGLIP_INIT_LOGIT_BIAS
        )
    return TinyClip(in_chans, vocab_size, args.embed_dim, args.width)


def make_loss(args: argparse.Namespace, num_samples: int) -> GloFNDLossBase:
    """The GloFND loss of ``--loss`` with the GloFND group's flags (and ``--treatment`` where accepted).

    Args:
        args: The parsed flags (already checked by :func:`check_loss_options`).
        num_samples: Number of image-caption pairs.
    """
    options = glofnd_arguments(args)
    if accepts_treatment(LOSS_CLASSES[args.loss]):
        options["treatment"] = args.treatment
    if args.loss == "siglip":
        return GloFNDSigLipLoss(num_samples=num_samples, **options)
    return GloFNDClipLoss(num_samples=num_samples, estimator=args.estimator, temperature=args.temperature, **options)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train; return :func:`accelerate_common.fit`'s summary."""
    args = parse_args(argv)
    accelerator = make_accelerator()
    set_seed(args.seed)
    split, class_names = load_train_split(args)
    captions, vocabulary = caption_items(split.labels, class_names, args.seed)
    transform = view_transform(split.images, scale=(0.7, 1.0))
    dataset = CaptionedImages(split, vocabulary.encode(captions), transform, seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers)
    model = make_model(args, split.images.shape[1], len(vocabulary))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    loss = make_loss(args, len(dataset))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    loss_name = f"loss {args.loss}" + (f", estimator {args.estimator}" if args.loss == "clip" else "")
    describe_run(
        accelerator,
        args,
        f"{len(dataset)} {args.data} images, {len(vocabulary)} words, {loss_name}, "
        f'e.g. "{captions[0]}". {CAPTION_NOTE}',
    )
    unwrapped = accelerator.unwrap_model(model)
    logit_scale, logit_bias = unwrapped.logit_scale, unwrapped.logit_bias

    def compute_loss(batch: Any) -> torch.Tensor:
        images, tokens, labels, indices = batch
        outputs = model(images, tokens)  # (image_features, text_features, scale[, bias])
        out = loss(*outputs, output_dict=True, indices=indices, labels=labels)
        value: torch.Tensor = out["contrastive_loss"]
        return value

    def clamp_logit_scale() -> None:
        with torch.no_grad():
            logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    def temperature() -> dict[str, torch.Tensor]:
        stats = {"temperature": 1.0 / logit_scale.detach().exp()}
        return stats if logit_bias is None else {**stats, "logit_bias": logit_bias.detach()}

    training = Training(
        model, optimizer, loader, dataset, loss, compute_loss, after_step=clamp_logit_scale, extra_stats=temperature
    )
    summary = fit(accelerator, args, training)
    accelerator.print(f"done: step {summary['step']}, last metrics {summary['metrics']}. {CAPTION_NOTE}")
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main()
