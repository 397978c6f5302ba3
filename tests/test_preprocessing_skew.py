"""No train/serve skew: for the same file, vit-train's evaluation path and the service's preparation give the
same uint8 pixels, for every kind of image the decoder accepts.

Evaluation path: `load_dataset(root, size)` -> the validation ImageFolder with its EvalTransform, as vit-train
evaluates. Serving path: `service.images.prepare_image(bytes, spec)` with the spec the service derives from the
image section the exporter writes (so a crop fraction or interpolation that differs between training's
evaluation and the exporter fails here too). The evaluation item is a normalised tensor; the service's pixels
go through the same normalisation, which is one-to-one on uint8 values, so equal tensors mean equal pixels.

The content is a real photo (matplotlib's grace_hopper.jpg) turned into each mode, plus transparency whose
hidden colour is NOT white (so dropping alpha and compositing over white give different pixels).
"""
from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.cbook import get_sample_data
from PIL import Image

from export.metadata import CROP_FRACTION, INTERPOLATION
from imageprep import ResizeSpec
from model.data import load_dataset
from model.transforms import EvalTransform, normalise
from modelrepo import ImageInput
from service.images import ImageLimits, decode_image, prepare_image
from service.repository import ModelVersion

SIZE = (48, 64)  # (H, W) of the model: not square, so a swapped side would show
LIMITS = ImageLimits()


def hopper(width: int = 200, height: int = 160) -> Image.Image:
    """A real photo (RGB), cropped around the face and scaled to (width, height)."""
    with get_sample_data("grace_hopper.jpg") as file:
        photo = Image.open(file).convert("RGB")
    return photo.crop((40, 60, 472, 405)).resize((width, height), Image.Resampling.LANCZOS)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=92, exif=exif)


def round_mask(width: int, height: int) -> np.ndarray:
    """uint8 alpha: opaque ellipse, a half-transparent ring, fully transparent corners."""
    y, x = np.mgrid[0:height, 0:width]
    r = np.hypot((x - width / 2) / (width / 2), (y - height / 2) / (height / 2))
    return np.select([r < 0.7, r < 0.9], [255, 128], 0).astype(np.uint8)


def rgba() -> bytes:
    photo = hopper()
    photo.putalpha(Image.fromarray(round_mask(*photo.size)))  # the hidden corners keep the photo's colours
    return encode(photo, "PNG")


def la() -> bytes:
    grey = hopper().convert("L")
    return encode(Image.merge("LA", (grey, Image.fromarray(round_mask(*grey.size)))), "PNG")


def palette_with_transparency(fmt: str) -> bytes:
    quantised = hopper().quantize(colors=64)
    clear = quantised.getpixel((0, 0))  # the background's colour becomes transparent: large patches vanish
    return encode(quantised, fmt, transparency=clear)


def grey_levels() -> np.ndarray:
    return np.asarray(hopper().convert("L"), dtype=np.float64)


def grey_16bit() -> bytes:
    return encode(Image.fromarray((grey_levels() * 257).astype(np.uint16)), "PNG")  # I;16


def grey_32bit() -> bytes:
    return encode(Image.fromarray((grey_levels() * 4112).astype(np.int32)), "TIFF")  # I, values up to 2^20


def grey_float() -> bytes:
    return encode(Image.fromarray((grey_levels() / 255).astype(np.float32)), "TIFF")  # F within [0, 1]


def animated_gif() -> bytes:
    first, second = hopper(), hopper().transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)


def extreme_strip() -> bytes:
    """4000x8: the resize takes the bounded route (no huge intermediate image)."""
    return encode(hopper(400, 160).resize((4000, 8), Image.Resampling.BILINEAR), "PNG")


# file name -> how to make its bytes
CASES: dict[str, Callable[[], bytes]] = {
    "rgb.png": lambda: encode(hopper(), "PNG"),
    "grey_l.png": lambda: encode(hopper().convert("L"), "PNG"),
    "grey_l.jpg": lambda: encode(hopper().convert("L"), "JPEG", quality=90),
    "one_bit.png": lambda: encode(hopper().convert("1"), "PNG"),
    "rgba.png": rgba,
    "rgba_lossless.webp": lambda: encode(Image.open(io.BytesIO(rgba())), "WEBP", lossless=True),
    "la.png": la,
    "palette_transparent.png": lambda: palette_with_transparency("PNG"),
    "palette_transparent.gif": lambda: palette_with_transparency("GIF"),
    "grey_16bit.png": grey_16bit,
    "grey_32bit.tif": grey_32bit,
    "grey_float.tif": grey_float,
    "cmyk.jpg": lambda: encode(hopper().convert("CMYK"), "JPEG", quality=92),
    "ycbcr.tif": lambda: encode(hopper().convert("YCbCr"), "TIFF"),
    "exif_rotated_3.jpg": lambda: with_orientation(hopper(), 3),
    "exif_rotated_6.jpg": lambda: with_orientation(hopper(), 6),
    "exif_rotated_8.jpg": lambda: with_orientation(hopper(), 8),
    "large.jpg": lambda: encode(hopper(2048, 1600), "JPEG", quality=90),
    "large_rotated_6.jpg": lambda: with_orientation(hopper(1600, 2048), 6),
    "animated.gif": animated_gif,
    "model_size.png": lambda: encode(hopper(SIZE[1], SIZE[0]), "PNG"),
    "extreme_strip.png": extreme_strip,
}
MODES_COVERED = {"RGB", "L", "1", "RGBA", "LA", "P", "I;16", "I", "F", "CMYK", "YCbCr"}
DRAFTED = ("large.jpg", "large_rotated_6.jpg")  # big enough that the service decodes them at a reduced scale


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """root/train/photo/... and root/val/photo/<every case>, as a vit-train dataset folder."""
    root = tmp_path_factory.mktemp("skew")
    files = {name: make() for name, make in CASES.items()}
    for name, data in files.items():
        (root / "val" / "photo").mkdir(parents=True, exist_ok=True)
        (root / "val" / "photo" / name).write_bytes(data)
    (root / "train" / "photo").mkdir(parents=True)
    (root / "train" / "photo" / "train.png").write_bytes(files["rgb.png"])
    return root, files


@pytest.fixture(scope="module")
def evaluation(written):
    """name -> the normalised tensor vit-train's evaluation computes; plus the normalisation's mean and std."""
    root, _ = written
    splits = load_dataset(str(root), SIZE)
    assert isinstance(splits.val.transform, EvalTransform)
    tensors = {Path(path).name: splits.val[index][0] for index, (path, _) in enumerate(splits.val.samples)}
    return tensors, splits.mean, splits.std


def test_the_cases_cover_every_mode_the_decoder_accepts(written):
    _, files = written
    modes = {Image.open(io.BytesIO(data)).mode for data in files.values()}
    assert MODES_COVERED <= modes, MODES_COVERED - modes


def served_spec() -> ResizeSpec:
    """The ResizeSpec the service prepares images with for a model exported at SIZE: the exporter's image
    section, through JSON as it lies in the repository, read by the service's own route (ModelVersion.resize,
    which looks only at the metadata's image section, hence the stand-in for the rest of the metadata)."""
    image = ImageInput.from_json(ImageInput(*SIZE, INTERPOLATION, CROP_FRACTION).to_json())
    return ModelVersion(name="skew", version=1, path=Path("."), metadata=SimpleNamespace(image=image)).resize


def test_large_jpegs_take_the_draft_path_in_serving(written):
    _, files = written
    for name in DRAFTED:
        full = Image.open(io.BytesIO(files[name]))
        drafted = decode_image(files[name], LIMITS, target=served_spec())
        assert drafted.width * drafted.height < full.width * full.height / 3, name  # libjpeg decoded at 1/2 or less


@pytest.mark.parametrize("name", list(CASES))
def test_evaluation_and_serving_give_the_same_pixels(name, written, evaluation):
    _, files = written
    tensors, mean, std = evaluation

    served = prepare_image(files[name], served_spec(), LIMITS)
    assert served.shape == (*SIZE, 3) and served.dtype == np.uint8
    expected = normalise(served, np.asarray(mean, np.float32), np.asarray(std, np.float32))
    evaluated = tensors[name]
    if not torch.equal(evaluated, expected):
        # Back to (approximate) uint8 levels to say how far apart they are.
        scale = torch.tensor(std).view(3, 1, 1) * 255
        worst = ((evaluated - expected).abs() * scale).max().item()
        mismatched = ((evaluated - expected).abs() * scale > 0.5).any(0).float().mean().item()
        pytest.fail(f"{name}: evaluation and serving differ by up to {worst:.0f} levels on {mismatched:.1%} of pixels")
