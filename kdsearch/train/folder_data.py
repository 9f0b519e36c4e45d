"""Image folders: one file per image, decoded where the batch is made.

On the CPU (and for files that are not JPEG) DataLoader workers read, decode
(`torchvision.io.decode_image`) and make each view with the same seeded functions as in-memory
data (`ViewTransform.view_of`). On a CUDA device the workers only read the files' bytes and the
trial's process decodes each batch's JPEGs at once on the device (`torchvision.io.decode_jpeg`,
nvJPEG), then makes the views there, one image at a time (their sizes differ).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from kdsearch.train.augment import ViewTransform
from kdsearch.train.splits import CPU, Batch

JPEG_MAGIC = b"\xff\xd8\xff"
DEPRECATED = (
    "The image decoding and encoding capabilities"  # torchvision 0.29's notice of TorchCodec; nvJPEG is behind these
)


@contextmanager
def quiet_decoding() -> Iterator[None]:
    """A context without torchvision's deprecation notice of its decoders (every call warns)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=DEPRECATED, category=DeprecationWarning)
        yield


def read_image(data: Tensor) -> Tensor:
    """uint8 (3, H, W) of an encoded image's bytes (any format torchvision reads), on the CPU."""
    from torchvision.io import ImageReadMode, decode_image

    with quiet_decoding():
        return decode_image(data, mode=ImageReadMode.RGB)


class FolderSplit(Dataset):
    """(path, label) samples and the transform of their views. Items are `i` or `(i, seed)` (an
    `EpochSampler`'s); with `decode_on` a CUDA device they are the file's bytes, decoded by `finish`."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: ViewTransform):
        self.samples, self.transform = list(samples), transform
        self.decode_on: torch.device | None = None
        if transform.augment:
            plain = ViewTransform(transform.size, transform.mean, transform.std, augment=False)
            self.plain = FolderSplit(self.samples, plain)

    def __len__(self) -> int:
        return len(self.samples)

    def place(self, device: torch.device) -> None:
        """Decode on `device` when it is CUDA (nvJPEG), else in the loader's workers."""
        self.decode_on = device if device.type == "cuda" else None
        if hasattr(self, "plain"):
            self.plain.place(device)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple:
        from torchvision.io import read_file

        i, seed = item if isinstance(item, tuple) else (item, None)
        path, label = self.samples[i]
        with quiet_decoding():
            data = read_file(path)
        if self.decode_on is not None:
            return data, label, i, -1 if seed is None else seed
        return self.transform.view_of(read_image(data), seed if self.transform.augment else None), label, i

    @staticmethod
    def collate(items: list[tuple]) -> tuple:
        """Decoded views stacked as a Batch; raw bytes kept as a list (decoded by `finish`)."""
        if len(items[0]) == 4:
            data, labels, idx, seeds = zip(*items)
            return list(data), torch.tensor(labels), torch.tensor(idx), np.array(seeds, dtype=np.int64)
        x, labels, idx = default_collate(items)
        return x, labels, idx

    def finish(self, batch: tuple) -> Batch:
        """A Batch from what the loader gave: decoded here on the device when they are bytes."""
        if len(batch) == 3:
            return batch
        data, labels, idx, seeds = batch
        images = decode_batch(data, self.decode_on or CPU)
        views = [self.transform.view_of(img, None if s < 0 or not self.transform.augment else int(s))
                 for img, s in zip(images, seeds)]  # fmt: skip
        return torch.stack(views), labels, idx

    def views(self, idx: Tensor, seeds: np.ndarray | None, device: torch.device = CPU) -> Tensor:
        """The views of images `idx` (from `seeds`, aligned with idx), made as training makes them."""
        items = (
            [self[(int(i), int(s))] for i, s in zip(idx, seeds)] if seeds is not None else [self[int(i)] for i in idx]
        )
        return self.finish(self.collate(items))[0].to(device)


def decode_batch(data: list[Tensor], device: torch.device) -> list[Tensor]:
    """uint8 (3, H, W) images from encoded bytes: the JPEGs decoded together on `device` when it
    is CUDA (nvJPEG), every other file (and every file on the CPU) by `read_image`."""
    from torchvision.io import ImageReadMode, decode_jpeg

    jpeg = [i for i, d in enumerate(data) if device.type == "cuda" and bytes(d[:3].tolist()) == JPEG_MAGIC]
    out: list[Tensor | None] = [None] * len(data)
    if jpeg:
        with quiet_decoding():
            decoded = decode_jpeg([data[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
        for i, img in zip(jpeg, decoded):
            out[i] = img
    for i, d in enumerate(data):
        if out[i] is None:
            out[i] = read_image(d).to(device)
    return out  # type: ignore[return-value]
