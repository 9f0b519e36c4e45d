"""An image folder with a timm teacher from a local checkpoint, random augmentation (the
teacher then runs live), and the top-k sparse logit cache."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from kdsearch.errors import KdsearchError
from kdsearch.space.file import load_space
from kdsearch.train.data import load_data, load_test
from kdsearch.train.logit_cache import TeacherLogits
from kdsearch.train.setup import TrialSetup
from kdsearch.train.teacher import load_teacher
from kdsearch.train.trial import run_trial

CLASSES = ("circle", "square", "stripes")


def draw(kind: str, rng: np.random.Generator) -> Image.Image:
    img = np.zeros((32, 32, 3), dtype=np.uint8) + rng.integers(0, 40, (32, 32, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:32, :32]
    if kind == "circle":
        img[(yy - 16) ** 2 + (xx - 16) ** 2 < 80] = 220
    elif kind == "square":
        img[8:24, 8:24] = 220
    else:
        img[:, ::4] = 220
    return Image.fromarray(img)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    for split, n in (("train", 15), ("val", 4)):  # val/ is the test split: val is carved from train/
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                draw(c, rng).save(root / split / c / f"{i}.png")
    return root


def space_file(tmp_path: Path, folder: Path, checkpoint: str, augment: bool = True, num_classes: int = 3) -> Path:
    path = tmp_path / "shapes.yaml"
    path.write_text(f"""
data: {{name: imagefolder, root: {folder}, num_classes: {num_classes}, img_size: 32, augment: {str(augment).lower()}}}
teacher: {{model: resnet10t, checkpoint: {checkpoint}}}
student: {{embed_dim: 32, depth: 1, num_heads: 2, patch_size: 8}}
recipe: {{alpha: 0.5, feature_weight: 0.5}}
train: {{epochs: 2, batch_size: 8}}
""")
    return path


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=3)
    path = tmp_path_factory.mktemp("ckpt") / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_image_folder_with_a_timm_teacher_runs_live(folder: Path, teacher_checkpoint: Path, tmp_path: Path) -> None:
    space = load_space(space_file(tmp_path, folder, teacher_checkpoint))
    data = load_data(space)
    assert data.num_classes == 3 and data.num_train == 36 and len(data.val) == 9 and data.random_augment
    assert len(load_test(space)) == 12  # val/ holds the held-out test images (there is no test/)
    x, y, idx = next(data.train_batches(8, 0, 0))
    assert x.shape == (8, 3, 32, 32) and idx.dtype == torch.long
    teacher = load_teacher(space, data=data)
    assert not any(p.requires_grad for p in teacher.parameters())
    reports: list[dict] = []
    setup = TrialSetup(workdir=tmp_path / "w", data=data, teacher=teacher, loader_workers=1)
    run_trial(space.default_spec(), setup, reports.append)
    # feature distillation needs the teacher live: every batch went through it
    assert reports[0]["teacher_images"] == 32 and reports[-1]["teacher_images"] == 64
    assert reports[-1]["loss_feature"] > 0  # resnet features (B, C, 1, 1) at 32px, matched by resizing


def test_image_folder_class_count_is_checked(folder: Path, teacher_checkpoint: Path, tmp_path: Path) -> None:
    space = load_space(space_file(tmp_path, folder, teacher_checkpoint, num_classes=4))
    with pytest.raises(KdsearchError, match="says 4 but .* has 3 class folders"):
        load_data(space)


def test_checkpoint_that_does_not_fit(folder: Path, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.safetensors"
    save_file({"weight": torch.zeros(2)}, str(wrong))
    space = load_space(space_file(tmp_path, folder, wrong))
    with pytest.raises(KdsearchError, match="does not fit the teacher model"):
        load_teacher(space)


@pytest.mark.parametrize("name", ["teacher", "teacher.pt", "torch-file.safetensors"])
def test_checkpoints_are_recognised_by_content_not_suffix(
    folder: Path, teacher_checkpoint: Path, tmp_path: Path, name: str
) -> None:
    from kdsearch.train.teacher import save_teacher

    model = timm.create_model("resnet10t", num_classes=3)
    path = tmp_path / name
    if name.startswith("torch-file"):  # a torch file under a safetensors name
        torch.save(model.state_dict(), path)
    else:  # what `kdsearch teacher train` writes, whatever the path's suffix
        save_teacher(model, path, {"model": "resnet10t"})
    loaded = load_teacher(load_space(space_file(tmp_path, folder, path)))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_sparse_logits_keep_the_top_k_and_fill_the_rest() -> None:
    logits = torch.tensor([[5.0, 1.0, 3.0, -2.0, 0.0], [0.0, 9.0, 8.0, 7.0, 1.0]])
    top = logits.topk(2, dim=1)
    sparse = TeacherLogits(top.values, top.indices.int(), num_classes=5)
    dense = sparse.take(torch.tensor([1, 0]))
    assert dense.tolist() == [[8.0, 9.0, 8.0, 8.0, 8.0], [5.0, 3.0, 3.0, 3.0, 3.0]]
    assert (dense.argmax(1) == logits[[1, 0]].argmax(1)).all()
    assert TeacherLogits(logits).take(torch.tensor([0])).tolist() == [logits[0].tolist()]


def test_one_loader_per_trial_makes_each_epochs_seeded_views(
    folder: Path, teacher_checkpoint: Path, tmp_path: Path
) -> None:
    """A disk dataset gets one DataLoader per trial (its workers persist across epochs), and
    each epoch's views are those of that epoch's seeds: what the replay cache stored."""
    from kdsearch.train.data import view_seeds

    data = load_data(load_space(space_file(tmp_path, folder, teacher_checkpoint)))

    def epoch(e: int) -> dict[int, torch.Tensor]:
        return {int(i): v for x, _, idx in data.train_batches(8, e, 0, workers=1) for i, v in zip(idx, x)}

    first = epoch(0)
    ((sampler, loader),) = data._loaders.values()
    second = epoch(1)
    assert list(data._loaders.values()) == [(sampler, loader)] and loader.persistent_workers
    some = np.array(sorted(set(first) & set(second))[:6])  # drop_last leaves a different few out each epoch
    for seen, e in ((first, 0), (second, 1)):
        replayed = data.views(some, view_seeds(e, data.num_train)[some])
        assert all(torch.equal(seen[int(i)], v) for i, v in zip(some, replayed))
    assert any(not torch.equal(first[int(i)], second[int(i)]) for i in some)
    assert pickle.loads(pickle.dumps(data))._loaders == {}  # loaders stay in their process


def test_a_built_in_teacher_trained_on_other_images_is_not_used(
    digits_space, digits_teacher_path: Path, tmp_path: Path
) -> None:
    """A teacher that learned from other training images (one trained before the test split was
    held out saw some of today's test images) would leak them into every student."""
    import dataclasses
    import shutil

    import yaml

    from kdsearch.train.teacher import load_teacher

    assert load_teacher(digits_space) is not None  # the session's teacher: trained on this very split
    path = tmp_path / "digits_cnn.safetensors"
    shutil.copy(digits_teacher_path, path)
    meta = yaml.safe_load(digits_teacher_path.with_suffix(".yaml").read_text())
    path.with_suffix(".yaml").write_text(yaml.safe_dump({**meta, "train_fingerprint": "an older split"}))
    space = dataclasses.replace(digits_space, teacher=dataclasses.replace(digits_space.teacher, checkpoint=str(path)))
    with pytest.raises(KdsearchError, match="was trained on other training images than this space's; train it with"):
        load_teacher(space)
