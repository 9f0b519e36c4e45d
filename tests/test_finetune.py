"""`kdsearch teacher finetune`, offline: timm's tiny test ViT whose "pretrained" weights come
from a local file through timm's own pretrained config (the path hub weights take, but for the
download), fine-tuned on digits at 32 px here and as a Ray task on a cluster that declares a GPU,
then a search that distils from it with the cache; and the one-line refusals of a teacher that
does not fit the data, and of a cluster without GPUs."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import logging
import shutil
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from kdsearch.errors import KdsearchError
from kdsearch.space.file import load_space
from kdsearch.train.data import load_data
from kdsearch.train.evaluation import evaluate
from kdsearch.train.finetune import FINETUNED_BY, FinetuneRecipe, initial_model, starting_point
from kdsearch.train.teacher import load_teacher
from tests.helpers import run_cli

MODEL = "test_vit"  # timm's test ViT: 0.37 M parameters, patch 16 (2 x 2 patches at 32 px)

SPACE = """
name: finetuned_teacher
data: {{name: digits, img_size: 32}}
teacher: {{model: {model}, pretrained: {pretrained}, pretrained_file: {pretrained_file}, checkpoint: {checkpoint}}}
student: {{embed_dim: 32, depth: 1, num_heads: 2, patch_size: 8, pos_embed: [learned, none]}}
recipe: {{alpha: 0.7, temperature: 2.0}}
train: {{epochs: 1, batch_size: 64, lr: 2.0e-3}}
early_stopping: {{enabled: false}}
resources: {{cpus: 1}}
search: {{trials: 1, sampler: random, seed: 0}}
"""


def write(tmp: Path, checkpoint: Path, pretrained_file: Path | None = None, name: str = "space.yaml") -> Path:
    path = tmp / name
    pretrained = pretrained_file is not None
    path.write_text(
        SPACE.format(
            model=MODEL,
            pretrained=str(pretrained).lower(),
            pretrained_file=pretrained_file or "null",
            checkpoint=checkpoint,
        )
    )
    return path


@pytest.fixture(scope="module")
def pretrained_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the hub would serve for test_vit: its state dict with the 1000-class head, 3 channels, 160 px."""
    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False)
    assert model.num_classes == 1000 and model.patch_embed.img_size == (160, 160)
    path = tmp_path_factory.mktemp("hub") / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_address_of_a_cluster_without_gpus_is_one_line(
    pretrained_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Before the module's Ray with a GPU starts: the embedded Ray declares none."""
    import ray

    from kdsearch.search.ray_session import init_ray

    init_ray(None)
    try:
        space = write(tmp_path, tmp_path / "teacher.safetensors", pretrained_file)
        address = ray.get_runtime_context().gcs_address
        assert run_cli(["teacher", "finetune", str(space), "--address", address]) == 2
    finally:
        ray.shutdown()
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "the Ray cluster declares no GPU" in err, err
    assert not (tmp_path / "teacher.safetensors").exists()


def test_finetune_runs_here_without_ray(pretrained_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The default: this process, on its CPU (said once), one epoch; the test split never read."""
    from kdsearch.train.data import count_test_images_read

    space = write(tmp_path, tmp_path / "here.safetensors", pretrained_file)
    read_before = count_test_images_read()
    assert run_cli(["teacher", "finetune", str(space), "--epochs", "1", "--batch-size", "64", "--lr", "2e-3"]) == 0
    err = capsys.readouterr().err
    assert err.count("in fp32") == 1 and "Ray task" not in err and "epoch 1/1: train loss" in err, err
    meta = yaml.safe_load((tmp_path / "here.yaml").read_text())
    assert meta["val_acc"] >= 0.4 and meta["device"] == "cpu" and count_test_images_read() == read_before


@pytest.fixture(scope="module")
def ray_with_a_gpu():
    """A Ray on this machine that declares one GPU (as `ray start --num-gpus 1` does), for the
    fine-tuning task and the search after it; torch sees no CUDA here, so the task runs on the CPU.
    Its listeners stay on loopback as the embedded Ray's do (kdsearch.search.ray_session.init_ray)."""
    import ray
    from ray._private import ray_constants

    cluster, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        ray.init(
            "local", num_cpus=2, num_gpus=1, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster
    try:
        address = ray.get_runtime_context().gcs_address
        assert address.startswith("127.0.0.1:"), address
        yield address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def finetuned(pretrained_file: Path, ray_with_a_gpu: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The space after `kdsearch teacher finetune SPACE --address` wrote its teacher (a Ray task,
    3 epochs), and what the command said."""
    tmp = tmp_path_factory.mktemp("finetune")
    space = write(tmp, tmp / "teacher" / "test_vit_digits.safetensors", pretrained_file)
    args = ["teacher", "finetune", str(space), "--epochs", "3", "--batch-size", "64", "--lr", "2e-3"]
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert run_cli([*args, "--address", ray_with_a_gpu]) == 0
    return space, err.getvalue()


def test_pretrained_weights_come_through_timms_pretrained_config(pretrained_file: Path, tmp_path: Path) -> None:
    """The file's weights, with a new 10-class head, the stem summed to digits' one channel and
    the position table resampled from 10 x 10 patches to 2 x 2."""
    space = load_space(write(tmp_path, tmp_path / "out.safetensors", pretrained_file))
    model, source = initial_model(space.teacher, space.data, "pretrained")
    hub = timm.create_model(MODEL, pretrained=False)
    hub.load_state_dict(__import__("safetensors.torch", fromlist=["load_file"]).load_file(str(pretrained_file)))
    assert str(pretrained_file) in source
    assert torch.equal(model.blocks[0].attn.qkv.weight, hub.blocks[0].attn.qkv.weight)
    assert model.get_classifier().out_features == 10
    assert model.patch_embed.proj.weight.shape[1] == 1
    torch.testing.assert_close(model.patch_embed.proj.weight, hub.patch_embed.proj.weight.sum(1, keepdim=True))
    assert model.pos_embed.shape == (1, 1 + 4, 64) and hub.pos_embed.shape == (1, 1 + 100, 64)


def test_finetune_as_a_ray_task_saves_a_teacher_that_a_search_distils_from(
    finetuned: tuple[Path, str], tmp_path: Path
) -> None:
    from kdsearch.search.run import run_search

    space_file, said_by_finetune = finetuned
    lines = said_by_finetune.strip().splitlines()
    assert lines[0].startswith("Ray task on node ") and lines[0].endswith("(GPU 0)"), lines  # the declared GPU
    assert [line.split(":")[0] for line in lines if line.startswith("epoch ")] == [
        "epoch 1/3",
        "epoch 2/3",
        "epoch 3/3",
    ]
    assert "images/s" in lines[-2] and lines[-1].startswith("teacher saved to ")
    space = load_space(space_file)
    path = Path(space.teacher.checkpoint)
    meta = yaml.safe_load(path.with_suffix(".yaml").read_text())
    data = load_data(space)
    assert meta["made_by"] == FINETUNED_BY and meta["model"] == MODEL and meta["num_classes"] == 10
    assert meta["train_fingerprint"] == data.fingerprint and meta["recipe"]["epochs"] == 3
    assert meta["val_acc"] >= 0.6  # chance is 0.1
    assert evaluate(load_teacher(space, data=data), data) == pytest.approx(meta["val_acc"], abs=1e-6)

    said: list[str] = []
    result = run_search(space_file, storage=tmp_path / "runs", say=said.append)
    assert [t["status"] for t in result.trials] == ["completed"]
    assert any(line.startswith("teacher logits cached once for the search") for line in said), said
    assert all(t["teacher.model"] == MODEL for t in result.trials)


def test_an_existing_teacher_is_kept_unless_forced(finetuned: tuple[Path, str], capsys: pytest.CaptureFixture) -> None:
    space_file, _ = finetuned
    path = Path(load_space(space_file).teacher.checkpoint)
    before = path.read_bytes()
    assert run_cli(["teacher", "finetune", str(space_file)]) == 0
    assert "exists (val_acc" in capsys.readouterr().err and path.read_bytes() == before


def test_a_teacher_with_other_classes_is_one_line_naming_the_command(tmp_path: Path) -> None:
    torch.manual_seed(0)
    other = timm.create_model(MODEL, num_classes=7, in_chans=1, img_size=32)
    checkpoint = tmp_path / "seven.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(checkpoint))
    space = load_space(write(tmp_path, checkpoint))
    with pytest.raises(
        KdsearchError,
        match="has 7 classes but digits has 10; fine-tune test_vit on this data with `kdsearch teacher finetune SPACE --force`",
    ):
        load_teacher(space)
    # what `--force` then starts from: that checkpoint (not this command's), its head replaced
    with pytest.raises(KdsearchError, match="nothing to fine-tune test_vit from; set pretrained: true"):
        starting_point(space.teacher, force=False)
    model, source = initial_model(space.teacher, space.data, starting_point(space.teacher, force=True))
    assert source == f"the checkpoint {checkpoint}" and model.get_classifier().out_features == 10
    assert torch.equal(model.blocks[0].mlp.fc1.weight, other.blocks[0].mlp.fc1.weight)


def test_hub_weights_with_other_classes_name_the_command(pretrained_file: Path, tmp_path: Path) -> None:
    space = load_space(write(tmp_path, tmp_path / "unused.safetensors", pretrained_file))
    space = dataclasses.replace(space, teacher=dataclasses.replace(space.teacher, checkpoint=None))
    with pytest.raises(
        KdsearchError, match=r"weights have 1000 classes but digits has 10; .*`kdsearch teacher finetune SPACE`"
    ):
        load_teacher(space)


def test_a_teacher_trained_on_other_images_is_one_line(finetuned: tuple[Path, str], tmp_path: Path) -> None:
    source = Path(load_space(finetuned[0]).teacher.checkpoint)
    path = tmp_path / source.name
    shutil.copy(source, path)
    meta = yaml.safe_load(source.with_suffix(".yaml").read_text())
    path.with_suffix(".yaml").write_text(yaml.safe_dump({**meta, "train_fingerprint": "other images"}))
    space = load_space(write(tmp_path, path))
    with pytest.raises(
        KdsearchError,
        match=r"was trained on other training images than this space's; fine-tune it again with `kdsearch teacher finetune SPACE --force`$",
    ):
        load_teacher(space)
    with pytest.raises(KdsearchError, match="nothing to fine-tune test_vit from"):  # this command's output is no start
        starting_point(space.teacher, force=True)


def test_each_command_names_the_other(pretrained_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tests.helpers import write_space

    timm_space = write(tmp_path, tmp_path / "test_vit.safetensors", pretrained_file)
    assert run_cli(["teacher", "train", str(timm_space)]) == 2
    assert f"`kdsearch teacher finetune {timm_space}`" in capsys.readouterr().err
    builtin = write_space(tmp_path, tmp_path / "digits_cnn.safetensors")  # the built-in teacher
    assert run_cli(["teacher", "finetune", str(builtin)]) == 2
    assert (
        "`kdsearch teacher train SPACE`" in capsys.readouterr().err
        and not (tmp_path / "digits_cnn.safetensors").exists()
    )


def test_the_commands_defaults_are_the_recipes() -> None:
    from kdsearch.cli.train import teacher_finetune

    options = {name: p.default.default for name, p in inspect.signature(teacher_finetune).parameters.items()}
    assert {f.name: options[f.name] for f in dataclasses.fields(FinetuneRecipe)} == dataclasses.asdict(FinetuneRecipe())


def test_a_pretrained_file_that_is_missing_or_of_another_model_is_one_line(tmp_path: Path) -> None:
    other = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}, str(other))
    for pretrained, match in (
        (tmp_path / "none.safetensors", "does not exist$"),
        (other, "lacks .* of test_vit.s weights .*another model.s"),
    ):
        space = load_space(write(tmp_path, tmp_path / "out.safetensors", pretrained))
        with pytest.raises(KdsearchError, match=match) as e:
            initial_model(space.teacher, space.data, "pretrained")
        assert "\n" not in str(e.value)
