"""Built-in data sets: what a ``[data]`` section can name.

Every factory takes its frozen attrs config and returns a :class:`DataSplits`. Two kinds exist:

* **in memory** (``digits``, ``synthetic``): ``train``/``test`` are
  :class:`torch.utils.data.TensorDataset` of already-normalised float inputs and int64 targets,
  so the engine can move them to the device once and index batches there;
* **file based** (``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``, ``svhn``,
  ``image_folder``): torchvision data sets with their transforms, read through a DataLoader.

``digits`` is the default: the UCI optical handwritten digits (8x8, 10 classes) ship inside the
package (``sparsefw/_data``), so a run works offline and in seconds.
"""

import functools
import gzip
from collections.abc import Callable
from pathlib import Path

import attrs
import torch
from attrs import validators as v
from torch.utils.data import Dataset, TensorDataset

__all__ = [
    "DataSplits",
    "DigitsConfig",
    "ImageFolderConfig",
    "SyntheticConfig",
    "TorchvisionDataConfig",
    "cifar10",
    "cifar100",
    "digits",
    "fashion_mnist",
    "image_folder",
    "mnist",
    "svhn",
    "synthetic",
]


@attrs.frozen(eq=False)
class DataSplits:
    """A data set's train and test splits and what a model needs to know about them.

    ``input_shape`` is ``(C, H, W)`` for images or ``(features,)``. When ``in_memory`` is true,
    ``train`` and ``test`` are ``TensorDataset``\\ s of ``(float inputs, int64 targets)`` with the
    inputs already normalised.

    ``input_range`` is the valid input range in the normalised space the model sees, ``(lo,
    hi)``: the image of the raw pixel range (e.g. [0, 1] or [0, 16]) under the data set's
    normalisation. Each bound is a float, or a tuple of one float per channel for data sets
    normalised per channel with different statistics (CIFAR, SVHN, ImageNet folders). ``None``
    means unbounded (synthetic Gaussian inputs). Adversarial attacks clip to it
    (:mod:`sparsefw.attacks`).
    """

    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    in_memory: bool = False
    input_range: tuple[float | tuple[float, ...], float | tuple[float, ...]] | None = None
    #: augmentation the engine applies on the device to in-memory training batches
    #: (a :class:`sparsefw.augment.DeviceAugment`), or ``None``
    device_augment: object = None


_positive = v.gt(0)


def _positive_ints(_inst, attribute, value):
    if (
        not isinstance(value, tuple)
        or not value
        or any(not isinstance(x, int) or isinstance(x, bool) or x <= 0 for x in value)
    ):
        raise ValueError(
            f"{attribute.name} must be a non-empty tuple of positive ints, got {value!r}"
        )


def _normalise(train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero mean, unit variance per channel (dim 1 of image batches, else one scalar), with the
    statistics of the training split."""
    mean, std = _statistics(train_x)
    return (train_x - mean) / std, (test_x - mean) / std


def _statistics(train_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and std :func:`_normalise` uses (broadcastable to ``train_x``)."""
    dims = [0, *range(2, train_x.dim())] if train_x.dim() > 2 else list(range(train_x.dim()))
    mean = train_x.mean(dim=dims, keepdim=True)
    std = train_x.std(dim=dims, keepdim=True).clamp_min(1e-8)
    return mean, std


def _range_of(lo: float, hi: float, mean, std) -> tuple:
    """Raw pixel range ``[lo, hi]`` in normalised units: floats for one set of statistics,
    per-channel tuples otherwise. Computed in float32 exactly as the inputs are normalised, so
    the extreme pixel values map onto the bounds bit for bit."""
    mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
    std = torch.as_tensor(std, dtype=torch.float32).flatten()
    lo_n = ((torch.full_like(mean, lo) - mean) / std).tolist()
    hi_n = ((torch.full_like(mean, hi) - mean) / std).tolist()
    if len(lo_n) == 1:
        return (lo_n[0], hi_n[0])
    return (tuple(lo_n), tuple(hi_n))


# --------------------------------------------------------------------------------------------
# digits (embedded, default)
# --------------------------------------------------------------------------------------------
@attrs.frozen
class DigitsConfig:
    """Options of ``digits``: the held-out fraction, the split's seed, flat (64,) inputs."""

    #: fraction of each class held out as the test split (stratified)
    test_fraction: float = attrs.field(default=0.2, validator=[v.gt(0.0), v.lt(1.0)])
    #: seed of the train/test split (independent of the run's ``seed``)
    split_seed: int = attrs.field(default=0, validator=v.ge(0))
    #: inputs as flat ``(64,)`` vectors instead of ``(1, 8, 8)`` images
    flatten: bool = attrs.field(default=False, validator=v.instance_of(bool))


_DIGITS_FILE = Path(__file__).parent / "_data" / "digits.csv.gz"


@functools.cache
def _digits_raw() -> tuple[torch.Tensor, torch.Tensor]:
    """The embedded table as (1797, 64) float pixels in 0..16 and (1797,) int64 labels."""
    text = gzip.decompress(_DIGITS_FILE.read_bytes()).decode("ascii")
    rows = [[int(x) for x in line.split(",")] for line in text.splitlines() if line]
    table = torch.tensor(rows, dtype=torch.int64)
    return table[:, :64].to(torch.float32), table[:, 64].clone()


def _stratified_split(
    y: torch.Tensor, test_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted train and test indices; each class contributes ``round(n_c * test_fraction)``
    samples (at least one) to the test split, chosen by a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        k = min(max(1, round(idx.numel() * test_fraction)), idx.numel() - 1)
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def digits(cfg: DigitsConfig) -> DataSplits:
    """UCI optical handwritten digits, 8x8, 10 classes, embedded (offline, the default)."""
    x, y = _digits_raw()
    train_idx, test_idx = _stratified_split(y, cfg.test_fraction, cfg.split_seed)
    shape: tuple[int, ...] = (64,) if cfg.flatten else (1, 8, 8)
    x = x.reshape(-1, *shape)
    mean, std = _statistics(x[train_idx])
    train_x, test_x = _normalise(x[train_idx], x[test_idx])
    return DataSplits(
        train=TensorDataset(train_x, y[train_idx]),
        test=TensorDataset(test_x, y[test_idx]),
        num_classes=10,
        input_shape=shape,
        in_memory=True,
        input_range=_range_of(0.0, 16.0, mean, std),
    )


# --------------------------------------------------------------------------------------------
# synthetic (tests)
# --------------------------------------------------------------------------------------------
@attrs.frozen
class SyntheticConfig:
    """Options of ``synthetic``: split sizes, classes, the input shape and the seed."""

    #: samples in the training split
    n_train: int = attrs.field(default=512, validator=_positive)
    #: samples in the test split
    n_test: int = attrs.field(default=128, validator=_positive)
    #: classes (outputs of the random linear teacher)
    num_classes: int = attrs.field(default=10, validator=v.ge(2))
    #: shape of one input, ``(C, H, W)`` or ``(features,)``
    input_shape: tuple[int, ...] = attrs.field(default=(1, 8, 8), validator=_positive_ints)
    #: seed of the inputs and the teacher (independent of the run's ``seed``)
    seed: int = attrs.field(default=0, validator=v.ge(0))


def synthetic(cfg: SyntheticConfig) -> DataSplits:
    """Seeded Gaussian inputs labelled by a fixed random linear teacher (learnable, for tests)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    features = 1
    for s in cfg.input_shape:
        features *= s
    teacher = torch.randn(features, cfg.num_classes, generator=gen)
    x = torch.randn(cfg.n_train + cfg.n_test, features, generator=gen)
    y = (x @ teacher).argmax(dim=1)
    x = x.reshape(-1, *cfg.input_shape)
    return DataSplits(
        train=TensorDataset(x[: cfg.n_train].clone(), y[: cfg.n_train].clone()),
        test=TensorDataset(x[cfg.n_train :].clone(), y[cfg.n_train :].clone()),
        num_classes=cfg.num_classes,
        input_shape=tuple(cfg.input_shape),
        in_memory=True,
    )


# --------------------------------------------------------------------------------------------
# torchvision data sets (files on disk)
# --------------------------------------------------------------------------------------------
@attrs.frozen
class TorchvisionDataConfig:
    """Options of the torchvision data sets: where the files are, whether to download them,
    and whether to augment the training split."""

    #: directory holding (or receiving) the torchvision files
    root: str = attrs.field(default="data", validator=v.instance_of(str))
    #: fetch the files into ``root`` when missing (needs network access)
    download: bool = attrs.field(default=False, validator=v.instance_of(bool))
    #: random crop (padding 4) and horizontal flip of training images, for the CIFAR sets
    #: (MNIST, Fashion-MNIST and SVHN get none)
    augment: bool = attrs.field(default=True, validator=v.instance_of(bool))
    #: hold both splits as normalised tensors in device memory and augment on the device
    #: (no DataLoader workers); for data sets that fit, e.g. CIFAR (~600 MB as float32)
    device_resident: bool = attrs.field(default=False, validator=v.instance_of(bool))


@attrs.frozen
class _VisionSpec:
    cls_name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_flip: bool  # CIFAR-style augmentation; digit-like sets get none
    split_kw: Callable[[bool], dict]


def _train_kw(train: bool) -> dict:
    return {"train": train}


def _split_kw(train: bool) -> dict:
    return {"split": "train" if train else "test"}


_VISION = {
    "mnist": _VisionSpec("MNIST", 10, (1, 28, 28), (0.1307,), (0.3081,), False, _train_kw),
    "fashion_mnist": _VisionSpec(
        "FashionMNIST", 10, (1, 28, 28), (0.2860,), (0.3530,), False, _train_kw
    ),
    "cifar10": _VisionSpec(
        "CIFAR10",
        10,
        (3, 32, 32),
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        True,
        _train_kw,
    ),
    "cifar100": _VisionSpec(
        "CIFAR100",
        100,
        (3, 32, 32),
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        True,
        _train_kw,
    ),
    "svhn": _VisionSpec(
        "SVHN",
        10,
        (3, 32, 32),
        (0.4377, 0.4438, 0.4728),
        (0.1980, 0.2010, 0.1970),
        False,
        _split_kw,
    ),
}


def _missing(root: str | Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} not found under root {str(root)!r}; put the files there or set "
        "`download = true` in the [data] section"
    )


def _load_vision(name: str, cfg: TorchvisionDataConfig) -> DataSplits:
    import torchvision
    from torchvision import transforms as T

    spec = _VISION[name]
    norm = [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    aug = (
        [T.RandomCrop(spec.input_shape[1], padding=4), T.RandomHorizontalFlip()]
        if cfg.augment and spec.crop_flip
        else []
    )
    cls = getattr(torchvision.datasets, spec.cls_name)
    try:
        train = cls(
            cfg.root, download=cfg.download, transform=T.Compose(aug + norm), **spec.split_kw(True)
        )
        test = cls(
            cfg.root, download=cfg.download, transform=T.Compose(norm), **spec.split_kw(False)
        )
    except RuntimeError as exc:
        if "not found" in str(exc).lower() or "download=true" in str(exc).lower():
            raise _missing(cfg.root, spec.cls_name) from exc
        raise
    input_range = _range_of(0.0, 1.0, spec.mean, spec.std)
    if cfg.device_resident:
        return resident_splits(train, test, spec, augment=cfg.augment and spec.crop_flip,
                               input_range=input_range)
    return DataSplits(
        train, test, spec.num_classes, spec.input_shape, in_memory=False,
        input_range=input_range,
    )


def materialise(dataset, mean, std) -> TensorDataset:
    """A torchvision image data set as a normalised ``TensorDataset`` (N, C, H, W), read from
    its ``data``/``targets`` (or ``labels``) arrays directly, without its transforms."""
    data = torch.as_tensor(dataset.data)
    if data.dim() == 3:  # (N, H, W) grey
        data = data.unsqueeze(1)
    elif data.shape[-1] in (1, 3) and data.shape[1] not in (1, 3):  # (N, H, W, C)
        data = data.permute(0, 3, 1, 2)
    x = data.float().div_(255.0)
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    x = (x - m) / s
    labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = dataset.labels
    return TensorDataset(x.contiguous(), torch.as_tensor(labels, dtype=torch.long))


def resident_splits(train, test, spec, *, augment: bool, input_range) -> DataSplits:
    """Both splits materialised for the device, with crop + flip done on the device."""
    from sparsefw.augment import DeviceAugment

    fill = tuple(((torch.zeros(len(spec.mean)) - torch.tensor(spec.mean)) /
                  torch.tensor(spec.std)).tolist())
    return DataSplits(
        materialise(train, spec.mean, spec.std), materialise(test, spec.mean, spec.std),
        spec.num_classes, spec.input_shape, in_memory=True, input_range=input_range,
        device_augment=DeviceAugment("crop_flip", 4, fill) if augment else None,
    )


def mnist(cfg: TorchvisionDataConfig) -> DataSplits:
    """MNIST handwritten digits, 28x28 grey, 10 classes (torchvision)."""
    return _load_vision("mnist", cfg)


def fashion_mnist(cfg: TorchvisionDataConfig) -> DataSplits:
    """Fashion-MNIST clothing images, 28x28 grey, 10 classes (torchvision)."""
    return _load_vision("fashion_mnist", cfg)


def cifar10(cfg: TorchvisionDataConfig) -> DataSplits:
    """CIFAR-10, 32x32 colour, 10 classes (torchvision); crop + flip augmentation."""
    return _load_vision("cifar10", cfg)


def cifar100(cfg: TorchvisionDataConfig) -> DataSplits:
    """CIFAR-100, 32x32 colour, 100 classes (torchvision); crop + flip augmentation."""
    return _load_vision("cifar100", cfg)


def svhn(cfg: TorchvisionDataConfig) -> DataSplits:
    """SVHN street-view house numbers, 32x32 colour, 10 classes (torchvision)."""
    return _load_vision("svhn", cfg)


# --------------------------------------------------------------------------------------------
# ImageNet-style folders
# --------------------------------------------------------------------------------------------
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@attrs.frozen
class ImageFolderConfig:
    """Options of ``image_folder``: ``root`` holds ``train/<class>/*`` and ``val/<class>/*``."""

    #: directory with ``train/<class>/*`` and ``val/<class>/*`` images
    root: str = attrs.field(default="data", validator=v.instance_of(str))
    #: side of the square crop the model sees (test images: resized to ``size · 256/224``,
    #: centre-cropped)
    image_size: int = attrs.field(default=224, validator=_positive)
    #: random resized crop and horizontal flip of training images (else resize + centre crop)
    augment: bool = attrs.field(default=True, validator=v.instance_of(bool))


def image_folder(cfg: ImageFolderConfig) -> DataSplits:
    """ImageNet-style class folders (root/train, root/val) read with torchvision ImageFolder."""
    from torchvision import datasets
    from torchvision import transforms as T

    root = Path(cfg.root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(
                f"image_folder: {str(root / split)!r} is not a directory; root must hold "
                "train/<class>/* and val/<class>/*"
            )
    norm = [T.ToTensor(), T.Normalize(_IMAGENET_MEAN, _IMAGENET_STD)]
    size = cfg.image_size
    if cfg.augment:
        train_tf = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    else:
        train_tf = [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
    test_tf = [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
    train = datasets.ImageFolder(str(root / "train"), transform=T.Compose(train_tf + norm))
    test = datasets.ImageFolder(str(root / "val"), transform=T.Compose(test_tf + norm))
    if train.classes != test.classes:
        raise ValueError(
            f"image_folder: train and val class folders differ under {str(root)!r} "
            f"({len(train.classes)} vs {len(test.classes)} classes)"
        )
    return DataSplits(
        train, test, len(train.classes), (3, size, size), in_memory=False,
        input_range=_range_of(0.0, 1.0, _IMAGENET_MEAN, _IMAGENET_STD),
    )
