"""The built-in teacher: a small CNN for the embedded digits, and its training.

kdsearch trains it itself (`kdsearch teacher train SPACE`, or the first search that needs it)
so the whole loop runs with no download. It has timm's two-step interface,
`forward_features(x)` then `forward_head(features)`, like every teacher kdsearch uses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdsearch.data import Data
from kdsearch.training import evaluate


class DigitsCNN(nn.Module):
    """A small CNN for the embedded digits: two conv stages, global pooling, a linear head."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.stem = stage(in_chans, width)
        self.stage2 = stage(width, 2 * width)
        self.head = nn.Linear(2 * width, num_classes)
        self.num_classes = num_classes
        self.num_features = 2 * width

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 2w, H/4, W/4) feature map."""
        x = F.max_pool2d(self.stem(x), 2)
        return F.max_pool2d(self.stage2(x), 2)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(features.mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


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
