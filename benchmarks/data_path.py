"""Images per second of the training data path at CIFAR shapes, old against new, in one run.

Baseline: the per-image DataLoader path kdsearch had before its views moved to the device
(reimplemented here as it was): each image a PIL image, torchvision's transforms per image
(RandomCrop(padding=4) + RandomHorizontalFlip at 32 px; RandomResizedCrop + flip at 224 px;
ToTensor, Normalize), each seeded by its 4-byte seed through torch's RNG, in 1 and 2 loader
worker processes. New: `in_memory_data`'s batches, the uint8 tensor indexed and its views made
batched from the seeds (`kdsearch.train.augment`), in this process on the device given (the
CPU here; `benchmarks/gpu_check.py` runs it on a GPU). Generated CIFAR-shaped uint8 data, no
download. Every batch is a float32 (B, 3, S, S) tensor either way.

    .venv/bin/python benchmarks/data_path.py            # 10,000 images at 32 px, 2,000 at 224 px
    .venv/bin/python benchmarks/data_path.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kdsearch.space.specs import DataSpec
from kdsearch.train.data import CIFAR_MEAN, CIFAR_STD, in_memory_data, view_seeds
from kdsearch.train.splits import EpochSampler


def cifar_like(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n generated images as CIFAR holds them: uint8 (n, 32, 32, 3), labels 0..9."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


class PerImage(Dataset):
    """The old path: item (i, seed) -> torchvision's transforms on image i's PIL image under
    torch's RNG seeded with its seed (kdsearch's IndexedDataset over torchvision's CIFAR)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, size: int):
        from torchvision import transforms as T

        self.images, self.labels = images, labels
        norm = [T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)]
        if size <= 64:
            resize = [T.Resize(size, antialias=True)] if size != 32 else []
            self.tf = T.Compose(resize + [T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()] + norm)
        else:
            self.tf = T.Compose([T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip()] + norm)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: tuple[int, int]) -> tuple:
        from PIL import Image

        i, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            x = self.tf(Image.fromarray(self.images[i]))
        return x, torch.tensor(int(self.labels[i])), torch.tensor(i)


def per_image_rate(images: np.ndarray, labels: np.ndarray, size: int, workers: int, batch: int) -> float:
    """Images/s of the old path's second epoch (its workers started in the first)."""
    sampler = EpochSampler()
    loader = DataLoader(PerImage(images, labels, size), batch_size=batch, sampler=sampler, num_workers=workers,
                        persistent_workers=True, drop_last=True)  # fmt: skip
    rate = 0.0
    for epoch in range(2):
        sampler.order, sampler.seeds = (
            np.random.default_rng(epoch).permutation(len(labels)).tolist(),
            view_seeds(epoch, len(labels)),
        )
        t0, n = time.perf_counter(), 0
        for x, _, _ in loader:
            n += len(x)
        rate = n / (time.perf_counter() - t0)
    return rate


def batched_rate(
    images: np.ndarray, labels: np.ndarray, size: int, batch: int, device: torch.device, epochs: int = 2
) -> float:
    """Images/s of the new path's last epoch on `device` (synchronized on CUDA), the images
    placed there first, as a trial places them."""
    spec = DataSpec(name="cifar10", img_size=size, augment=True, val_fraction=0.1)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    data = in_memory_data(spec, x, torch.from_numpy(labels), num_classes=10, fingerprint="bench", mean=CIFAR_MEAN,
                          std=CIFAR_STD).place(device)  # fmt: skip
    rate = 0.0
    for epoch in range(epochs):
        t0, n = time.perf_counter(), 0
        for views, _, _ in data.train_batches(batch, epoch, 0):
            n += len(views)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rate = n / (time.perf_counter() - t0)
    return rate


def jpeg_folder(folder: Path, n: int) -> list[tuple[str, int]]:
    """n generated 48 x 64 JPEGs (smooth gradients and noise, as photographs compress) in `folder`."""
    from PIL import Image

    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:48, :64]
    samples = []
    for i in range(n):
        base = (np.stack([yy * 5, xx * 4, (yy + xx) * 2], axis=-1) + rng.integers(0, 60, 3)) % 256
        img = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i}.jpg", quality=90)
        samples.append((str(folder / f"{i}.jpg"), i % 10))
    return samples


def jpeg_rate(n: int, size: int, batch: int, device: torch.device, workers: int = 2) -> dict:
    """An image folder of JPEGs through `Data.train_batches` on `device` (nvJPEG on CUDA, the
    workers' CPU decoding otherwise): images/s of its second epoch, and the largest difference
    of its views from those of the CPU path (nvJPEG's decoder is not libjpeg's)."""
    import tempfile

    from kdsearch.train.augment import ViewTransform
    from kdsearch.train.folder_data import FolderSplit
    from kdsearch.train.splits import Data

    spec = DataSpec(name="imagefolder", img_size=size, augment=True)
    with tempfile.TemporaryDirectory() as tmp:
        samples = jpeg_folder(Path(tmp), n)
        split = FolderSplit(samples, ViewTransform(size, CIFAR_MEAN, CIFAR_STD, augment=True))
        data = Data(spec, split, split, 10, 3, "bench", random_augment=True).place(device)
        for epoch in range(2):
            t0, seen = time.perf_counter(), 0
            for views, _, _ in data.train_batches(batch, epoch, 0, workers=workers):
                seen += len(views)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rate = seen / (time.perf_counter() - t0)
        idx, seeds = torch.arange(8), view_seeds(0, n)[:8]
        cpu = FolderSplit(samples, split.transform).views(idx, seeds)
        diff = (data.views(idx, seeds).cpu() - cpu).abs().max().item()
    return {"images_per_second": rate, "max_abs_diff_from_cpu_decode": diff}


def epoch_wait_share(images: np.ndarray, labels: np.ndarray, size: int, batch: int, device: torch.device) -> float:
    """The share of a small student's training epoch that waited for its batches, as the epoch
    rows record it (`train_epoch`'s data_wait: CUDA events on a GPU), after a warm-up epoch."""
    from kdsearch.models.student import build_student
    from kdsearch.space.specs import RecipeSpec, StudentSpec, TeacherSource, TrainSpec
    from kdsearch.train.distill import DistillLoss
    from kdsearch.train.loop import DistillStep, TeacherSignal, make_optimizer, train_epoch

    spec = DataSpec(name="cifar10", img_size=size, augment=True, val_fraction=0.1)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    data = in_memory_data(spec, x, torch.from_numpy(labels), num_classes=10, fingerprint="bench", mean=CIFAR_MEAN,
                          std=CIFAR_STD).place(device)  # fmt: skip
    student = StudentSpec(img_size=size, in_chans=3, num_classes=10, patch_size=16, embed_dim=192, depth=2, num_heads=3)
    step = DistillStep(build_student(student), DistillLoss(RecipeSpec(alpha=0.0))).to(device)
    train = TrainSpec(batch_size=batch, epochs=2)
    optimizer, schedule = make_optimizer([step], train, max(1, data.num_train // batch))
    share = 0.0
    for epoch in range(2):
        t0 = time.perf_counter()
        out = train_epoch(step, TeacherSignal(TeacherSource.NONE), data, optimizer, schedule, train, epoch, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        share = out["data_wait"] / (time.perf_counter() - t0)
    return share


def replays_on(images: np.ndarray, labels: np.ndarray, size: int, device: torch.device) -> bool:
    """Whether a training batch made on `device` equals, bit for bit, the views `Data.views`
    makes there for the replay cache (other batch sizes, other orders)."""
    spec = DataSpec(name="cifar10", img_size=size, augment=True, val_fraction=0.1)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    data = in_memory_data(spec, x, torch.from_numpy(labels), num_classes=10, fingerprint="bench", mean=CIFAR_MEAN,
                          std=CIFAR_STD).place(device)  # fmt: skip
    seeds = view_seeds(0, data.num_train)
    views, _, idx = next(data.train_batches(64, 0, 5))
    return bool(torch.equal(views, data.views(idx, seeds[idx.numpy()])))


def device_figures(device: torch.device, n: int, batch: int) -> dict:
    """The data path's figures on `device` (benchmarks/gpu_check.py): batched views images/s at
    32 px kept and 32 to 224 px, and an image folder of JPEGs decoded there."""
    images, labels = cifar_like(max(n, 100))  # val carves 10% stratified: at least one image per class
    return {
        "views 32 px kept": batched_rate(images, labels, 32, batch, device),
        "views 32 -> 224 px": batched_rate(images, labels, 224, batch, device),
        "replayed bit for bit, 32 px and 224 px": all(replays_on(images, labels, s, device) for s in (32, 224)),
        "data_wait_share of a 2-block student at 224 px": epoch_wait_share(images, labels, 224, batch, device),
        "jpeg folder 48x64 -> 224 px": jpeg_rate(
            max(4 * batch, 16), 224, batch, device, 2 if device.type == "cuda" else 1
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000, help="generated images at 32 px")
    parser.add_argument("--images-224", type=int, default=2_000, help="generated images for the 224 px rows")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 512 and 256 images, batch 64")
    args = parser.parse_args()
    if args.quick:
        args.images, args.images_224, args.batch = 512, 256, 64
    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; batch {args.batch}; images/s")
    print("per-image: the old DataLoader path with 1 or 2 worker processes; batched: this process, 1 or 2 threads")
    print("speed-up: batched 1 thread / per-image 1 worker, and best against best")
    print(
        f"{'shape':18s} {'per-image 1':>11s} {'per-image 2':>12s} {'batched 1':>10s} {'batched 2':>11s} "
        f"{'1 vs 1':>9s} {'best':>9s}"
    )
    for size, n in ((32, args.images), (224, args.images_224)):
        images, labels = cifar_like(n)
        old = [per_image_rate(images, labels, size, w, args.batch) for w in (1, 2)]
        new = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            new.append(batched_rate(images, labels, size, args.batch, cpu))
        shape = f"32 px -> {size} px" if size != 32 else "32 px kept"
        print(
            f"{shape:18s} {old[0]:11,.0f} {old[1]:12,.0f} {new[0]:10,.0f} {new[1]:11,.0f} "
            f"{new[0] / old[0]:8.1f}x {max(new) / max(old):8.1f}x"
        )


if __name__ == "__main__":
    main()
