"""The ONNX graph `kdsearch export` writes: every positional encoding, with and without the
distillation token, gives onnxruntime's logits within ONNX_ATOL of PyTorch's at batch sizes
other than the one it was traced with, and a graph that disagrees with its model is refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from kdsearch.errors import KdsearchError
from kdsearch.models.student import build_student
from kdsearch.results.export import ONNX_ATOL, check_onnx, write_onnx
from kdsearch.space.specs import POS_EMBEDS, StudentSpec

TINY = StudentSpec(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0)


@pytest.mark.parametrize("pos_embed", POS_EMBEDS)
def test_onnx_logits_match_pytorch_for_every_encoding(pos_embed: str, tmp_path: Path) -> None:
    token = POS_EMBEDS.index(pos_embed) % 2 == 1  # half of them with DeiT's distillation token
    spec = dataclasses.replace(TINY, pos_embed=pos_embed, distill_token=token)
    torch.manual_seed(0)
    model = build_student(spec).eval()
    path = tmp_path / "model.onnx"
    assert write_onnx(model, path) >= 18
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # one file, no external data
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch" and [o.name for o in session.get_outputs()] == ["logits"]
    g = torch.Generator().manual_seed(1)
    for batch in (5, 1):  # traced with 2
        x = torch.randn(batch, 1, 16, 16, generator=g)
        with torch.inference_mode():
            expected = model(x).numpy()
        got = session.run(["logits"], {"images": x.numpy()})[0]
        assert got.shape == (batch, 10)
        assert np.abs(got - expected).max() <= ONNX_ATOL
    x = torch.randn(6, 1, 16, 16, generator=g)
    assert check_onnx(path, model, x) <= ONNX_ATOL
    with torch.no_grad():
        model.head.bias += 0.01  # the PyTorch model moves on, the graph does not: refused
    moved = 0.01 / 2 if token else 0.01  # a distilled student averages its two heads
    with pytest.raises(
        KdsearchError, match=rf"differ from PyTorch's by up to {moved:.3g} on 6 images \(allowed: 0\.0001\)"
    ):
        check_onnx(path, model, x)


def test_the_check_uses_real_images_or_says_it_could_not(tmp_path: Path) -> None:
    from kdsearch.results.export import ONNX_CHECK_IMAGES, check_images
    from kdsearch.space.specs import DataSpec, TrialSpec

    images, where = check_images(TrialSpec(student=TINY, data=DataSpec(img_size=16)))
    assert images.shape == (ONNX_CHECK_IMAGES, 1, 16, 16) and where == "digits val images"
    assert images.min() == -1.0  # digits are scaled to [-1, 1]: the background is exactly -1
    student = dataclasses.replace(TINY, in_chans=3, img_size=32)
    missing = DataSpec(name="cifar10", img_size=32, root=str(tmp_path / "nowhere"))
    images, where = check_images(TrialSpec(student=student, data=missing))
    assert images.shape == (ONNX_CHECK_IMAGES, 3, 32, 32) and where.startswith("random images (cifar10 is not here: ")
