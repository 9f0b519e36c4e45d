"""Training the built-in teacher (kdsearch.models.digits_cnn) on the embedded digits.

Run by `kdsearch teacher train SPACE`, or by the first search or trial that needs the teacher
and finds no checkpoint where the space points (then saved there, once).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kdsearch.models.digits_cnn import DigitsCNN
from kdsearch.train.data import Data
from kdsearch.train.evaluation import evaluate


def train_digits_teacher(
    data: Data, epochs: int = 20, seed: int = 0, log: Callable[[str], None] = lambda s: None
) -> tuple[DigitsCNN, float]:
    """Train the built-in CNN on `data`; returns it (eval mode) and its val accuracy."""
    torch.manual_seed(seed)
    model = DigitsCNN(data.in_chans, data.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * -(-data.num_train // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        for x, y, _ in data.train_batches(64, epoch, seed):
            x = _shift(x, epoch)
            loss = F.cross_entropy(model(x), y, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = evaluate(model, data)
        log(f"teacher epoch {epoch + 1}/{epochs}: val_acc {acc:.4f}")
    model.eval()
    return model, acc


def _shift(x: Tensor, epoch: int) -> Tensor:
    """A random shift by up to one pixel (a cheap augmentation for 16px digits)."""
    g = torch.Generator().manual_seed(epoch)
    dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))
