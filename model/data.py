"""Datasets: image folders, a built-in synthetic dataset, train/validation splits.

Transforms (Pillow + NumPy) live in `model/transforms.py`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

import imageprep
from model.presets import as_size
from model.transforms import (
    ShiftTransform,
    Size,
    decode_target,
    eval_transform,
    train_transform,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Measured once on make_synthetic(12000, 32, seed=0); other seeds and square sizes agree to
# ~0.003 (non-square images have relatively smaller shapes: mean ~0.265, std ~0.197).
SYNTHETIC_MEAN = (0.2798, 0.2794, 0.2784)
SYNTHETIC_STD = (0.2127, 0.2133, 0.2134)
# bar_top / bar_bottom differ only in where the bar is: a model without position information cannot separate them.
SYNTHETIC_CLASSES = ["circle", "square", "triangle", "cross", "bar_top", "bar_bottom"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
VAL_DIR_NAMES = ("val", "validation")



class DataError(ValueError):
    """A dataset that cannot be read: a missing path, an empty class, an undecodable image."""


# ---------------------------------------------------------------- synthetic data

def make_synthetic(num_images: int, image_size: Size = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Coloured shapes on noisy backgrounds: uint8 images (N, H, W, 3) and int64 labels (N,).

    Deterministic by seed; classes balanced to within one image. Drawn with NumPy in
    chunks, so memory stays bounded for large N.
    """
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    height, width = as_size(image_size)
    if min(height, width) < 8:
        raise ValueError(f"synthetic images need at least 8x8 pixels, got {height}x{width}")
    rng = np.random.default_rng(seed)
    labels = _synthetic_labels(num_images, rng)
    images = np.empty((num_images, height, width, 3), dtype=np.uint8)
    chunk = max(1, (1 << 22) // (height * width))
    for start in range(0, num_images, chunk):
        images[start:start + chunk] = _draw_images(labels[start:start + chunk], height, width, rng)
    return images, labels


def _synthetic_labels(num_images: int, rng: np.random.Generator) -> np.ndarray:
    """The class of each synthetic image: balanced, shuffled; the first draw from the generator."""
    return rng.permutation(np.arange(num_images) % len(SYNTHETIC_CLASSES)).astype(np.int64)


def _draw_images(labels: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    yy = np.arange(height, dtype=np.float32)[None, :, None] + 0.5  # pixel centres, (1, H, 1)
    xx = np.arange(width, dtype=np.float32)[None, None, :] + 0.5  # (1, 1, W)

    # Background: a random dark colour with a gentle linear gradient. Foreground: a random
    # colour at least 100 levels brighter in every channel. One polarity on purpose: with
    # light-on-dark and dark-on-light mixed, a small ViT needs many more steps to learn.
    base = rng.uniform(10, 100, (n, 3)).astype(np.float32)
    ramp_y, ramp_x = rng.uniform(-25, 25, (2, n, 1, 1, 3)).astype(np.float32)
    background = base[:, None, None] + ramp_y * (yy[..., None] / height - 0.5) + ramp_x * (xx[..., None] / width - 0.5)
    u = rng.random((n, 3), dtype=np.float32)
    foreground = base + 100 + u * (155 - base)

    image = np.where(_distractor_mask(n, height, width, yy, xx, rng)[..., None],
                     rng.uniform(0, 255, (n, 1, 1, 3)).astype(np.float32), background)
    image = np.where(_shape_mask(labels, height, width, yy, xx, rng)[..., None], foreground[:, None, None], image)
    image += rng.standard_normal(image.shape, dtype=np.float32) * 8.0
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def _distractor_mask(n: int, height: int, width: int, yy: np.ndarray, xx: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
    """A small blob in half of the images, far smaller than any shape, that carries no label."""
    radius = max(1.0, 0.06 * min(height, width))
    present = rng.random(n) < 0.5
    cy = rng.uniform(radius, height - radius, n)[:, None, None]
    cx = rng.uniform(radius, width - radius, n)[:, None, None]
    return present[:, None, None] & ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2)


def _shape_mask(labels: np.ndarray, height: int, width: int, yy: np.ndarray, xx: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
    """(n, H, W) bool: the pixels of each image's labelled shape."""
    n = len(labels)
    side = min(height, width)
    # Free shapes: diameter 31-56% of the shorter side (10-18 px at 32), fully inside the image.
    r = rng.uniform(0.155, 0.28, n) * side
    shape_cy, shape_cx = rng.uniform(r, height - r), rng.uniform(r, width - r)
    # Bars: long and thin, entirely within rows [8%, 42%] (top) or their mirror [58%, 92%] (bottom).
    half_h, half_w = rng.uniform(0.06, 0.09, n) * height, rng.uniform(0.25, 0.42, n) * width
    bar_cx = rng.uniform(half_w, width - half_w)
    top_cy = rng.uniform(0.08 * height + half_h, 0.42 * height - half_h)
    bottom = labels == SYNTHETIC_CLASSES.index("bar_bottom")
    is_bar = bottom | (labels == SYNTHETIC_CLASSES.index("bar_top"))
    cy = np.where(is_bar, np.where(bottom, height - top_cy, top_cy), shape_cy)
    cx = np.where(is_bar, bar_cx, shape_cx)

    def column(values: np.ndarray) -> np.ndarray:  # (n,) -> (n, 1, 1) float32
        return values[:, None, None].astype(np.float32)

    dy, dx = yy - column(cy), xx - column(cx)  # (n, H, 1), (n, 1, W)
    size_h, size_w = column(np.where(is_bar, half_h, r)), column(np.where(is_bar, half_w, r))
    out = np.zeros((n, height, width), dtype=bool)
    for label, name in enumerate(SYNTHETIC_CLASSES):
        k = np.flatnonzero(labels == label)
        if len(k):
            out[k] = _SHAPES[name](dy[k], dx[k], size_h[k], size_w[k])
    return out


def _cross(dy: np.ndarray, dx: np.ndarray, r: np.ndarray) -> np.ndarray:
    arm = np.maximum(0.6, 0.22 * r)  # thin arms, but at least one pixel thick
    return ((np.abs(dy) <= arm) & (np.abs(dx) <= r)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= r))


def _box(dy: np.ndarray, dx: np.ndarray, half_h: np.ndarray, half_w: np.ndarray) -> np.ndarray:
    return (np.abs(dy) <= half_h) & (np.abs(dx) <= half_w)


# mask(dy, dx, half height, half width); the free shapes get half height = half width = r.
_SHAPES: dict[str, Callable[..., np.ndarray]] = {
    "circle": lambda dy, dx, r, _: dy ** 2 + dx ** 2 <= r ** 2,
    "square": lambda dy, dx, r, _: _box(dy, dx, 0.8 * r, 0.8 * r),
    # apex up at -r, base at +0.7r with half-width r
    "triangle": lambda dy, dx, r, _: (dy >= -r) & (dy <= 0.7 * r) & (np.abs(dx) <= (dy + r) / 1.7),
    "cross": lambda dy, dx, r, _: _cross(dy, dx, r),
    "bar_top": _box,
    "bar_bottom": _box,
}


def synthetic_train_transform(image_size: Size, mean: Sequence[float] = SYNTHETIC_MEAN,
                              std: Sequence[float] = SYNTHETIC_STD) -> ShiftTransform:
    return ShiftTransform(image_size, mean, std)


# ---------------------------------------------------------------- datasets

def decode_image(path: str | Path, target: imageprep.ResizeSpec | None = None) -> Image.Image:
    """Upright RGB image, decoded exactly as the service decodes the same bytes (imageprep); DataError names a bad file.

    `target`: the size evaluation will shrink the image to. The service decodes a large JPEG at a reduced
    libjpeg scale for that size (draft: several times faster on photos, slightly different pixels), so
    evaluation passes the same target to get the same pixels; augmentation passes none and decodes fully.
    No byte or pixel limits: a dataset is trusted input (Pillow's own decompression-bomb check still applies).
    """
    try:
        return imageprep.decode_path(path, target=target)
    except imageprep.ImageError as exc:
        raise DataError(f"cannot decode image: {exc.message}") from exc


def _class_dirs(root: Path) -> list[Path]:
    if not root.exists():
        raise DataError(f"dataset path {root} does not exist")
    if not root.is_dir():
        raise DataError(f"dataset path {root} is not a directory")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DataError(f"{root} has no class subfolders; expected {root}/<class>/<image files>")
    return dirs


def _image_files(class_dir: Path) -> list[Path]:
    files = sorted(p for p in class_dir.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not files:
        raise DataError(f"class folder {class_dir} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


class ImageFolder(Dataset):
    """root/<class>/<image>: classes and files sorted by name; items are (transform(RGB image), label)."""

    def __init__(self, root: str | Path, transform: Callable[[Image.Image], Any] | None = None,
                 files: Sequence[tuple[str | Path, int]] | None = None):
        self.root = Path(root)
        class_dirs = _class_dirs(self.root)
        self.classes: list[str] = [d.name for d in class_dirs]
        if files is None:
            self.samples = [(path, label) for label, d in enumerate(class_dirs) for path in _image_files(d)]
        else:
            self.samples = [(Path(path), int(label)) for path, label in files]
        self.transform = transform

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = decode_image(path, decode_target(self.transform))  # evaluation: the service's draft decode
        return (self.transform(image) if self.transform else image), label

    def raw_item(self, index: int, target: imageprep.ResizeSpec | None = None) -> tuple[Image.Image, int]:
        """The decoded image (drafted towards `target`, as evaluation decodes it) and its label, untransformed."""
        path, label = self.samples[index]
        return decode_image(path, target), label

    def verify(self) -> None:
        """Decode every file once; raise DataError naming the first that fails."""
        for path, _ in self.samples:
            decode_image(path)


class ArrayDataset(Dataset):
    """uint8 images (N, H, W, 3) and integer labels (N,); items are (transform(array), label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable[[np.ndarray], Any] | None = None,
                 classes: list[str] | None = None):
        if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
            raise DataError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.transform, self.classes = images, transform, classes
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.images[index]
        return (self.transform(image) if self.transform else image), int(self.labels[index])

    def raw_item(self, index: int, target: imageprep.ResizeSpec | None = None) -> tuple[np.ndarray, int]:
        """The uint8 image and its label, untransformed."""
        return self.images[index], int(self.labels[index])


# ---------------------------------------------------------------- splits

@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): each class shuffled by (seed, class) and cut at val_fraction.

    A class of two or more items gives at least one to each side; a lone item trains.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    labels = np.asarray(labels)
    train, val = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for label in np.unique(labels):
        members = np.random.default_rng([seed, int(label)]).permutation(np.flatnonzero(labels == label))
        n_val = min(max(round(len(members) * val_fraction), 1), len(members) - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    train_idx, val_idx = np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
    if len(val_idx) == 0:
        raise DataError(f"too few items to hold out a validation split: {len(labels)} items, "
                        "and a class needs at least two to give one to validation")
    return train_idx, val_idx


# (image size, mean, std) -> the training transform of a folder
TrainTransformFactory = Callable[[Size, Sequence[float], Sequence[float]], Callable[..., Any]]


def load_dataset(source: str, image_size: Size, *, seed: int = 0, val_fraction: float = 0.2,
                 num_synthetic: int = 12000, augment: bool = True,
                 folder_augmentation: TrainTransformFactory | None = None) -> DataSplits:
    """"synthetic" or a folder (root/train + root/val|validation, or root/<class> split by seed).

    `folder_augmentation` builds a folder's training transform (default: `train_transform`); the built-in set
    always trains with its own label-preserving shifts."""
    if source == "synthetic":
        return _load_synthetic(image_size, seed, val_fraction, num_synthetic, augment)
    return _load_folder(Path(source), image_size, seed, val_fraction, augment, folder_augmentation or train_transform)


@dataclass(frozen=True)
class DataSurvey:
    """What a training recipe needs to know about a dataset before loading it at some size."""
    source: str
    train_images: int
    classes: list[str]
    typical_size: tuple[int, int] | None  # median (H, W) of the training images; None for the built-in set

    @property
    def is_folder(self) -> bool:
        return self.source != "synthetic"


SURVEY_SAMPLE = 200  # image headers read to find the typical size


def survey_dataset(source: str, *, seed: int = 0, val_fraction: float = 0.2, num_synthetic: int = 12000) -> DataSurvey:
    """Count the training images and classes of the split `load_dataset` makes, and the images' typical size
    (from the headers of an even sample, nothing decoded); DataError for what `load_dataset` would refuse."""
    if source == "synthetic":
        labels = _synthetic_labels(num_synthetic, np.random.default_rng(seed))
        train_idx, _ = stratified_split(labels, val_fraction, seed)
        return DataSurvey(source, len(train_idx), list(SYNTHETIC_CLASSES), None)
    splits = _load_folder(Path(source), 32, seed, val_fraction, augment=False, augmentation=train_transform)
    samples = splits.train.samples
    picked = [samples[i][0] for i in np.linspace(0, len(samples) - 1, min(SURVEY_SAMPLE, len(samples))).astype(int)]
    sizes = []
    for path in picked:
        try:
            with Image.open(path) as image:
                sizes.append((image.height, image.width))
        except OSError as exc:
            raise DataError(f"cannot read image {path}: {exc}") from exc
    height, width = (int(v) for v in np.median(np.array(sizes), axis=0))
    return DataSurvey(str(Path(source).resolve()), len(samples), splits.classes, (height, width))


def _load_synthetic(image_size: Size, seed: int, val_fraction: float, num_images: int, augment: bool) -> DataSplits:
    images, labels = make_synthetic(num_images, image_size, seed)
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    evaluate = eval_transform(image_size, SYNTHETIC_MEAN, SYNTHETIC_STD)
    train_tf = synthetic_train_transform(image_size) if augment else evaluate
    classes = list(SYNTHETIC_CLASSES)
    return DataSplits(train=ArrayDataset(images[train_idx], labels[train_idx], train_tf, classes),
                      val=ArrayDataset(images[val_idx], labels[val_idx], evaluate, classes),
                      classes=classes, mean=SYNTHETIC_MEAN, std=SYNTHETIC_STD)


def _load_folder(root: Path, image_size: Size, seed: int, val_fraction: float, augment: bool,
                 augmentation: TrainTransformFactory) -> DataSplits:
    _class_dirs(root)  # clear errors for a missing path or an empty root before anything else
    evaluate = eval_transform(image_size, IMAGENET_MEAN, IMAGENET_STD)
    train_tf = augmentation(image_size, IMAGENET_MEAN, IMAGENET_STD) if augment else evaluate
    val_dir = next((root / name for name in VAL_DIR_NAMES if (root / name).is_dir()), None)
    if (root / "train").is_dir() and val_dir is not None:
        train, val = ImageFolder(root / "train", train_tf), ImageFolder(val_dir, evaluate)
        if train.classes != val.classes:
            only_train, only_val = sorted(set(train.classes) - set(val.classes)), sorted(set(val.classes) - set(train.classes))
            raise DataError(f"class folders differ between {root / 'train'} and {val_dir}: "
                            f"only in train: {only_train or 'none'}, only in {val_dir.name}: {only_val or 'none'}")
    else:
        # A lone train/ folder is split like a plain root/<class> tree.
        base = root / "train" if (root / "train").is_dir() else root
        everything = ImageFolder(base)
        train_idx, val_idx = stratified_split(everything.labels, val_fraction, seed)
        train = ImageFolder(base, train_tf, files=[everything.samples[i] for i in train_idx])
        val = ImageFolder(base, evaluate, files=[everything.samples[i] for i in val_idx])
    return DataSplits(train=train, val=val, classes=train.classes, mean=IMAGENET_MEAN, std=IMAGENET_STD)
