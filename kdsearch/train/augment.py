"""Training views made from each image's 4-byte seed, batched on the images' device.

An image's view is a pure function of (image, seed): its crop and flip come from a
counter-based hash of the seed (splitmix64 over (seed, k), in numpy: never torch's global
RNG), and every torch operation applied to a batch computes each image from that image alone
(indexing, elementwise arithmetic, `grid_sample`, `interpolate`), so a batch of any size or
order gives each image the bits it gets alone. `ViewTransform.view_of` is that one-image path
(DataLoader workers of image folders, the tests' reference).

Two regimes, as torchvision's usual recipes: up to 64 px a random crop with `img_size // 8`
zero padding and a horizontal flip (after resizing to `img_size`); above it a random resized
crop (scale 0.08-1, ratio 3/4-4/3, torchvision's ten tries then its centre fallback) sampled
bilinearly to `img_size`, and a flip. The plain (val, test, teacher-cache) view resizes the
shorter side to `img_size` (antialiased) and keeps the centre square. Each view is x / 255,
normalized by the dataset's mean and std.
Digits keep their own augmentation (`shift_and_rotate`) on their float images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

TRANSFORM_VERSION = "seeded-batched-1"  # enters every fingerprint: a change of the views is a new cache
SMALL_IMAGE = 64  # up to this img_size: pad-crop and flip; above it: random resized crop and flip
SCALE, RATIO, TRIES = (0.08, 1.0), (3 / 4, 4 / 3), 10
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer of each uint64 (wrapping arithmetic): a counter-based hash."""
    with np.errstate(over="ignore"):
        z = (x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def seed_uniforms(seeds: np.ndarray, count: int) -> np.ndarray:
    """(B, count) float64 uniforms in [0, 1): draw k of image b is a hash of (seeds[b], k) alone."""
    s = np.asarray(seeds, dtype=np.uint64).reshape(-1, 1)
    counters = (s << np.uint64(8)) | np.arange(count, dtype=np.uint64).reshape(1, -1)
    return (splitmix64(counters) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def pad_crop_params(seeds: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each image's crop offsets (dy, dx) in [0, 2 * pad] and whether it is flipped."""
    u = seed_uniforms(seeds, 3)
    span = 2 * pad + 1
    return (u[:, 0] * span).astype(np.int64), (u[:, 1] * span).astype(np.int64), u[:, 2] < 0.5


def resized_crop_boxes(seeds: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's RandomResizedCrop boxes, drawn from the seeds: (B, 4) float64 (top, left,
    height, width) in pixels of an h x w image, and (B,) whether each view is flipped."""
    u = seed_uniforms(seeds, 4 * TRIES + 1)
    area = h * w
    target = area * (SCALE[0] + u[:, 0:TRIES] * (SCALE[1] - SCALE[0]))
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    aspect = np.exp(log_lo + u[:, TRIES : 2 * TRIES] * (log_hi - log_lo))
    bw, bh = np.round(np.sqrt(target * aspect)), np.round(np.sqrt(target / aspect))
    fits = (bw > 0) & (bw <= w) & (bh > 0) & (bh <= h)
    top = np.floor(u[:, 2 * TRIES : 3 * TRIES] * (h - bh + 1))
    left = np.floor(u[:, 3 * TRIES : 4 * TRIES] * (w - bw + 1))
    first = np.argmax(fits, axis=1)  # the first try that fits; none fits: the centre fallback below
    rows = np.arange(len(u))
    boxes = np.stack([top[rows, first], left[rows, first], bh[rows, first], bw[rows, first]], axis=1)
    ratio = w / h
    fh, fw = (h, round(h * RATIO[1])) if ratio > RATIO[1] else (round(w / RATIO[0]), w) if ratio < RATIO[0] else (h, w)
    fallback = np.array([(h - fh) // 2, (w - fw) // 2, fh, fw], dtype=np.float64)
    boxes[~fits.any(axis=1)] = fallback
    return boxes, u[:, 4 * TRIES] < 0.5


def box_grid(boxes: np.ndarray, flips: np.ndarray, h: int, w: int, size: int, device: torch.device) -> Tensor:
    """The (B, size, size, 2) `grid_sample` grid (align_corners=False) that samples each box at
    size x size pixel centres, mirrored where flipped; computed in float64, then float32."""
    centres = (np.arange(size, dtype=np.float64) + 0.5) / size
    xs = 2 * (boxes[:, 1:2] + centres[None, :] * boxes[:, 3:4]) / w - 1  # (B, size)
    ys = 2 * (boxes[:, 0:1] + centres[None, :] * boxes[:, 2:3]) / h - 1
    xs = np.where(flips[:, None], xs[:, ::-1], xs).astype(np.float32)
    ys = ys.astype(np.float32)
    b = len(boxes)
    if device.type == "cpu":  # filled in numpy: a third of torch's time for this copy
        grid = np.empty((b, size, size, 2), dtype=np.float32)
        grid[..., 0], grid[..., 1] = xs[:, None, :], ys[:, :, None]
        return torch.from_numpy(grid)
    out = torch.empty(b, size, size, 2, device=device)  # filled on the device: only (B, size) pairs travel
    out[..., 0] = torch.from_numpy(xs).to(device)[:, None, :]
    out[..., 1] = torch.from_numpy(ys).to(device)[:, :, None]
    return out


def pad_crop_flip(x: Tensor, seeds: np.ndarray, pad: int) -> Tensor:
    """Each (square) image zero-padded by `pad`, cropped back to its size at its seed's offset,
    flipped by its seed: one gather of each image's own pixels, so exact in any dtype."""
    b, c, size, _ = x.shape
    dy, dx, flips = pad_crop_params(seeds, pad)
    ar = np.arange(size)
    cols = np.where(flips[:, None], dx[:, None] + ar[::-1], dx[:, None] + ar)  # (B, size)
    rows = dy[:, None] + ar
    side = size + 2 * pad
    flat = (rows[:, :, None] * side + cols[:, None, :]).reshape(b, 1, size * size)  # into the padded image
    padded = F.pad(x, (pad, pad, pad, pad)).reshape(b, c, side * side)
    index = torch.from_numpy(flat).to(x.device).expand(b, c, size * size)
    return padded.gather(2, index).reshape(b, c, size, size)


@dataclass(frozen=True)
class ViewTransform:
    """The views of uint8 (B, C, H, W) images at `size`, normalized by `mean` and `std`."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False

    @property
    def key(self) -> dict:
        """What identifies the views it makes (a part of every fingerprint). Not whether it
        augments: the plain views are the same, and the replay cache of augmented ones is apart."""
        return {"transform": TRANSFORM_VERSION, "size": self.size, "mean": self.mean, "std": self.std}

    def normalize(self, x: Tensor) -> Tensor:
        """Float32 (x - 255 mean) / (255 std), elementwise: (x / 255 - mean) / std."""
        mean = torch.tensor([255 * m for m in self.mean], dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor([255 * s for s in self.std], dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        return (x.float() - mean) / std

    def fit(self, x: Tensor) -> Tensor:
        """Shorter side resized to `size` (bilinear, antialiased; float out), the centre square kept;
        images already size x size pass unchanged."""
        h, w = x.shape[-2:]
        if (h, w) == (self.size, self.size):
            return x
        scale = self.size / min(h, w)
        th, tw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        x = F.interpolate(x.float(), size=(th, tw), mode="bilinear", align_corners=False, antialias=True)
        top, left = (th - self.size) // 2, (tw - self.size) // 2
        return x[..., top : top + self.size, left : left + self.size]

    def views(self, x: Tensor, seeds: np.ndarray | None = None) -> Tensor:
        """Float32 (B, C, size, size): the augmented views of `x` from `seeds` when this transform
        augments and seeds are given, else the plain views. On x's device. Resampling is linear,
        so images smaller than the views are normalized before it (fewer pixels), larger ones after."""
        h, w = x.shape[-2:]
        first = h * w <= self.size * self.size  # normalize before resampling
        if not self.augment or seeds is None:
            return self.fit(self.normalize(x)) if first else self.normalize(self.fit(x))
        seeds = np.asarray(seeds, dtype=np.uint32).reshape(-1)
        if self.size <= SMALL_IMAGE:  # the padding is black: normalized after it
            return self.normalize(pad_crop_flip(self.fit(x), seeds, self.size // 8))
        boxes, flips = resized_crop_boxes(seeds, h, w)
        grid = box_grid(boxes, flips, h, w, self.size, x.device)
        source = self.normalize(x) if first else x.float()
        views = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return views if first else self.normalize(views)

    def view_of(self, image: Tensor, seed: int | None = None) -> Tensor:
        """One uint8 (C, H, W) image's view: the batched path on a batch of one (the same bits)."""
        return self.views(image[None], None if seed is None else np.array([seed], dtype=np.uint32))[0]


def shift_and_rotate(
    x: torch.Tensor, seeds: np.ndarray, max_shift: float = 2.0, max_degrees: float = 12.0
) -> torch.Tensor:
    """Digits' augmentation: each image shifted by up to `max_shift` pixels and rotated by up to
    `max_degrees`, its parameters drawn from its own seed. The sampling grid is built with
    elementwise operations only, so an image's view is the same bit for bit in any batch."""
    b, _, h, w = x.shape
    params = np.array([np.random.default_rng(int(s)).uniform(-1, 1, 3) for s in seeds], dtype=np.float64)
    kw = {"dtype": x.dtype, "device": x.device}
    angle = torch.tensor(params[:, 0] * math.radians(max_degrees), **kw).view(b, 1, 1)
    tx = torch.tensor(params[:, 1] * 2 * max_shift / w, **kw).view(b, 1, 1)
    ty = torch.tensor(params[:, 2] * 2 * max_shift / h, **kw).view(b, 1, 1)
    ys, xs = torch.meshgrid((torch.arange(h, **kw) * 2 + 1) / h - 1, (torch.arange(w, **kw) * 2 + 1) / w - 1,
                            indexing="ij")  # fmt: skip
    cos, sin = torch.cos(angle), torch.sin(angle)
    gx = cos * xs - sin * ys + tx
    gy = sin * xs + cos * ys + ty
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
