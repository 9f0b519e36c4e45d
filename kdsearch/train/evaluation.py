"""Top-1 accuracy of a model on the val split, the held-out test split or any batches.

Below the teachers and the training loop: the loop, the built-in teacher's training
(kdsearch.train.digits_teacher) and the CLI all measure with these.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.data import Dataset

from kdsearch.train.data import Batch, Data, read_test_batches


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Data, device: str | torch.device = "cpu", batch_size: int = 512, workers: int = 0
) -> float:
    """Top-1 accuracy of `model` on the val split (see `accuracy`)."""
    return accuracy(model, data.val_batches(batch_size, workers), device)


def evaluate_test(
    model: nn.Module, test: Dataset, device: str | torch.device = "cpu", batch_size: int = 512, workers: int = 0
) -> float:
    """Top-1 accuracy of `model` on the held-out test split (`kdsearch.train.data.load_test`);
    every image read is counted there. Only `eval`, `export` and `confirm` call this."""
    return accuracy(model, read_test_batches(test, batch_size, workers), device)


def accuracy(model: nn.Module, batches: Iterable[Batch], device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of `model` (in eval mode: a DeiT student averages its two heads) over
    `batches`; in bf16 autocast on CUDA, as it trains."""
    model.eval()
    device = torch.device(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    correct = total = 0
    with torch.no_grad():  # not inference_mode: a module may cache a tensor that training then uses
        for x, y, _ in batches:
            with autocast:
                logits = model(x.to(device))
            correct += int((logits.argmax(-1).cpu() == y).sum())
            total += len(y)
    return correct / max(total, 1)
