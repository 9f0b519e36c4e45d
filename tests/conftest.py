"""Shared fixtures: a digits space whose built-in teacher is trained once per test session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch


def hide_wandb_from_child_processes() -> None:
    """Every process this session starts (Ray's workers, the CLI's subprocesses, local.sh nodes
    started with this environment) finds a `wandb` that fails to import.

    NOTE: timm imports wandb whenever it can (timm.utils.summary), and wandb's import costs
    every process that imports timm about 0.5 s: about two minutes of this suite. Only
    `--track wandb` uses it, and only in the driver: tests/test_trackers.py runs it in this
    process, whose own sys.path this leaves as it is.
    """
    shim = Path(tempfile.mkdtemp(prefix="kdsearch-no-wandb-")) / "wandb"
    shim.mkdir()
    (shim / "__init__.py").write_text('raise ImportError("wandb is hidden from the test session\'s child processes")\n')
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim.parent), os.environ.get("PYTHONPATH")]))


hide_wandb_from_child_processes()


@pytest.fixture(scope="session")
def digits_teacher_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in CNN, trained briefly (3 epochs, about 95% val) and saved once per session."""
    from kdsearch.space.specs import DataSpec
    from kdsearch.train.data import load_data
    from kdsearch.train.digits_teacher import train_digits_teacher
    from kdsearch.train.teacher import builtin_teacher_meta, save_teacher

    torch.set_num_threads(2)
    path = tmp_path_factory.mktemp("teacher") / "digits_cnn.safetensors"
    data = load_data(DataSpec())
    model, acc = train_digits_teacher(data, epochs=3)
    save_teacher(model, path, builtin_teacher_meta(data, acc))
    return path


@pytest.fixture(scope="session")
def digits_space_file(digits_teacher_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers import write_space

    return write_space(tmp_path_factory.mktemp("space"), digits_teacher_path, epochs=2)


@pytest.fixture(scope="session")
def digits_space(digits_space_file: Path):
    from kdsearch.space.file import load_space

    return load_space(digits_space_file)


@pytest.fixture(scope="session")
def small_run(digits_teacher_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """One real search (8 trials on a local Ray) shared by the tests that inspect a run."""
    from kdsearch.search.run import run_search
    from kdsearch.train.data import TEST_READ_LOG
    from tests.helpers import write_space

    tmp = tmp_path_factory.mktemp("search")
    space = write_space(
        tmp, digits_teacher_path, max_concurrent=1
    )  # one at a time: the same trials stop early every run
    # every process of the search (the driver, Ray's workers) logs any test-split image it reads here
    os.environ[TEST_READ_LOG] = str(tmp / "test_reads.log")
    try:
        return run_search(space, storage=tmp / "runs", say=lambda s: None), space
    finally:
        del os.environ[TEST_READ_LOG]


@pytest.fixture(scope="module")
def shared_ray():
    """One embedded Ray for the in-process searches of a module (run_search leaves a Ray it did
    not start running): about 5 s saved per search. Only for searches that need nothing from
    the test's environment in Ray's workers (they start with the Ray, before the test runs),
    and never beside `--address` (run_search would use this Ray instead)."""
    import ray

    from kdsearch.search.ray_session import init_ray

    init_ray(None)
    try:
        yield
    finally:
        ray.shutdown()
