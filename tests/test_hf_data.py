"""Hugging Face datasets (`data: {name: hf, path: ...}`), on a small image dataset written by
`datasets` itself: digits as 16 px RGB images with an Image and a ClassLabel feature, a train
and a test split, saved with save_to_disk and as Parquet files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from kdsearch.errors import KdsearchError, SpaceError
from kdsearch.results.tables import load_run
from kdsearch.space.file import load_space
from kdsearch.space.specs import DataSpec
from kdsearch.train import hf_data
from kdsearch.train.data import TEST_READ_LOG, load_data, load_test
from tests.helpers import run_cli

N_TRAIN, N_TEST = 1500, 297  # of digits' 1,797 images


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the dataset twice: disk/ (save_to_disk) and pq/ (train.parquet, test.parquet)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = (digits.images * 255 / 16).astype(np.uint8)
    tinted = np.stack([gray, gray // 2, 255 - gray], axis=-1)  # RGB whose channels differ
    images = [Image.fromarray(x).resize((16, 16), Image.Resampling.BILINEAR) for x in tinted]
    features = datasets.Features(
        {
            "id": datasets.Value("int32"),
            "picture": datasets.Image(),
            "digit": datasets.ClassLabel(names=list("0123456789")),
        }
    )
    rows = {"id": list(range(len(images))), "picture": images, "digit": digits.target.tolist()}
    split = {
        name: datasets.Dataset.from_dict({k: v[part] for k, v in rows.items()}, features=features)
        for name, part in (("train", slice(0, N_TRAIN)), ("test", slice(N_TRAIN, None)))
    }
    root = tmp_path_factory.mktemp("hf")
    datasets.DatasetDict(split).save_to_disk(str(root / "disk"))
    (root / "pq").mkdir()
    for name, ds in split.items():
        ds.to_parquet(str(root / "pq" / f"{name}.parquet"))
    return root


@pytest.fixture(scope="module")
def read_log(tmp_path_factory: pytest.TempPathFactory):
    """KDSEARCH_TEST_READ_LOG set before the module's Ray starts, so every worker logs its test reads."""
    log = tmp_path_factory.mktemp("reads") / "test_reads.log"
    os.environ[TEST_READ_LOG] = str(log)
    try:
        yield log
    finally:
        del os.environ[TEST_READ_LOG]


SPACE = """
name: hf_search
data: {{name: hf, path: {path}, img_size: 16, num_classes: 10}}
student: {{embed_dim: 32, depth: 1, num_heads: 2, patch_size: 4, pos_embed: [learned, none]}}
recipe: {{alpha: 0.0}}
train: {{epochs: 1, batch_size: 64, lr: 2.0e-3, warmup_epochs: 0}}
resources: {{cpus: 1}}
search: {{trials: 2, sampler: random, seed: 0}}
"""


def test_a_search_on_a_saved_dataset_never_reads_its_test_split_and_eval_does(
    hf_folders: Path, read_log: Path, shared_ray: None, capsys: pytest.CaptureFixture
) -> None:
    space = hf_folders / "space.yaml"
    space.write_text(SPACE.format(path="disk"))  # beside the space file: made absolute when the space loads
    assert load_space(space).data.path == str(hf_folders / "disk")
    assert run_cli(["search", str(space), "--storage", str(hf_folders / "runs")]) == 0
    trials = load_run(str(hf_folders / "runs" / "hf_search")).trials
    assert len(trials) == 2 and all(t["status"] == "completed" for t in trials), trials
    assert not read_log.exists(), read_log.read_text()  # no process of the search read a test image
    student = hf_folders / "student"
    assert run_cli(["export", str(hf_folders / "runs" / "hf_search"), "--min-acc", "0", "--out", str(student)]) == 0
    capsys.readouterr()
    assert run_cli(["eval", str(student), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["data"], result["test_images"], result["val_images"]) == ("hf", N_TEST, N_TRAIN // 5)
    assert 0.0 <= result["test_acc"] <= 1.0
    reads = [line.split() for line in read_log.read_text().splitlines()]  # the log sees eval's (and export's) reads
    assert sum(int(n) for _, n in reads) >= N_TEST and {int(pid) for pid, _ in reads} == {os.getpid()}


def test_parquet_files_load_as_the_saved_folder_does(hf_folders: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(hf_folders / "hf_cache"))  # load_dataset's Arrow copy
    saved = DataSpec(name="hf", path=str(hf_folders / "disk"), img_size=16, num_classes=10)
    parquet = DataSpec(name="hf", path=str(hf_folders / "pq"), img_size=16, num_classes=10)
    a, b = load_data(saved), load_data(parquet)
    assert (a.num_classes, a.in_chans, a.num_train, len(a.val)) == (b.num_classes, b.in_chans, b.num_train, len(b.val))
    assert (a.num_classes, a.in_chans, a.num_train + len(a.val)) == (10, 3, N_TRAIN)
    assert a.fingerprint == b.fingerprint  # the same images and labels: the same teacher caches
    test_a, test_b = load_test(saved), load_test(parquet)
    assert len(test_a) == len(test_b) == N_TEST and torch.equal(test_a.x, test_b.x) and torch.equal(test_a.y, test_b.y)
    own = datasets.load_from_disk(str(hf_folders / "disk"))["test"]  # decoded by datasets itself: the same pixels
    assert np.array_equal(test_a.x.numpy(), np.stack([np.asarray(im) for im in own["picture"]]).transpose(0, 3, 1, 2))
    assert test_a.y.tolist() == own["digit"]
    # one Parquet file has no test split: a stratified data.test_fraction of it is held out first
    one = DataSpec(name="hf", path=str(hf_folders / "pq" / "train.parquet"), img_size=16, num_classes=10)
    carved, held = load_data(one), load_test(one)
    assert (carved.num_train + len(carved.val), len(held)) == (N_TRAIN - N_TRAIN // 5, N_TRAIN // 5)
    assert carved.fingerprint != a.fingerprint
    train_rows = {r.numpy().tobytes() for r in carved.train.x} | {r.numpy().tobytes() for r in carved.val.x}
    assert not train_rows & {r.numpy().tobytes() for r in held.x}


def test_columns_splits_and_classes_are_found_or_refused_in_one_line(hf_folders: Path) -> None:
    spec = DataSpec(name="hf", path=str(hf_folders / "disk"), img_size=16, num_classes=10)
    source = hf_data.find_source(spec)
    assert (source.image, source.label, source.train, source.test) == ("picture", "digit", "train", "test")
    refused = {
        "image_column": (
            dict(image_column="img"),
            "data.image_column: .* has no column 'img'; it has: id, picture, digit",
        ),
        "not images": (dict(image_column="id"), r"data.path \(.*, split 'train'\): column 'id' holds no images"),
        "label_column": (dict(label_column="id2"), "has no column 'id2'; it has: id, picture, digit"),
        "test_split": (dict(test_split="holdout"), "data.test_split: .* has no split 'holdout'; it has: train, test"),
        "train_split": (dict(train_split="test", test_split="test"), "data.test_split: 'test' is the train split"),
        "num_classes": (dict(num_classes=7), "data.num_classes: the space says 7 but .* column 'digit' has 10 classes"),
    }
    for key, (change, line) in refused.items():
        with pytest.raises(KdsearchError, match=line) as info:
            load_data(DataSpec(**{**spec.__dict__, **change}))
        assert "\n" not in str(info.value), key
    for text, line in (
        ("{name: hf, num_classes: 10}", "data.path: is required for hf"),
        (f"{{name: digits, path: {hf_folders / 'disk'}}}", "data.path: is read by hf only"),
        ("{name: hf, path: org/set}", "data.num_classes: is required for hf"),
    ):
        (hf_folders / "bad.yaml").write_text(f"name: s\ndata: {text}\nstudent: {{embed_dim: 32}}\n")
        with pytest.raises(SpaceError, match=line):
            load_space(hf_folders / "bad.yaml")
    hub = hf_folders / "hub.yaml"
    hub.write_text("name: s\ndata: {name: hf, path: beans, num_classes: 3}\nstudent: {embed_dim: 32}\n")
    assert load_space(hub).data.path == "beans"  # a hub id (nothing named so beside the file) stays as given


def test_images_of_several_sizes_are_resized_once_and_a_huge_split_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = [
        Image.new("RGBA", (20, 10), (200, 200, 200, 255)),
        Image.new("L", (8, 8), 200),
        Image.new("RGB", (30, 30), (200,) * 3),
    ]
    ds = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    x = hf_data.decode_images(ds, "image", 16, "here")
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.uint8 and (x == 200).all()  # L and RGBA made RGB
    same = datasets.Dataset.from_dict({"image": [Image.new("L", (8, 8), 7)] * 2}, features=ds.features)
    assert hf_data.decode_images(same, "image", 16, "here").shape == (2, 3, 8, 8)  # one size: kept
    monkeypatch.setattr(hf_data, "MAX_DECODED_BYTES", 1000)
    with pytest.raises(KdsearchError, match=r"^here: 3 images x 3 x 16 x 16 decode to .* in-memory limit"):
        hf_data.decode_images(ds, "image", 16, "here")


def test_without_datasets_or_without_the_hub_it_is_one_line() -> None:
    """In a fresh process: `datasets` blocked from importing (as where it is not installed), then
    a hub id with the hub offline."""
    script = textwrap.dedent("""
        import sys
        from kdsearch.errors import KdsearchError
        from kdsearch.space.specs import DataSpec
        from kdsearch.train.data import load_data
        def load(path):
            try:
                load_data(DataSpec(name="hf", path=path))
            except KdsearchError as e:
                print(e)
        sys.modules["datasets"] = None  # `import datasets` raises ImportError
        load("beans")
        del sys.modules["datasets"]
        load("kdsearch-tests/no-such-dataset")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stdout + out.stderr
    assert lines[0].endswith("the `datasets` package, which is not installed; pip install 'kdsearch[hf]'"), lines[0]
    assert lines[1].startswith(
        "data.path: cannot fetch 'kdsearch-tests/no-such-dataset' from the Hugging Face hub (Couldn't reach"
    ), lines[1]
