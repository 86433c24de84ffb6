"""Images for SwAV: multi-crop views of any ImageFolder, and a generated image folder for the tiny preset.

- :class:`MultiCrop` turns one image into SwAV's views with torchvision's transforms v2: a few large crops and more
  small ones, each flipped, colour-distorted, (optionally) blurred and normalised.
- :class:`ImageFolderData` is the LightningDataModule: any folder in torchvision's ``ImageFolder`` layout
  (``root/<class>/<image>``; SwAV ignores the class names, the linear probe uses them). With ``synthetic=True`` it
  first writes a small generated dataset (see :func:`write_synthetic_images`) to a temporary folder.
- It also serves the linear probe's two splits: a fixed-seed held-out part of the folder (or ``heldout_root``),
  resized and centre-cropped without augmentation.
"""

from __future__ import annotations

import math
import random
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MultiCrop:
    """One PIL image -> a list of ``sum(num_crops)`` views (SwAV's multi-crop augmentation).

    Args:
        crop_sizes: Side in pixels of each crop kind, large first (SwAV: ``[224, 96]``).
        num_crops: How many crops of each kind (SwAV: ``[2, 6]``).
        min_scales, max_scales: Area fraction range of each kind (SwAV: ``[0.14, 0.05]`` and ``[1.0, 0.14]``).
        color_strength: Strength of the colour distortion (SimCLR's ``s``; 1.0 in SwAV).
        blur_probability: Chance of a Gaussian blur (0.5 in SwAV; 0 for tiny images).
    """

    def __init__(
        self,
        crop_sizes: Sequence[int],
        num_crops: Sequence[int],
        min_scales: Sequence[float],
        max_scales: Sequence[float],
        color_strength: float = 1.0,
        blur_probability: float = 0.5,
    ) -> None:
        lengths = {len(crop_sizes), len(num_crops), len(min_scales), len(max_scales)}
        if len(lengths) != 1:
            raise ValueError(
                f"crop_sizes, num_crops, min_scales and max_scales need one entry per crop kind; got "
                f"{list(crop_sizes)}, {list(num_crops)}, {list(min_scales)}, {list(max_scales)}"
            )
        if sum(num_crops) < 2:
            raise ValueError(f"`num_crops` must make at least 2 views in all, got {list(num_crops)}")
        s = color_strength
        color = [
            v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
        self.transforms = []
        for size, count, low, high in zip(crop_sizes, num_crops, min_scales, max_scales):
            blur = [v2.RandomApply([v2.GaussianBlur(kernel_size=_odd(size // 10), sigma=(0.1, 2.0))],
                                   p=blur_probability)] if blur_probability > 0 else []  # fmt: skip
            transform = v2.Compose([
                v2.ToImage(),
                v2.RandomResizedCrop(size, scale=(low, high), antialias=True),
                v2.RandomHorizontalFlip(),
                *color,
                *blur,
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ])  # fmt: skip
            self.transforms.extend([transform] * count)

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [transform(image) for transform in self.transforms]


def eval_transform(size: int) -> v2.Compose:
    """What the linear probe sees: resize to ``size * 8/7``, centre crop ``size`` (224 from 256), normalise."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(math.ceil(size * 8 / 7), antialias=True),
        v2.CenterCrop(size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])  # fmt: skip


def _odd(value: int) -> int:
    return max(3, value | 1)


# ----------------------------------------------------------------------------------------------- synthetic images
SYNTHETIC_PATTERNS = ("horizontal_stripes", "vertical_stripes", "checkerboard", "rings")


def synthetic_image(pattern: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One ``size`` x ``size`` RGB image of a texture class, with random period, phase, colours and noise.

    The four patterns survive SwAV's augmentations (crops keep the texture, flips keep each pattern's class,
    colour jitter keeps the geometry), so features that tell them apart are exactly what SwAV should learn; the
    random colours make raw colour useless for the probe.
    """
    period = rng.uniform(size / 8, size / 4)
    phase = rng.uniform(0, 2 * math.pi)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    if pattern == "horizontal_stripes":
        wave = np.sin(2 * math.pi * y / period + phase)
    elif pattern == "vertical_stripes":
        wave = np.sin(2 * math.pi * x / period + phase)
    elif pattern == "checkerboard":
        wave = np.sin(2 * math.pi * x / period + phase) * np.sin(2 * math.pi * y / period + phase)
    elif pattern == "rings":
        cy, cx = rng.uniform(0, size, size=2)
        wave = np.sin(2 * math.pi * np.hypot(y - cy, x - cx) / period + phase)
    else:
        raise ValueError(f"unknown pattern {pattern!r}; accepted: {SYNTHETIC_PATTERNS}")
    mask = (wave > 0).astype(np.float32)[..., None]
    foreground, background = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    pixels = mask * foreground + (1 - mask) * background + rng.normal(0, 12, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_synthetic_images(root: Path, images_per_class: int, size: int, num_classes: int = 4, seed: int = 0) -> Path:
    """Write a generated dataset in ImageFolder layout (``root/<pattern>/<i>.png``) and return ``root``.

    The same ``seed`` writes the same images, so every peer of a tiny swarm trains on the same dataset.
    """
    if not 2 <= num_classes <= len(SYNTHETIC_PATTERNS):
        raise ValueError(f"`num_classes` must be between 2 and {len(SYNTHETIC_PATTERNS)}, got {num_classes!r}")
    rng = np.random.default_rng(seed)
    for pattern in SYNTHETIC_PATTERNS[:num_classes]:
        folder = root / pattern
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(images_per_class):
            synthetic_image(pattern, size, rng).save(folder / f"{index:05d}.png")
    return root


def cached_synthetic_images(root: Path, images_per_class: int, size: int, num_classes: int, seed: int) -> Path:
    """:func:`write_synthetic_images` into ``root`` unless it is already there; safe for peers starting together.

    Each writer fills a private temporary folder and renames it to ``root``; a loser of the race deletes its copy.
    The same arguments always give the same images, so any finished copy is as good as another.
    """
    if root.is_dir():
        return root
    staging = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    write_synthetic_images(staging, images_per_class, size, num_classes, seed)
    try:
        staging.rename(root)
    except OSError:  # another peer finished first
        shutil.rmtree(staging, ignore_errors=True)
    return root


# ----------------------------------------------------------------------------------------------- data module
class _Views(Dataset):
    """Multi-crop views of an ImageFolder subset; the label is dropped (SwAV trains without labels)."""

    def __init__(self, images: Dataset, transform: MultiCrop) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        image, _ = self.images[index]
        return self.transform(image)


class ImageFolderData(L.LightningDataModule):
    """Batches of multi-crop views from an ImageFolder, and labelled splits for the linear probe.

    Args:
        root: ImageFolder root (``root/<class>/<image>``), e.g. ImageNet's ``train`` folder.
        synthetic: Ignore ``root`` and generate a small texture dataset in a temporary folder (the tiny preset).
        synthetic_images_per_class, synthetic_image_size, synthetic_classes: Size of the generated dataset.
        heldout_root: ImageFolder with the probe's held-out images (e.g. ImageNet's ``val``). Without it, a fixed
            ``heldout_fraction`` of ``root`` is held out from training and from the probe's training split.
        heldout_fraction: Share of ``root`` held out when there is no ``heldout_root``.
        batch_size: Images per local batch on this peer (each gives ``sum(num_crops)`` views).
        num_workers: DataLoader worker processes.
        crop_sizes, num_crops, min_scales, max_scales, color_strength, blur_probability: See :class:`MultiCrop`.
        probe_image_size: Centre-crop size of the probe's images (``crop_sizes[0]`` when ``None``).
        probe_max_images: At most this many images in each probe split (features of all ImageNet take long).
        split_seed: Seed of the held-out split and probe subsets: the same on every peer.
        shuffle_seed: Seed of this peer's batch order. ``None`` draws one, so peers see different batches.
    """

    def __init__(
        self,
        root: Optional[str] = None,
        synthetic: bool = False,
        synthetic_images_per_class: int = 160,
        synthetic_image_size: int = 32,
        synthetic_classes: int = 4,
        heldout_root: Optional[str] = None,
        heldout_fraction: float = 0.2,
        batch_size: int = 64,
        num_workers: int = 8,
        crop_sizes: Sequence[int] = (224, 96),
        num_crops: Sequence[int] = (2, 6),
        min_scales: Sequence[float] = (0.14, 0.05),
        max_scales: Sequence[float] = (1.0, 0.14),
        color_strength: float = 1.0,
        blur_probability: float = 0.5,
        probe_image_size: Optional[int] = None,
        probe_max_images: int = 10_000,
        split_seed: int = 0,
        shuffle_seed: Optional[int] = None,
    ) -> None:
        super().__init__()
        if root is None and not synthetic:
            raise ValueError(
                "ImageFolderData needs `--data.root` (a folder in ImageFolder layout, e.g. ImageNet's train/) or "
                "`--data.synthetic true` (generated images; the --tiny preset does this)"
            )
        if not 0 < heldout_fraction < 1:
            raise ValueError(f"`heldout_fraction` must be between 0 and 1, got {heldout_fraction!r}")
        if batch_size < 2:
            raise ValueError(f"`batch_size` must be at least 2 (Sinkhorn spreads a batch over prototypes), got {batch_size!r}")
        self.save_hyperparameters()
        self.multicrop = MultiCrop(crop_sizes, num_crops, min_scales, max_scales, color_strength, blur_probability)
        self.num_views = sum(num_crops)
        self.num_large_views = num_crops[0]
        self._train: Optional[Subset] = None
        self._heldout: Optional[Dataset] = None

    def setup(self, stage: str) -> None:
        if self._train is not None:
            return
        hp = self.hparams
        root = Path(hp.root) if not hp.synthetic else self._write_synthetic()
        if not root.is_dir():
            raise FileNotFoundError(f"`--data.root` {str(root)!r} is not a folder")
        images = ImageFolder(str(root))
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(hp.split_seed)).tolist()
        if hp.heldout_root is not None:
            self._train, self._heldout = Subset(images, order), ImageFolder(hp.heldout_root)
        else:
            num_heldout = max(1, int(len(order) * hp.heldout_fraction))
            self._train, self._heldout = Subset(images, order[num_heldout:]), Subset(images, order[:num_heldout])

    def _write_synthetic(self) -> Path:
        hp = self.hparams
        name = (f"swav_synthetic_{hp.synthetic_classes}x{hp.synthetic_images_per_class}_"
                f"{hp.synthetic_image_size}px_seed{hp.split_seed}")  # fmt: skip
        return cached_synthetic_images(Path(tempfile.gettempdir()) / name, hp.synthetic_images_per_class,
                                       hp.synthetic_image_size, hp.synthetic_classes, hp.split_seed)  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        assert self._train is not None, "setup() first"
        seed = self.hparams.shuffle_seed
        generator = torch.Generator().manual_seed(seed if seed is not None else random.SystemRandom().getrandbits(62))
        return DataLoader(_Views(self._train, self.multicrop), batch_size=self.hparams.batch_size, shuffle=True,
                          drop_last=True, num_workers=self.hparams.num_workers, generator=generator,
                          persistent_workers=self.hparams.num_workers > 0)  # fmt: skip

    def probe_datasets(self) -> tuple[Dataset, Dataset]:
        """``(train, held-out)`` labelled images for the linear probe, un-augmented, at most ``probe_max_images``."""
        if self._train is None:
            self.setup("probe")
        hp = self.hparams
        size = hp.probe_image_size or hp.crop_sizes[0]
        transform = eval_transform(size)
        splits = []
        for split in (self._train, self._heldout):
            assert split is not None
            indices = list(range(min(len(split), hp.probe_max_images)))  # type: ignore[arg-type]
            splits.append(_Labelled(Subset(split, indices), transform))
        return splits[0], splits[1]


class _Labelled(Dataset):
    """(image tensor, class index) pairs through a fixed transform."""

    def __init__(self, images: Dataset, transform: v2.Compose) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.images[index]
        return self.transform(image), label
