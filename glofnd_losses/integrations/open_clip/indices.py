"""Each training sample's stable index into the GloFND state, from open_clip's data to the loss.

* CSV: :class:`IndexedCsvDataset` yields the row number with each item.
* Webdataset: :class:`SampleKeyIndex` maps a sample's ``__key__`` to an int, which
  :class:`IndexedWebdataset` adds to the tuples of the train pipeline's ``to_tuple`` stage.
* :class:`IndexStrippingLoader` hands open_clip's training loop the ``(images, texts)`` it expects
  and keeps each batch's indices for the loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import open_clip_train.data as oc_data
import torch
import webdataset

__all__ = ["IndexStrippingLoader", "IndexedCsvDataset", "IndexedWebdataset", "SampleKeyIndex"]

_INDEX_FIELD = "__glofnd_index__"


class IndexedCsvDataset(oc_data.CsvDataset):
    r"""open_clip's ``CsvDataset`` whose items also carry their row number: ``(image, text, row)``.

    The row number (0-based, header excluded) is the sample's stable index into the GloFND state.

    Examples:
        >>> import pathlib, tempfile
        >>> from PIL import Image
        >>> folder = tempfile.TemporaryDirectory()
        >>> image = pathlib.Path(folder.name) / "cat.png"
        >>> Image.new("RGB", (4, 4)).save(image)
        >>> _ = (pathlib.Path(folder.name) / "train.csv").write_text(f"filepath\ttitle\n{image}\ta cat\n")
        >>> data = IndexedCsvDataset(
        ...     f"{folder.name}/train.csv", lambda im: im.size, img_key="filepath", caption_key="title",
        ...     tokenizer=lambda texts: texts,
        ... )
        >>> data[0]
        ((4, 4), 'a cat', 0)
        >>> folder.cleanup()
    """

    def __getitem__(self, idx: int) -> tuple[Any, Any, int]:
        image, text = super().__getitem__(idx)
        return image, text, int(idx)


class SampleKeyIndex:
    """Maps a webdataset sample's ``__key__`` to its row in the GloFND state.

    Without ``keys``, a key must be a decimal number (img2dataset writes
    ``shard * samples_per_shard + offset``, zero-padded) and the number is the index. With ``keys``
    (a precomputed list of every key of the data set), a key's index is its position in the list.
    Either way an index must be below ``num_samples``. Picklable and compact (a sorted byte array,
    not a dict), for data loader workers.

    Args:
        num_samples: Size of the GloFND state.
        keys: Every sample key, in index order; unique.

    Raises:
        ValueError: Duplicate keys, or more keys than ``num_samples``.

    Examples:
        >>> SampleKeyIndex(num_samples=100)("000000042")
        42
        >>> SampleKeyIndex(num_samples=3, keys=["b", "c", "a"])("a")
        2
        >>> SampleKeyIndex(num_samples=100)("cat_01")
        Traceback (most recent call last):
        ...
        ValueError: webdataset sample key 'cat_01' is not a decimal number, so it cannot index the GloFND state. ...
    """

    def __init__(self, num_samples: int, keys: Sequence[str] | None = None) -> None:
        self.num_samples = int(num_samples)
        self._sorted_keys: np.ndarray | None = None
        self._positions: np.ndarray | None = None
        if keys is not None:
            if len(keys) > self.num_samples:
                raise ValueError(f"the key list has {len(keys)} keys but --glofnd-data-size is {self.num_samples}")
            encoded = np.array([key.encode() for key in keys], dtype=np.bytes_)
            order = np.argsort(encoded, kind="stable")
            self._sorted_keys, self._positions = encoded[order], order
            duplicate = np.flatnonzero(self._sorted_keys[1:] == self._sorted_keys[:-1])
            if duplicate.size:
                raise ValueError(f"duplicate key {self._sorted_keys[duplicate[0]].decode()!r} in the key list")

    @classmethod
    def from_file(cls, path: str, num_samples: int | None = None) -> SampleKeyIndex:
        """Read one key per line; ``num_samples`` defaults to the number of keys."""
        with open(path, encoding="utf-8") as file:
            keys = [line.rstrip("\r\n") for line in file]
        return cls(len(keys) if num_samples is None else num_samples, keys)

    def __len__(self) -> int:
        return self.num_samples

    def __call__(self, key: str) -> int:
        index = self._numeric(key) if self._sorted_keys is None else self._listed(key)
        if index >= self.num_samples:
            raise ValueError(
                f"webdataset sample key {key!r} has index {index}, outside the GloFND state of {self.num_samples} "
                "rows: raise --glofnd-data-size above the largest sample index"
            )
        return index

    @staticmethod
    def _numeric(key: str) -> int:
        if not (key.isascii() and key.isdigit()):
            raise ValueError(
                f"webdataset sample key {key!r} is not a decimal number, so it cannot index the GloFND state. "
                "img2dataset writes numeric keys; for other data sets pass --glofnd-key-list FILE (every key, "
                "one per line; the line number is the index)"
            )
        return int(key)

    def _listed(self, key: str) -> int:
        assert self._sorted_keys is not None and self._positions is not None
        encoded = np.bytes_(key.encode())
        position = int(np.searchsorted(self._sorted_keys, encoded))
        if position == len(self._sorted_keys) or self._sorted_keys[position] != encoded:
            raise ValueError(f"webdataset sample key {key!r} is not in --glofnd-key-list")
        return int(self._positions[position])


@dataclasses.dataclass(frozen=True)
class _IndexedToTuple:
    """Pipeline stage replacing ``wds.to_tuple(*fields)``: the same tuples plus the sample index."""

    fields: tuple[str, ...]
    options: Mapping[str, Any]
    key_index: SampleKeyIndex

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[tuple[Any, ...]]:
        to_tuple = webdataset.to_tuple(*self.fields, _INDEX_FIELD, **self.options)
        return to_tuple(self._with_index(samples))

    def _with_index(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in samples:
            sample[_INDEX_FIELD] = self.key_index(sample["__key__"])
            yield sample


class IndexedWebdataset:
    """Stands in for the ``webdataset`` module inside ``open_clip_train.data`` (train split only).

    Args:
        key_index: The mapping of sample keys to state rows.
    """

    def __init__(self, key_index: SampleKeyIndex) -> None:
        self._key_index = key_index

    def __getattr__(self, name: str) -> Any:
        return getattr(webdataset, name)

    def to_tuple(self, *fields: str, **options: Any) -> _IndexedToTuple:
        return _IndexedToTuple(fields, options, self._key_index)


class IndexStrippingLoader:
    """Yields ``(images, texts)`` from an indexed loader and keeps the batches' indices for the loss.

    Args:
        loader: open_clip's train data loader, built with the indexed data sets (batches
            ``(images, texts, indices)``).
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.num_batches = loader.num_batches
        self.num_samples = loader.num_samples
        self._pending: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for batch in self.loader:
            if len(batch) != 3:
                raise RuntimeError(
                    "expected (images, texts, indices) batches: the train data was not built by the GloFND get_data"
                )
            images, texts, indices = batch
            self._pending.append(torch.as_tensor(indices))
            yield images, texts

    def take_indices(self, batches: int = 1) -> torch.Tensor:
        """The indices of the ``batches`` batches yielded since the last take, in order.

        ``batches`` is open_clip's ``accum_freq``: its loop loads that many batches before it calls
        the loss on all of them. Each batch's indices can be taken once.
        """
        if len(self._pending) != batches:
            raise RuntimeError(
                f"the loss was called for {batches} batch(es) but {len(self._pending)} were loaded since its last "
                "step: the loss was called more often than open_clip's loop does (or before the first batch)"
            )
        indices, self._pending = torch.cat(self._pending), []
        return indices
