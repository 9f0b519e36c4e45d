"""The built-in teacher's network: a small CNN for the embedded digits.

kdsearch trains it itself (kdsearch.train.digits_teacher) so the whole loop runs with no
download. It has timm's two-step interface, `forward_features(x)` then
`forward_head(features)`, like every teacher kdsearch uses.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


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
