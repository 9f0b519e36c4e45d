"""Shared fixtures: a digits space whose built-in teacher is trained once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SPACE_YAML = """
name: digits_test
data: {{name: digits, img_size: 16}}
teacher: {{model: kdsearch/digits_cnn, checkpoint: {checkpoint}}}
student:
  embed_dim: {{choices: [32, 48], default: 32}}
  depth: {{choices: [1, 2], default: 2}}
  num_heads: [2, 4]
  mlp_ratio: 2.0
  patch_size: [4, 2]
  pos_embed: [learned, sincos, relpos, rope, cpe, none]
  distill_token: [false, true]
recipe:
  alpha: {{low: 0.0, high: 1.0, default: 0.5}}
  temperature: 4.0
  hard_weight: 0.0
train: {{epochs: 2, batch_size: 64, lr: 2.0e-3, warmup_epochs: 1, seed: 0}}
budget: {{max_gflops: 0.004}}
search: {{trials: 6, sampler: random}}
"""


@pytest.fixture(scope="session")
def digits_teacher_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in CNN, trained briefly (3 epochs, about 95% val) and saved once per session."""
    from kdsearch.data import load_data
    from kdsearch.specs import DataSpec
    from kdsearch.teacher import BUILTIN, save_teacher, train_digits_teacher

    torch.set_num_threads(2)
    path = tmp_path_factory.mktemp("teacher") / "digits_cnn.safetensors"
    model, acc = train_digits_teacher(load_data(DataSpec()), epochs=3)
    save_teacher(model, path, {"model": BUILTIN, "val_acc": acc})
    return path


@pytest.fixture(scope="session")
def digits_space_file(digits_teacher_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("space") / "digits_test.yaml"
    path.write_text(SPACE_YAML.format(checkpoint=digits_teacher_path))
    return path


@pytest.fixture(scope="session")
def digits_space(digits_space_file: Path):
    from kdsearch.space import load_space

    return load_space(digits_space_file)


@pytest.fixture(scope="session")
def small_run(digits_teacher_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """One real search (8 trials on a local Ray) shared by the tests that inspect a run."""
    from kdsearch.search import run_search
    from tests.helpers import write_space

    tmp = tmp_path_factory.mktemp("search")
    space = write_space(tmp, digits_teacher_path, max_concurrent=1)  # one at a time: the same trials stop early every run
    return run_search(space, storage=tmp / "runs", live=False, say=lambda s: None), space
