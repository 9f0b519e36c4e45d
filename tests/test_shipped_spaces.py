"""Every shipped space runs as a new user runs it: `space show`, then its data and its teacher
made by kdsearch's own commands (CIFAR-10 fetched from a mirror on 127.0.0.1, a timm teacher
fine-tuned from "pretrained" weights that timm loads from a local file through its pretrained
config, the built-in CNN trained), then a search of one trial to the end. Only what a CPU
cannot afford is made small: the trials, the epochs, the image size, the batch, the resources
(and the image folder's class count, of the folder this test writes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from kdsearch.results.tables import load_run
from kdsearch.space.file import load_space
from kdsearch.space.specs import BUILTIN_TEACHER
from kdsearch.train.fetch import ARCHIVES_ENV, DATA_ENV
from tests.archive_server import ARCHIVE, Server, md5, mirror
from tests.helpers import run_cli

REPO = Path(__file__).resolve().parents[1]
SPACES = sorted((REPO / "search_spaces").glob("*.yaml"))
SMALL_IMAGES = 32  # patch 16 and every other shipped patch size divide it
FOLDER_CLASSES = 4

pytestmark = pytest.mark.usefixtures("shared_ray")  # one Ray for the module's searches


def small(raw: dict, img_size: int, defaults: dict) -> dict:
    """The space as a CPU affords it: one trial of one epoch on small images, each searched
    dimension kept as the space states it; the one trial is the space's default student (a
    sampled one may be over the budget)."""
    raw["data"]["img_size"] = img_size
    raw["train"].update(epochs=1, warmup_epochs=0, batch_size=16)
    raw["resources"] = {"cpus": 1, "gpus": 0}
    raw["search"].update(trials=1, enqueue=[defaults])
    raw["search"].pop("max_concurrent", None)
    return raw


def image_folder(root: Path) -> Path:
    """train/ and val/ with FOLDER_CLASSES class folders of small PNGs (val: ImageNet's test split)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in (("train", 10), ("val", 2)):
        for c in range(FOLDER_CLASSES):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def pretrained_file(model: str, folder: Path) -> Path:
    """The model's weights with its hub head, as timm would download them (random: this is about the path)."""
    import timm
    from safetensors.torch import save_file

    path = folder / f"{model.replace('/', '_')}-pretrained.safetensors"
    save_file(timm.create_model(model, pretrained=False).state_dict(), str(path))
    return path


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_a_shipped_space_runs_to_the_end_with_data_and_teacher_made_by_kdsearch(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits_teacher_path: Path
) -> None:
    assert run_cli(["space", "show", str(path)]) == 0
    raw = yaml.safe_load(path.read_text())
    data, teacher = raw["data"], raw["teacher"]
    server = None
    try:
        if data["name"] == "cifar10":  # fetched on first use, here from a mirror on 127.0.0.1
            server = Server({"/cifar-10-python.tar.gz": ARCHIVE})
            archives = mirror(tmp_path, f"{server.url}/cifar-10-python.tar.gz", md5(ARCHIVE))
            monkeypatch.setenv(ARCHIVES_ENV, str(archives))
            monkeypatch.setenv(DATA_ENV, str(tmp_path / "cache"))
        if data["name"] == "imagefolder":
            data.update(root=str(image_folder(tmp_path / "images")), num_classes=FOLDER_CLASSES)
        defaults = {name: dim.default for name, dim in load_space(path).dims.items() if name.startswith("student.")}
        small(raw, data.get("img_size") if data["name"] == "digits" else SMALL_IMAGES, defaults)
        if teacher["model"] == BUILTIN_TEACHER:
            teacher["checkpoint"] = str(digits_teacher_path)  # `kdsearch teacher train`'s, trained once per session
        else:
            teacher.update(
                pretrained=True,
                pretrained_file=str(pretrained_file(teacher["model"], tmp_path)),
                checkpoint=str(tmp_path / "teacher.safetensors"),
            )
        space = tmp_path / "space.yaml"
        space.write_text(yaml.safe_dump(raw, sort_keys=False))
        if teacher["model"] != BUILTIN_TEACHER:
            assert run_cli(["teacher", "finetune", str(space), "--epochs", "1", "--batch-size", "16"]) == 0
            assert (tmp_path / "teacher.safetensors").is_file()
        if server is not None:
            assert server.gets == {"/cifar-10-python.tar.gz": 1}  # the fine-tuning fetched it
            # NOTE: the shared Ray's workers started before this test set KDSEARCH_DATA, so the
            # search names the folder the fetch filled (tests/test_fetch.py fetches in workers)
            data["root"] = str(tmp_path / "cache")
            space.write_text(yaml.safe_dump(raw, sort_keys=False))
        assert run_cli(["search", str(space), "--storage", str(tmp_path / "runs")]) == 0
    finally:
        if server is not None:
            server.close()
    (trial,) = load_run(str(tmp_path / "runs" / raw["name"])).trials
    assert trial["status"] == "completed", trial
