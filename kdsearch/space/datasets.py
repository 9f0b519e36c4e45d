"""The datasets a space can name: one table, torch-free, read by the space, the data layer,
the teacher and the CLI.

Each entry says the images' channels, the class count (None: read from the files), the image
size a space gets by default, whether it needs a local `data.root` (nothing is ever
downloaded), the splits it holds and the function that loads it (`module:function`, imported
only when data is loaded, so this table costs nothing to import). Adding a dataset is one
entry here and its loader in kdsearch.train.data: see ARCHITECTURE.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    in_chans: int
    num_classes: int | None  # None: counted from the class folders (data.num_classes must say it)
    img_size: int  # the default data.img_size
    needs_root: bool  # read from a local folder given as data.root
    root_holds: str  # what that folder must hold (the error when it does not), or where the data comes from
    loader: str  # "module:function" taking a DataSpec and returning kdsearch.train.data.Data
    splits: tuple[str, ...] = ("train", "val")

    def load_function(self) -> Callable[[Any], Any]:
        module, _, function = self.loader.partition(":")
        return getattr(importlib.import_module(module), function)


DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in (
        DatasetInfo("digits", 1, 10, 16, False, "ships with scikit-learn", "kdsearch.train.data:load_digits"),
        DatasetInfo(
            "cifar10",
            3,
            10,
            32,
            True,
            "the CIFAR python files (cifar-10-batches-py/)",
            "kdsearch.train.data:load_cifar",
        ),
        DatasetInfo(
            "cifar100", 3, 100, 32, True, "the CIFAR python files (cifar-100-python/)", "kdsearch.train.data:load_cifar"
        ),
        DatasetInfo(
            "imagefolder",
            3,
            None,
            224,
            True,
            "train/ and val/ folders with one folder per class",
            "kdsearch.train.data:load_imagefolder",
        ),
    )
}
