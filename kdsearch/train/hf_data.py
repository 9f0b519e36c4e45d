"""Hugging Face datasets (`data: {name: hf, path: ...}`): a hub id, a folder written by
`datasets`' `save_to_disk`, or Parquet files, decoded once into one uint8 tensor.

`datasets` is an optional extra (`pip install 'kdsearch[hf]'`); without it every load is one
line naming that command. The columns and splits are found or stated (`data.image_column`,
`data.label_column`, `data.train_split`, `data.test_split`):

- the image column is the first `Image` feature, else a column named image or img;
- the label column is the `ClassLabel` feature, else a column named label or labels (its
  classes are then its distinct values, sorted);
- the train split is "train"; the test split is "test", else "validation", else "val", else a
  stratified data.test_fraction of the train split, held out before train and val are carved.

Every image is decoded once (PIL), converted to RGB (in_chans 3), and kept at its own size when
all of a split's images share one square size no larger than data.img_size (the trial's device
resizes them); otherwise each is resized, shorter side to data.img_size, and center-cropped to
img_size x img_size (as the image folders' transform does). A split whose decoded tensor would
pass `MAX_DECODED_BYTES` is refused in one line, before any pixel is decoded.

The train split goes to `in_memory_data` (val carved from it there); the test split is read only
by `read_hf_test`, for `kdsearch.train.data.load_test` (`eval`, `export`, `confirm`): a search
never decodes it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdsearch.errors import KdsearchError
from kdsearch.space.specs import DataSpec
from kdsearch.train.memory_data import IMAGENET_MEAN, IMAGENET_STD, SPLIT_SEED, content_hash, fingerprint, stratified

MAX_DECODED_BYTES = 16 * 2**30  # one split's decoded uint8 tensor: above it, an image folder (read per batch) fits
INSTALL = "pip install 'kdsearch[hf]'"
TEST_SPLITS = ("test", "validation", "val")  # the test split found, in this order, when data.test_split is null


@dataclass(frozen=True)
class Source:
    """A dataset's splits and what a space reads of them: the columns, the train and test split
    names (test None: carved from train), and the classes (names, in label order)."""

    splits: dict[str, Any]  # split name -> datasets.Dataset
    image: str
    label: str
    train: str
    test: str | None
    classes: tuple[str, ...]
    class_label: bool  # the label column is a ClassLabel (its values are the class indices)


def datasets_module() -> Any:
    """The `datasets` package. Raises KdsearchError (the pip command) when it is not installed."""
    try:
        import datasets
    except ImportError:
        raise KdsearchError(
            f"data.name: hf reads Hugging Face datasets with the `datasets` package, which is not installed; {INSTALL}"
        ) from None
    return datasets


def is_saved_folder(path: Path) -> bool:
    """Whether `path` is a folder written by `save_to_disk` (a DatasetDict's or a Dataset's)."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
    )


def open_splits(spec: DataSpec) -> dict[str, Any]:
    """The splits of the dataset at data.path (nothing decoded: Arrow files, memory-mapped).

    Args:
        spec: The space's data section (`path`: a folder written by save_to_disk, a folder of
            data files or Parquet files (a file or a glob), else a hub id).

    Returns:
        Split name -> `datasets.Dataset`; a saved single Dataset is the split "train".

    Raises:
        KdsearchError: No path, no `datasets`, or the dataset cannot be loaded (one line).
    """
    if not spec.path:
        raise KdsearchError(
            "data.path: hf needs a path: a hub id (beans), a folder written by save_to_disk, or Parquet files"
        )
    ds = datasets_module()
    local = Path(spec.path)
    try:
        if local.is_dir() and is_saved_folder(local):
            loaded = ds.load_from_disk(str(local))
        elif local.is_dir():
            loaded = ds.load_dataset(str(local))
        elif spec.path.endswith(".parquet") or any(c in spec.path for c in "*?["):
            loaded = ds.load_dataset("parquet", data_files=spec.path)
        else:
            loaded = ds.load_dataset(spec.path)
    except ConnectionError as e:
        raise KdsearchError(
            f"data.path: cannot fetch {spec.path!r} from the Hugging Face hub ({_first_line(e)}); on a node without "
            "internet, load it once where there is one (it stays in the Hugging Face cache, $HF_HOME), or give a folder "
            "written by save_to_disk"
        ) from None
    except (OSError, ValueError) as e:
        raise KdsearchError(f"data.path: cannot load {spec.path!r} with datasets: {_first_line(e)}") from None
    if isinstance(loaded, ds.Dataset):
        return {"train": loaded}
    return dict(loaded)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def find_source(spec: DataSpec) -> Source:
    """The dataset's splits with the columns, split names and classes found or stated.

    Raises:
        KdsearchError: An unknown split or column (the line lists what the dataset has), a label
            column without classes, or data.num_classes that disagrees with the classes.
    """
    splits = open_splits(spec)
    train = spec.train_split or "train"
    _require_split(spec, splits, "train_split", train)
    if spec.test_split:
        _require_split(spec, splits, "test_split", spec.test_split)
        if spec.test_split == train:
            raise KdsearchError(f"data.test_split: {spec.test_split!r} is the train split; name another")
    test = spec.test_split or next((s for s in TEST_SPLITS if s in splits and s != train), None)
    features = splits[train].features
    image = _column(spec, features, "image_column", "Image", ("image", "img"))
    label = _column(spec, features, "label_column", "ClassLabel", ("label", "labels"))
    class_label = type(features[label]).__name__ == "ClassLabel"
    if class_label:
        classes = tuple(features[label].names)
    else:
        classes = tuple(str(v) for v in sorted(set(splits[train][label])))
    if spec.num_classes is not None and spec.num_classes != len(classes):
        raise KdsearchError(
            f"data.num_classes: the space says {spec.num_classes} but {spec.path}'s column {label!r} has {len(classes)} classes"
        )
    return Source(splits, image, label, train, test, classes, class_label)


def _require_split(spec: DataSpec, splits: dict[str, Any], key: str, name: str) -> None:
    if name not in splits:
        raise KdsearchError(f"data.{key}: {spec.path} has no split {name!r}; it has: {', '.join(splits)}")


def _column(spec: DataSpec, features: Any, key: str, feature: str, names: tuple[str, str]) -> str:
    """The column `data.KEY` states, else the first `feature`-typed one, else one named `names`."""
    stated = getattr(spec, key)
    if stated is not None:
        _require_column(spec, features, key, stated)
        return stated
    found = [c for c, f in features.items() if type(f).__name__ == feature] + [c for c in names if c in features]
    if not found:
        raise KdsearchError(
            f"data.{key}: {spec.path} has no {feature} feature and no column named {names[0]} or {names[1]}; name one of: {', '.join(features)}"
        )
    return found[0]


def _require_column(spec: DataSpec, features: Any, key: str, name: str) -> None:
    if name not in features:
        raise KdsearchError(f"data.{key}: {spec.path} has no column {name!r}; it has: {', '.join(features)}")


def split_labels(source: Source, split: str) -> np.ndarray:
    """A split's labels as class indices (int64; only the label column is read).

    Raises:
        KdsearchError: A label that is not one of the classes (a missing ClassLabel, -1, or a
            value the train split does not have).
    """
    values = source.splits[split][source.label]
    if source.class_label:
        labels = np.asarray(values, dtype=np.int64)
        bad = np.flatnonzero((labels < 0) | (labels >= len(source.classes)))
    else:
        index = {c: i for i, c in enumerate(source.classes)}
        labels = np.asarray([index.get(str(v), -1) for v in values], dtype=np.int64)
        bad = np.flatnonzero(labels < 0)
    if len(bad):
        raise KdsearchError(
            f"data.label_column: row {int(bad[0])} of {split!r} has label {values[int(bad[0])]!r}, not one of the "
            f"{len(source.classes)} classes of {source.train!r}"
        )
    return labels


def decode_images(split: Any, column: str, img_size: int, where: str) -> torch.Tensor:
    """A split's images as one uint8 tensor (N, 3, H, W): RGB, kept at their one square size
    when all share one no larger than `img_size`, else each resized (shorter side) and
    center-cropped to `img_size`.

    Raises:
        KdsearchError: The column holds no images, the tensor would pass MAX_DECODED_BYTES, or
            an image cannot be read.
    """
    from datasets import Image as ImageFeature
    from PIL import Image, ImageOps

    try:
        cells = split.select_columns([column]).cast_column(column, ImageFeature(decode=False))
    except (TypeError, ValueError, NotImplementedError) as e:  # Arrow's casts raise these
        raise KdsearchError(f"{where}: column {column!r} holds no images ({_first_line(e)})") from None
    sizes: set[tuple[int, int]] = set()
    for row, cell in enumerate(_cells(cells, column)):
        with _open(cell, row, where) as im:  # the header only: no pixel is decoded here
            sizes.add(im.size)
    (w, h), *rest = sorted(sizes) or [(img_size, img_size)]
    side = w if not rest and w == h <= img_size else img_size
    need = len(split) * 3 * side * side
    if need > MAX_DECODED_BYTES:
        raise KdsearchError(
            f"{where}: {len(split):,} images x 3 x {side} x {side} decode to {need / 2**30:.1f} GiB, over kdsearch's "
            f"in-memory limit of {MAX_DECODED_BYTES / 2**30:.0f} GiB; use a smaller data.img_size, or an image folder"
        )
    out = torch.empty((len(split), 3, side, side), dtype=torch.uint8)
    for row, cell in enumerate(_cells(cells, column)):
        with _open(cell, row, where) as im:
            if im.size != (side, side):
                im.draft("RGB", (side, side))  # JPEG: decode at a reduced scale still >= side
                im = ImageOps.fit(im.convert("RGB"), (side, side), Image.Resampling.BILINEAR)
            out[row] = torch.from_numpy(np.array(im.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1))
    return out


def _cells(split: Any, column: str, batch: int = 256) -> Any:
    for rows in split.iter(batch_size=batch):
        yield from rows[column]


def _open(cell: dict | None, row: int, where: str) -> Any:
    """An image cell ({"bytes", "path"}) opened lazily by PIL."""
    from PIL import Image

    try:
        if cell and cell.get("bytes"):
            return Image.open(io.BytesIO(cell["bytes"]))
        if cell and cell.get("path"):
            return Image.open(cell["path"])
    except OSError as e:
        raise KdsearchError(f"{where}: row {row}'s image cannot be read ({_first_line(e)})") from None
    raise KdsearchError(f"{where}: row {row} has no image")


def _held_out(source: Source, spec: DataSpec, labels: np.ndarray) -> tuple[list[int], list[int]]:
    """(train rows, test rows) of the train split when the test split is carved from it."""
    try:
        return stratified(list(range(len(labels))), labels, spec.test_fraction)
    except ValueError as e:
        raise KdsearchError(
            f"data.test_fraction: cannot hold out a stratified test split of {source.train!r} ({_first_line(e)})"
        ) from None


def read_hf_train(spec: DataSpec) -> dict[str, Any]:
    """The training images of data.path, for `kdsearch.train.memory_data.in_memory_data`.

    Returns:
        Its keyword arguments beyond the spec: images (uint8 (N, 3, H, W)), labels (int64),
        num_classes, fingerprint (a hash of the decoded images and labels, the classes, the
        columns and splits, img_size, test_fraction where the test split is carved), mean, std.
    """
    source = find_source(spec)
    split = source.splits[source.train]
    labels = split_labels(source, source.train)
    if source.test is None:
        rows, _ = _held_out(source, spec, labels)
        split, labels = split.select(rows), labels[rows]
    where = f"data.path ({spec.path}, split {source.train!r})"
    images = decode_images(split, source.image, spec.img_size, where)
    fp = fingerprint(
        name="hf", content=content_hash(images.numpy(), labels), classes=source.classes, image=source.image, label=source.label,
        train=source.train, test=source.test, img_size=spec.img_size, split_seed=SPLIT_SEED,
        test_fraction=spec.test_fraction if source.test is None else None,
    )  # fmt: skip
    return {
        "images": images,
        "labels": torch.from_numpy(labels),
        "num_classes": len(source.classes),
        "fingerprint": fp,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    }


def read_hf_test(spec: DataSpec) -> dict[str, Any]:
    """The held-out test images of data.path, for `kdsearch.train.memory_data.in_memory_test`:
    its test split, or the stratified data.test_fraction of its train split carved out.

    Returns:
        Its keyword arguments beyond the spec: images, labels, mean, std.
    """
    source = find_source(spec)
    if source.test is None:
        labels = split_labels(source, source.train)
        _, rows = _held_out(source, spec, labels)
        split, labels, name = source.splits[source.train].select(rows), labels[rows], source.train
    else:
        split, labels, name = source.splits[source.test], split_labels(source, source.test), source.test
    for column in (source.image, source.label):
        _require_column(spec, split.features, "image_column" if column == source.image else "label_column", column)
    if source.class_label and tuple(getattr(split.features[source.label], "names", ())) != source.classes:
        raise KdsearchError(f"data.label_column: {spec.path}'s split {name!r} has other classes than {source.train!r}")
    images = decode_images(split, source.image, spec.img_size, f"data.path ({spec.path}, split {name!r})")
    return {"images": images, "labels": torch.from_numpy(labels), "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
