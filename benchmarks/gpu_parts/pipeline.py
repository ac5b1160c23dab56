"""Part 5 — the data pipeline: one CIFAR-shaped training epoch (50,000 3×32×32 images, batch
256) held in device memory with random crop + flip on the device (what ``[data]
device_resident = true`` does, :class:`sparsefw.augment.DeviceAugment`), against the usual
DataLoader epoch: PIL images through torchvision's ``RandomCrop(32, padding=4)`` and
``RandomHorizontalFlip`` in worker processes, pinned and copied to the device. Both go through
the engine's :class:`~sparsefw.engine.loaders.BatchSource`. Images per second, the device
synchronised at the end of each epoch; the images are random (the pipeline's cost does not
depend on the content). ``--tiny``: 1,024 images, batch 64, 2 workers.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from sparsefw.augment import DeviceAugment
from sparsefw.engine.loaders import BatchSource

from gpu_parts.budget import PartContext
from timing import sync

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


class PilImages(Dataset):
    """uint8 HWC images served as torchvision's CIFAR data sets serve them: a PIL image through
    the transform, and the label."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def _epoch_rate(source: BatchSource, device: torch.device, epoch: int) -> dict:
    t0 = time.perf_counter()
    n = 0
    for x, _y in source.epoch(epoch):
        n += x.shape[0]
    sync(device)
    dt = time.perf_counter() - t0
    return {"images": n, "seconds": dt, "images_per_s": n / dt}


def run(ctx: PartContext) -> None:
    from torchvision import transforms as T

    device = ctx.device
    n, batch = (1024, 64) if ctx.tiny else (50_000, 256)
    workers = 2 if ctx.tiny else min(8, os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    ctx.figures.update(images=n, batch=batch, workers=workers)

    ctx.check("the device-resident epoch")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    x = ((x - mean) / std).contiguous()
    fill = tuple((-mean.flatten() / std.flatten()).tolist())
    resident = BatchSource(TensorDataset(x, torch.from_numpy(labels)), batch, device,
                           shuffle=True, drop_last=True, in_memory=True,
                           augment=DeviceAugment("crop_flip", 4, fill))
    _epoch_rate(resident, device, 0)  # warm-up: kernels, allocator
    dev = _epoch_rate(resident, device, 1)

    ctx.check("the DataLoader epoch")
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(MEAN, STD)])
    loader = BatchSource(PilImages(images, labels, transform), batch, device, shuffle=True,
                         drop_last=True, num_workers=workers)
    dl = _epoch_rate(loader, device, 0)  # a new DataLoader per epoch: worker start-up included
    ctx.figures.update(device_resident=dev, dataloader=dl,
                       speedup=dev["images_per_s"] / dl["images_per_s"])
    ctx.lines += [
        "| pipeline | images | epoch s | images/s |", "|---|---|---|---|",
        f"| device-resident, crop+flip on {device.type} | {dev['images']} | "
        f"{dev['seconds']:.3f} | {dev['images_per_s']:,.0f} |",
        f"| DataLoader, {workers} workers, PIL crop+flip | {dl['images']} | "
        f"{dl['seconds']:.3f} | {dl['images_per_s']:,.0f} |",
        "",
        f"- device-resident / DataLoader: {ctx.figures['speedup']:.1f}x",
    ]
