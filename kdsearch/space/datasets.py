"""The datasets a space can name: one table, torch-free, read by the space, the data layer,
the teacher and the CLI.

Each entry says the images' channels, the class count (None: read from the files), the image
size a space gets by default, whether it needs a local `data.root`, its public archive when it
has one (URL, md5 and folder: fetched on first use by kdsearch.train.fetch into `data.root`, or
the per-user cache when the space gives none) and where its held-out test split comes from.
The functions that load it are registered under the same name in kdsearch.train.data's
`LOADERS` (a test holds the two tables' names equal): this table imports nothing, and no part below train/ names a part above it.

Every dataset has three splits. `train` and `val` are carved from the training data (fixed,
stratified, the same in every trial): a search trains on one and selects on the other. The
`test` split is held out: only `eval`, `export` and `confirm` read it (its own loader), so the
numbers a search is tuned on are never the numbers it is judged by. Adding a dataset is one
entry here and its loaders in kdsearch.train.data's `LOADERS`: see ARCHITECTURE.md.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Archive:
    """A dataset's public archive (kdsearch.train.fetch fetches it once per node): where it is,
    its md5, and the folder it extracts to (which then holds the dataset's files)."""

    url: str
    md5: str
    folder: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    in_chans: int
    num_classes: int | None  # None: read from the data (class folders, a label column); data.num_classes must say it
    img_size: int  # the default data.img_size
    needs_root: bool  # read from a local folder the space must give as data.root
    root_holds: str  # what that folder must hold (the error when it does not), or where the data comes from
    test_split: str  # where the held-out test images come from, said in full
    archive: Archive | None = None  # a public archive fetched on first use into data.root (default: the cache)


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
            "a stratified data.test_fraction of the 1,797 images, held out before train and val are carved",
        ),
        DatasetInfo(
            "cifar10",
            3,
            10,
            32,
            False,
            "the CIFAR python files (cifar-10-batches-py/), fetched there on first use",
            "the official 10,000-image test set",
            Archive(  # torchvision's
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a",
                "cifar-10-batches-py",
            ),
        ),
        DatasetInfo(
            "cifar100",
            3,
            100,
            32,
            False,
            "the CIFAR python files (cifar-100-python/), fetched there on first use",
            "the official 10,000-image test set",
            Archive(  # torchvision's
                "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                "eb9058c3a382ffc7106e4002c42a8d85",
                "cifar-100-python",
            ),
        ),
        DatasetInfo(
            "imagefolder",
            3,
            None,
            224,
            True,
            "a train/ folder with one folder per class, and test/ (or val/) with the same class folders",
            "the root's test/ folder, or its val/ folder when there is no test/ (ImageNet's val is its test set)",
        ),
        DatasetInfo(  # Hugging Face datasets, decoded once to RGB (kdsearch.train.hf_data)
            "hf",
            3,
            None,
            224,
            False,
            "is read from data.path (a hub id, a folder written by save_to_disk, or Parquet files)",
            "the dataset's test split (else its validation or val split; with none, a stratified data.test_fraction "
            "of its train split, held out before train and val are carved)",
        ),
    )
}
