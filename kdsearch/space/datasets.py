"""The datasets a space can name: one table, torch-free, read by the space, the data layer,
the teacher and the CLI.

Each entry says the images' channels, the class count (None: read from the files), the image
size a space gets by default, whether it needs a local `data.root` (nothing is ever
downloaded), where its held-out test split comes from, and the functions that load it
(`module:function`, imported only when data is loaded, so this table costs nothing to import).

Every dataset has three splits. `train` and `val` are carved from the training data (fixed,
stratified, the same in every trial): a search trains on one and selects on the other. The
`test` split is held out: only `eval`, `export` and `confirm` read it (its own loader), so the
numbers a search is tuned on are never the numbers it is judged by. Adding a dataset is one
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
    loader: str  # "module:function" taking a DataSpec, returning kdsearch.train.data.Data (train and val)
    test_loader: str  # "module:function" taking a DataSpec, returning the test split (a Dataset)
    test_split: str  # where the held-out test images come from, said in full

    def load_function(self) -> Callable[[Any], Any]:
        return _function(self.loader)

    def test_function(self) -> Callable[[Any], Any]:
        return _function(self.test_loader)


def _function(name: str) -> Callable[[Any], Any]:
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in (
        DatasetInfo(
            "digits",
            1,
            10,
            16,
            False,
            "ships with scikit-learn",
            "kdsearch.train.data:load_digits",
            "kdsearch.train.data:load_digits_test",
            "a stratified data.test_fraction of the 1,797 images, held out before train and val are carved",
        ),
        DatasetInfo(
            "cifar10",
            3,
            10,
            32,
            True,
            "the CIFAR python files (cifar-10-batches-py/)",
            "kdsearch.train.data:load_cifar",
            "kdsearch.train.data:load_cifar_test",
            "the official 10,000-image test set",
        ),
        DatasetInfo(
            "cifar100",
            3,
            100,
            32,
            True,
            "the CIFAR python files (cifar-100-python/)",
            "kdsearch.train.data:load_cifar",
            "kdsearch.train.data:load_cifar_test",
            "the official 10,000-image test set",
        ),
        DatasetInfo(
            "imagefolder",
            3,
            None,
            224,
            True,
            "a train/ folder with one folder per class, and test/ (or val/) with the same class folders",
            "kdsearch.train.data:load_imagefolder",
            "kdsearch.train.data:load_imagefolder_test",
            "the root's test/ folder, or its val/ folder when there is no test/ (ImageNet's val is its test set)",
        ),
    )
}
