"""Behaviour of model/data.py: the synthetic set, transforms, image folders, splits and errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SYNTHETIC_CLASSES,
    SYNTHETIC_MEAN,
    SYNTHETIC_STD,
    ArrayDataset,
    DataError,
    DataSplits,
    ImageFolder,
    decode_image,
    load_dataset,
    make_synthetic,
    synthetic_train_transform,
)
from model.transforms import decode_target, eval_transform, train_transform

BAR_TOP, BAR_BOTTOM = SYNTHETIC_CLASSES.index("bar_top"), SYNTHETIC_CLASSES.index("bar_bottom")


def foreground_rows(image: np.ndarray) -> np.ndarray:
    """Row index of every pixel far from the image's median (background) colour."""
    background = np.median(image.reshape(-1, 3), axis=0)
    far = np.abs(image.astype(np.int32) - background).sum(axis=-1) > 120
    return np.nonzero(far)[0]


def unnormalise(tensor: torch.Tensor, mean, std) -> np.ndarray:
    """(3, H, W) normalised -> uint8 (H, W, 3)."""
    array = tensor.numpy().transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)
    return np.clip(array * 255 + 0.5, 0, 255).astype(np.uint8)


def write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (24, 16), **save_args) -> Path:
    """A small real image file; `size` is Pillow's (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    gradient = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3).astype(np.uint8)
    image = Image.fromarray(gradient)
    if mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        image.info["transparency"] = 0
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path, **save_args)
    return path


def make_tree(root: Path, classes=("cat", "dog"), per_class: int = 5) -> Path:
    for name in classes:
        for i in range(per_class):
            write_image(root / name / f"{i:02d}.png")
    return root


# ---------------------------------------------------------------- synthetic data

def test_same_seed_gives_identical_images_and_another_seed_different_ones():
    images_a, labels_a = make_synthetic(60, 32, seed=3)
    images_b, labels_b = make_synthetic(60, 32, seed=3)
    images_c, _ = make_synthetic(60, 32, seed=4)
    assert np.array_equal(images_a, images_b) and np.array_equal(labels_a, labels_b)
    assert not np.array_equal(images_a, images_c)


def test_synthetic_labels_are_balanced_and_every_class_occurs():
    images, labels = make_synthetic(602, 32, seed=0)
    assert images.shape == (602, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    counts = np.bincount(labels, minlength=len(SYNTHETIC_CLASSES))
    assert len(counts) == len(SYNTHETIC_CLASSES)
    assert counts.min() >= 100 and counts.max() - counts.min() <= 1


@pytest.mark.parametrize("size", [16, 48, 64, (32, 48)])
def test_synthetic_images_come_in_other_sizes(size):
    images, labels = make_synthetic(12, size, seed=1)
    height, width = (size, size) if isinstance(size, int) else size
    assert images.shape == (12, height, width, 3) and len(labels) == 12


def test_every_synthetic_image_shows_a_clearly_visible_shape():
    images, _ = make_synthetic(300, 32, seed=2)
    assert min(len(foreground_rows(image)) for image in images) >= 20


@pytest.mark.parametrize("size", [32, (32, 48), 64])
def test_bar_classes_differ_by_vertical_position(size):
    images, labels = make_synthetic(240, size, seed=5)
    height = images.shape[1]
    top_rows = [np.median(foreground_rows(image)) for image in images[labels == BAR_TOP]]
    bottom_rows = [np.median(foreground_rows(image)) for image in images[labels == BAR_BOTTOM]]
    assert max(top_rows) < height / 2 < min(bottom_rows)


def test_synthetic_normalisation_constants_fit_the_data():
    images, _ = make_synthetic(600, 32, seed=0)
    pixels = images.reshape(-1, 3) / 255.0
    assert np.allclose(pixels.mean(axis=0), SYNTHETIC_MEAN, atol=0.03)
    assert np.allclose(pixels.std(axis=0), SYNTHETIC_STD, atol=0.03)


# ---------------------------------------------------------------- transforms

FLAT_MEAN = np.tile(np.round(np.asarray(IMAGENET_MEAN) * 255).astype(np.uint8), (50, 70, 1))


@pytest.mark.parametrize("make", [train_transform, eval_transform, synthetic_train_transform])
@pytest.mark.parametrize("size", [32, (32, 48)])
def test_transforms_return_float_tensors_of_the_model_size_from_pil_or_array(make, size):
    transform = make(size, IMAGENET_MEAN, IMAGENET_STD)
    height, width = (size, size) if isinstance(size, int) else size
    for image in (FLAT_MEAN, Image.fromarray(FLAT_MEAN)):
        out = transform(image)
        assert out.shape == (3, height, width) and out.dtype == torch.float32
        assert out.std(dim=(1, 2)).max() < 1e-4  # a flat image stays flat, however it is cropped or flipped


@pytest.mark.parametrize("make", [eval_transform, synthetic_train_transform])
def test_an_image_at_the_mean_colour_normalises_to_zero(make):
    assert make(32, IMAGENET_MEAN, IMAGENET_STD)(FLAT_MEAN).abs().max() < 0.01


def test_train_colour_jitter_is_mild():
    torch.manual_seed(0)
    outputs = torch.stack([train_transform(32, IMAGENET_MEAN, IMAGENET_STD)(FLAT_MEAN) for _ in range(20)])
    assert 0 < outputs.abs().max() < 0.6  # within +-20% brightness of the mean colour


def test_eval_transform_leaves_images_at_the_target_size_unresampled():
    images, _ = make_synthetic(2, 32, seed=0)
    out = eval_transform(32, SYNTHETIC_MEAN, SYNTHETIC_STD)(images[0])
    expected = (images[0] / 255.0 - np.asarray(SYNTHETIC_MEAN)) / np.asarray(SYNTHETIC_STD)
    assert np.allclose(out.numpy().transpose(1, 2, 0), expected, atol=1e-5)


def test_eval_transform_resizes_the_short_side_and_crops_the_centre():
    # left half black, right half white: a centre crop keeps the boundary in the middle
    array = np.zeros((100, 160, 3), np.uint8)
    array[:, 80:] = 255
    out = unnormalise(eval_transform(32, (0, 0, 0), (1, 1, 1))(array), (0, 0, 0), (1, 1, 1))
    assert out.shape == (32, 32, 3)
    assert out[:, :14].max() < 10 and out[:, 18:].min() > 245


def test_eval_transform_is_deterministic():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    transform = eval_transform(32, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(transform(image), transform(image))


def test_train_transform_varies_between_calls_and_repeats_under_the_same_seed():
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    transform = train_transform(32, IMAGENET_MEAN, IMAGENET_STD)
    torch.manual_seed(0)
    first = [transform(image) for _ in range(4)]
    torch.manual_seed(0)
    again = [transform(image) for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])
    generator = torch.Generator().manual_seed(7)
    with_generator = transform(image, generator=generator)
    assert torch.equal(with_generator, transform(image, generator=torch.Generator().manual_seed(7)))


@pytest.mark.parametrize("hflip", [True, False])
def test_train_transform_flips_horizontally_only_when_asked(hflip):
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, 16:] = 200  # dark left, bright right
    transform = train_transform(32, (0, 0, 0), (1, 1, 1), hflip=hflip, scale=(1.0, 1.0))
    torch.manual_seed(0)
    bright_left = [(out[:, :, :8].mean() > out[:, :, -8:].mean()).item() for out in (transform(image) for _ in range(20))]
    assert any(bright_left) == hflip and not all(bright_left)


def test_synthetic_augmentation_varies_but_keeps_bars_in_their_half():
    images, labels = make_synthetic(120, 32, seed=9)
    transform = synthetic_train_transform(32)
    torch.manual_seed(0)
    outputs = {}
    for label in (BAR_TOP, BAR_BOTTOM):
        for image in images[labels == label]:
            for _ in range(3):
                augmented = unnormalise(transform(image), SYNTHETIC_MEAN, SYNTHETIC_STD)
                outputs.setdefault(label, []).append(np.median(foreground_rows(augmented)))
    assert max(outputs[BAR_TOP]) < 16 < min(outputs[BAR_BOTTOM])
    assert len({transform(images[0]).sum().item() for _ in range(8)}) > 1


# ---------------------------------------------------------------- image folders

def test_image_folder_decodes_every_mode_to_rgb_with_sorted_classes_and_files(tmp_path):
    write_image(tmp_path / "zebra" / "b.png", "L")
    write_image(tmp_path / "zebra" / "a.png", "RGBA")
    write_image(tmp_path / "apple" / "palette.png", "P")
    write_image(tmp_path / "apple" / "photo.JPG", "RGB", format="JPEG")
    write_image(tmp_path / "apple" / "deep.png", "I;16")
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    (tmp_path / ".cache").mkdir()

    folder = ImageFolder(tmp_path)
    assert folder.classes == ["apple", "zebra"]
    assert [(p.name, label) for p, label in folder.samples] == [
        ("deep.png", 0), ("palette.png", 0), ("photo.JPG", 0), ("a.png", 1), ("b.png", 1)]
    for index in range(len(folder)):
        image, _ = folder[index]
        assert image.mode == "RGB" and image.size == (24, 16)
    deep, _ = folder[0]
    assert np.asarray(deep).max() > 200  # 16-bit values rescaled, not clipped to white or left near black


def test_image_folder_honours_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    write_image(tmp_path / "cls" / "rotated.jpg", size=(40, 20), format="JPEG", exif=exif)
    image, _ = ImageFolder(tmp_path)[0]
    assert image.size == (20, 40)


def test_evaluation_decodes_a_large_jpeg_for_its_target_and_augmentation_decodes_it_fully(tmp_path):
    # Evaluation must decode as the service does (libjpeg draft for the target size); augmentation crops
    # anywhere, so it gets every pixel.
    path = tmp_path / "cls" / "big.jpg"
    path.parent.mkdir()
    texture = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)  # fine detail, as in a photo
    Image.fromarray(texture).resize((1024, 768), Image.BILINEAR).save(path, quality=90)
    evaluate, augment = eval_transform(32, IMAGENET_MEAN, IMAGENET_STD), train_transform(32, IMAGENET_MEAN, IMAGENET_STD)
    assert decode_target(augment) is None and decode_target(synthetic_train_transform(32)) is None
    drafted = decode_image(path, decode_target(evaluate))
    assert drafted.size == (128, 96) and decode_image(path).size == (1024, 768)  # 1/8 scale, still >= 37 px a side
    folder = ImageFolder(tmp_path, evaluate)
    assert torch.equal(folder[0][0], evaluate(drafted))
    assert not torch.equal(folder[0][0], evaluate(decode_image(path)))  # the draft is visible in the pixels


def test_image_folder_applies_the_transform_and_accepts_a_file_subset(tmp_path):
    make_tree(tmp_path)
    full = ImageFolder(tmp_path)
    subset = ImageFolder(tmp_path, eval_transform(16, IMAGENET_MEAN, IMAGENET_STD), files=full.samples[3:6])
    assert len(subset) == 3 and subset.classes == ["cat", "dog"]
    tensor, label = subset[2]
    assert tensor.shape == (3, 16, 16) and label == 1


def test_array_dataset_yields_transformed_items_and_labels():
    images, labels = make_synthetic(10, 16, seed=0)
    dataset = ArrayDataset(images, labels, eval_transform(16, SYNTHETIC_MEAN, SYNTHETIC_STD))
    tensor, label = dataset[4]
    assert len(dataset) == 10 and tensor.shape == (3, 16, 16) and label == labels[4]


# ---------------------------------------------------------------- load_dataset

def test_load_dataset_uses_train_and_val_subfolders(tmp_path):
    make_tree(tmp_path / "train", per_class=4)
    make_tree(tmp_path / "val", per_class=2)
    splits = load_dataset(str(tmp_path), 16)
    assert isinstance(splits, DataSplits)
    assert splits.classes == ["cat", "dog"] and (len(splits.train), len(splits.val)) == (8, 4)
    assert (splits.mean, splits.std) == (IMAGENET_MEAN, IMAGENET_STD)
    image, label = splits.val[3]
    assert image.shape == (3, 16, 16) and label == 1
    assert torch.equal(splits.val[0][0], splits.val[0][0])


def test_load_dataset_accepts_a_validation_folder(tmp_path):
    make_tree(tmp_path / "train", per_class=2)
    make_tree(tmp_path / "validation", per_class=1)
    assert len(load_dataset(str(tmp_path), 16).val) == 2


def test_load_dataset_splits_a_plain_class_tree_per_class_by_seed(tmp_path):
    make_tree(tmp_path, classes=("a", "b", "c"), per_class=10)
    splits = load_dataset(str(tmp_path), 16, seed=1, val_fraction=0.2)
    train = {path for path, _ in splits.train.samples}
    val = {path for path, _ in splits.val.samples}
    assert len(val) == 6 and len(train) == 24 and not train & val
    assert sorted(label for _, label in splits.val.samples) == [0, 0, 1, 1, 2, 2]
    again = load_dataset(str(tmp_path), 16, seed=1, val_fraction=0.2)
    assert {path for path, _ in again.val.samples} == val
    other = load_dataset(str(tmp_path), 16, seed=2, val_fraction=0.2)
    assert {path for path, _ in other.val.samples} != val


def test_load_dataset_synthetic_splits_with_synthetic_normalisation():
    splits = load_dataset("synthetic", 32, seed=0, num_synthetic=300, val_fraction=0.2)
    assert splits.classes == SYNTHETIC_CLASSES
    assert (splits.mean, splits.std) == (SYNTHETIC_MEAN, SYNTHETIC_STD)
    assert (len(splits.train), len(splits.val)) == (240, 60)
    assert np.bincount(splits.val.labels).tolist() == [10] * len(SYNTHETIC_CLASSES)
    image, label = splits.train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= label < 6
    plain = load_dataset("synthetic", (32, 48), num_synthetic=60, augment=False)
    assert torch.equal(plain.train[0][0], plain.train[0][0]) and plain.train[0][0].shape == (3, 32, 48)


def test_synthetic_splits_batch_through_a_dataloader():
    splits = load_dataset("synthetic", 16, num_synthetic=60)
    images, labels = next(iter(torch.utils.data.DataLoader(splits.train, batch_size=8, shuffle=True)))
    assert images.shape == (8, 3, 16, 16) and labels.dtype == torch.int64


# ---------------------------------------------------------------- errors

def test_missing_dataset_path_is_named(tmp_path):
    with pytest.raises(DataError, match="does not exist") as info:
        load_dataset(str(tmp_path / "nowhere"), 16)
    assert "nowhere" in str(info.value)


def test_a_file_instead_of_a_folder_is_refused(tmp_path):
    path = write_image(tmp_path / "single.png")
    with pytest.raises(DataError, match="not a directory"):
        load_dataset(str(path), 16)


def test_a_folder_without_class_subfolders_is_refused(tmp_path):
    write_image(tmp_path / "loose.png")
    with pytest.raises(DataError, match="no class subfolders"):
        load_dataset(str(tmp_path), 16)


def test_an_empty_class_folder_is_named(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "empty_class" / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError, match="empty_class.*no images"):
        load_dataset(str(tmp_path), 16)


def test_mismatched_train_and_val_classes_are_listed(tmp_path):
    make_tree(tmp_path / "train", classes=("cat", "dog"))
    make_tree(tmp_path / "val", classes=("cat", "fox"))
    with pytest.raises(DataError, match="class folders differ") as info:
        load_dataset(str(tmp_path), 16)
    assert "dog" in str(info.value) and "fox" in str(info.value)


@pytest.mark.parametrize("content", [b"this is not a png", "truncated"])
def test_a_corrupt_image_is_named_when_read(tmp_path, content):
    make_tree(tmp_path, per_class=2)
    bad = tmp_path / "dog" / "zz_bad.png"
    if content == "truncated":
        good = (tmp_path / "dog" / "00.png").read_bytes()
        bad.write_bytes(good[: len(good) // 2])
    else:
        bad.write_bytes(content)
    folder = ImageFolder(tmp_path)
    with pytest.raises(DataError, match="zz_bad.png"):
        folder[len(folder) - 1]
    with pytest.raises(DataError, match="zz_bad.png"):
        folder.verify()


def test_a_val_fraction_outside_zero_to_one_is_refused():
    with pytest.raises(DataError, match="val_fraction"):
        load_dataset("synthetic", 16, num_synthetic=30, val_fraction=1.0)


def test_too_few_images_to_hold_out_validation_are_refused(tmp_path):
    make_tree(tmp_path, per_class=1)
    with pytest.raises(DataError, match="too few"):
        load_dataset(str(tmp_path), 16)
