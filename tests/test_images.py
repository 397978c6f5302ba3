"""service/images.py over the ground floor (imageprep): decoding any supported image to upright RGB within
limits, the resize rule, the service's error mapping, PNG encoding and base64 input. Every image is built here
with Pillow. (That training-time evaluation gets the same pixels: tests/test_preprocessing_skew.py.)"""
from __future__ import annotations

import base64
import io
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from service.errors import InvalidImage, PayloadTooLarge
from service.images import (
    ImageLimits,
    ResizeSpec,
    decode_base64_image,
    decode_image,
    encode_png,
    prepare_image,
    resize_for_model,
)

LIMITS = ImageLimits()
RED, BLUE, WHITE, BLACK = (255, 0, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def two_halves(width: int = 40, height: int = 30) -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", (width, height), RED)
    image.paste(BLUE, (width // 2, 0, width, height))
    return image


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradients, filled ellipses, mild noise, slightly blurred: compresses and resamples like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x / width * 255, y / height * 255, (x + y) % 256], -1) + rng.normal(0, 8, (height, width, 3))
    image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(30):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(10, width // 4)), int(rng.integers(10, height // 4))
        draw.ellipse([x0, y0, x0 + w, y0 + h], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image.filter(ImageFilter.GaussianBlur(1.5))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming width x height, with a few bytes of IDAT and no real pixel data."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def scaled_size_and_crop(image: Image.Image, size: tuple[int, int], crop_fraction: float) -> tuple[int, int, int, int]:
    """The resize rule's arithmetic written out independently: the whole-pixel size at which the image covers
    size / crop_fraction, and the centre crop's top-left corner there."""
    height, width = size
    scale = max(height / crop_fraction / image.height, width / crop_fraction / image.width)
    new_w, new_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    return new_w, new_h, (new_w - width) // 2, (new_h - height) // 2


def reference_resize_and_centre_crop(image: Image.Image, size: tuple[int, int], crop_fraction: float) -> Image.Image:
    """To pin imageprep.resize_for_model: the region that resize-then-centre-crop keeps, resampled straight to the
    target."""
    height, width = size
    if image.size[::-1] == size:
        return image
    new_w, new_h, left, top = scaled_size_and_crop(image, size, crop_fraction)
    across, down = image.width / new_w, image.height / new_h
    box = (left * across, top * down, (left + width) * across, (top + height) * down)
    return image.resize((width, height), Image.BICUBIC, box=box)


def resize_then_crop(image: Image.Image, size: tuple[int, int], crop_fraction: float) -> Image.Image:
    """The textbook route (resize the whole image, then cut the centre), for comparison."""
    height, width = size
    new_w, new_h, left, top = scaled_size_and_crop(image, size, crop_fraction)
    return image.resize((new_w, new_h), Image.BICUBIC).crop((left, top, left + width, top + height))


def assert_close(pixel, expected, tolerance: int = 0) -> None:
    assert all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, expected)), f"{pixel} != {expected} (±{tolerance})"


def assert_error(excinfo, error_type: type, status: int, type_name: str, index: int) -> None:
    error = excinfo.value
    assert type(error) is error_type and error.status == status
    body = error.body()["error"]
    assert body["type"] == type_name and body["index"] == index and body["message"]


# ------------------------------------------------------------------------------------------- formats

@pytest.mark.parametrize("fmt, params, tolerance", [
    ("JPEG", {"quality": 95}, 12),
    ("PNG", {}, 0),
    ("WEBP", {"lossless": True}, 0),
    ("WEBP", {"quality": 90}, 16),
    ("BMP", {}, 0),
    ("GIF", {}, 0),
    ("TIFF", {}, 0),
])
def test_each_format_decodes_to_rgb_with_its_size_and_colours(fmt, params, tolerance):
    image = decode_image(encode(two_halves(40, 30), fmt, **params), LIMITS)
    assert image.mode == "RGB" and image.size == (40, 30)
    assert_close(image.getpixel((5, 15)), RED, tolerance)
    assert_close(image.getpixel((35, 15)), BLUE, tolerance)


def test_animated_gif_decodes_its_first_frame():
    frames = [Image.new("RGB", (16, 16), colour) for colour in (RED, (0, 255, 0), BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    image = decode_image(data, LIMITS)
    assert image.mode == "RGB" and image.getpixel((8, 8)) == RED


# --------------------------------------------------------------------------------------------- modes

def _mode_cases():
    one = Image.new("1", (8, 4), 0)
    one.paste(1, (4, 0, 8, 4))
    yield "1", encode(one, "PNG"), [((0, 0), BLACK), ((7, 0), WHITE)]

    yield "L", encode(Image.new("L", (8, 4), 100), "PNG"), [((0, 0), (100, 100, 100))]

    la = Image.new("LA", (8, 4), (0, 0))  # black, fully transparent
    la.paste((0, 255), (4, 0, 8, 4))  # black, opaque
    yield "LA", encode(la, "PNG"), [((0, 0), WHITE), ((7, 0), BLACK)]

    palette = Image.new("P", (8, 4), 1)
    palette.putpalette([*RED, *BLUE] + [0] * 762)
    palette.paste(0, (4, 0, 8, 4))
    yield "P", encode(palette, "PNG"), [((0, 0), BLUE), ((7, 0), RED)]

    transparent = palette.copy()
    yield "P+transparency", encode(transparent, "PNG", transparency=1), [((0, 0), WHITE), ((7, 0), RED)]
    yield "P+transparency (GIF)", encode(transparent, "GIF", transparency=1), [((0, 0), WHITE), ((7, 0), RED)]

    rgba = Image.new("RGBA", (8, 4), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (4, 0, 6, 4))
    rgba.paste((0, 0, 0, 128), (6, 0, 8, 4))
    yield "RGBA", encode(rgba, "PNG"), [((0, 0), WHITE), ((4, 0), BLACK), ((7, 0), (127, 127, 127))]

    yield "CMYK", encode(Image.new("CMYK", (8, 4), (0, 255, 255, 0)), "TIFF"), [((0, 0), RED)]
    yield "CMYK (JPEG)", encode(Image.new("CMYK", (8, 4), (0, 255, 255, 0)), "JPEG", quality=100), [((0, 0), RED)]

    yield "YCbCr", encode(Image.new("RGB", (8, 4), BLUE).convert("YCbCr"), "TIFF"), [((0, 0), BLUE)]


@pytest.mark.parametrize("name, data, expected", list(_mode_cases()), ids=[case[0] for case in _mode_cases()])
def test_every_mode_becomes_rgb_with_alpha_over_white(name, data, expected):
    image = decode_image(data, LIMITS)
    assert image.mode == "RGB" and image.size == (8, 4)
    tolerance = 3 if "JPEG" in name or name == "YCbCr" else 1
    for xy, colour in expected:
        assert_close(image.getpixel(xy), colour, tolerance)


def test_black_drawing_on_transparent_background_stays_visible():
    drawing = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    ImageDraw.Draw(drawing).line([(0, 16), (31, 16)], fill=(0, 0, 0, 255), width=3)
    array = np.asarray(decode_image(encode(drawing, "PNG"), LIMITS))
    assert (array[16] == 0).all() and (array[0] == 255).all()


@pytest.mark.parametrize("mode, fmt, top", [("I;16", "PNG", 65535), ("I;16", "TIFF", 65535), ("I", "TIFF", 65535), ("F", "TIFF", 1.0)])
def test_wide_greyscale_keeps_its_ramp(mode, fmt, top):
    ramp = np.linspace(0, top, 256, dtype=np.float64)[None, :].repeat(4, 0)
    array = ramp.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode])
    source = Image.fromarray(array)
    assert source.mode == mode
    data = encode(source, fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I" if mode != "F" else "F")
    image = decode_image(data, LIMITS)
    assert image.mode == "RGB" and image.size == (256, 4)
    grey = np.asarray(image)[0, :, 0].astype(int)
    assert (np.asarray(image)[..., 0] == np.asarray(image)[..., 2]).all()
    assert grey[0] == 0 and grey[-1] == 255 and (np.diff(grey) >= 0).all()  # rescaled, not clipped at 255
    assert np.abs(grey - np.arange(256)).max() <= 1


# --------------------------------------------------------------------------------------- orientation

def _marked(width: int = 60, height: int = 40) -> Image.Image:
    image = Image.new("RGB", (width, height), (128, 128, 128))
    image.paste(RED, (0, 0, 12, 12))  # the stored top-left corner
    return image


def _with_orientation(image: Image.Image, orientation: int, **params) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif, **params)


@pytest.mark.parametrize("orientation, corner", [(1, (3, 3)), (6, (36, 3)), (8, (3, 56))])
def test_exif_orientation_turns_the_image_upright(orientation, corner):
    image = decode_image(_with_orientation(_marked(60, 40), orientation), LIMITS)
    assert image.size == ((60, 40) if orientation == 1 else (40, 60))
    assert_close(image.getpixel(corner), RED, 20)  # 6: top-left goes top-right; 8: top-left goes bottom-left


def test_draft_accounts_for_a_quarter_turn():
    # Stored 512x2048 with orientation 6 is displayed 2048x512; the target needs >= 32 wide and >= 128 high.
    # Asking libjpeg without swapping the sides would decode at 1/8 and come out only 64 high.
    spec = ResizeSpec(112, 28)
    image = decode_image(_with_orientation(_marked(512, 2048), 6), LIMITS, target=spec)
    assert image.size == (512, 128)  # reduced 4x, both sides still enough
    assert_close(image.getpixel((510, 1)), RED, 40)


# ------------------------------------------------------------------------------------------- limits

def test_pixel_limit_refuses_from_the_header_without_decoding():
    data = png_header_only(9000, 9000)  # 81 Mpx claimed; the pixel data is not even there
    start = time.perf_counter()
    with pytest.raises(PayloadTooLarge) as excinfo:
        decode_image(data, LIMITS, index=2)
    assert time.perf_counter() - start < 0.5
    assert_error(excinfo, PayloadTooLarge, 413, "payload_too_large", 2)
    assert "81,000,000" in excinfo.value.message and "40,000,000" in excinfo.value.message


def test_pixel_limit_applies_to_real_images_of_every_format():
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP"):
        with pytest.raises(PayloadTooLarge):
            decode_image(encode(two_halves(40, 30), fmt), ImageLimits(max_pixels=40 * 30 - 1))
        assert decode_image(encode(two_halves(40, 30), fmt), ImageLimits(max_pixels=40 * 30)).size == (40, 30)


def test_pillow_decompression_bomb_error_becomes_payload_too_large():
    # Above twice Pillow's own MAX_IMAGE_PIXELS, Image.open itself refuses; with our limit raised beyond it,
    # that refusal must still come out as a 413.
    with pytest.raises(PayloadTooLarge) as excinfo:
        decode_image(png_header_only(20000, 20000), ImageLimits(max_pixels=10**12), index=1)
    assert_error(excinfo, PayloadTooLarge, 413, "payload_too_large", 1)


def test_byte_limit():
    with pytest.raises(PayloadTooLarge) as excinfo:
        decode_image(encode(two_halves(), "BMP"), ImageLimits(max_body_bytes=100), index=4)
    assert_error(excinfo, PayloadTooLarge, 413, "payload_too_large", 4)


def test_limits_must_be_positive():
    with pytest.raises(ValueError):
        ImageLimits(max_pixels=0)


# ------------------------------------------------------------------------------------------ bad data

@pytest.mark.parametrize("name, data", [
    ("empty", b""),
    ("garbage", b"this is not an image at all" * 4),
    ("truncated JPEG", encode(photo_like(64, 64), "JPEG")[:300]),
    ("truncated PNG", encode(photo_like(64, 64), "PNG")[:400]),
    ("truncated GIF", encode(photo_like(64, 64).convert("P"), "GIF")[:200]),
    ("truncated WebP", encode(photo_like(64, 64), "WEBP")[:100]),
    ("signature only", b"\x89PNG\r\n\x1a\n"),
])
def test_undecodable_bytes_are_invalid_image_naming_the_index(name, data):
    with pytest.raises(InvalidImage) as excinfo:
        decode_image(data, LIMITS, index=7)
    assert_error(excinfo, InvalidImage, 400, "invalid_image", 7)


def test_an_unsupported_format_is_named():
    with pytest.raises(InvalidImage) as excinfo:
        decode_image(encode(two_halves(32, 32), "ICO"), LIMITS, index=0)
    assert_error(excinfo, InvalidImage, 400, "invalid_image", 0)
    assert "ICO" in excinfo.value.message and "PNG" in excinfo.value.message  # what it is, what would do


def test_prepare_image_passes_errors_through_with_the_index():
    with pytest.raises(InvalidImage) as excinfo:
        prepare_image(b"nope", ResizeSpec(32, 32), LIMITS, index=5)
    assert excinfo.value.index == 5


# ------------------------------------------------------------------------------------------ resizing

@pytest.mark.parametrize("source", [(640, 480), (480, 640), (300, 300), (1000, 200), (57, 91), (100, 50), (16, 16)])
@pytest.mark.parametrize("target, crop_fraction", [((224, 224), 0.875), ((32, 32), 0.875), ((160, 224), 0.875), ((224, 160), 1.0)])
def test_resize_matches_training_evaluation_bit_for_bit(source, target, crop_fraction):
    rng = np.random.default_rng(sum(source))
    image = Image.fromarray(rng.integers(0, 256, (source[1], source[0], 3), dtype=np.uint8))
    spec = ResizeSpec(*target, crop_fraction=crop_fraction)
    pixels = resize_for_model(image, spec)
    expected = np.asarray(reference_resize_and_centre_crop(image, target, crop_fraction))
    assert pixels.dtype == np.uint8 and pixels.shape == (*target, 3) and pixels.flags.c_contiguous
    np.testing.assert_array_equal(pixels, expected)


@pytest.mark.parametrize("name", ["chelsea", "coffee", "rocket"])
def test_resize_gives_resize_then_crop_pixels_up_to_rounding(name):
    """Real photos (scikit-image's): resampling only the kept region changes what the textbook route gives by
    the rounding of its 8-bit intermediate, never more."""
    skimage_data = pytest.importorskip("skimage.data")
    photo = Image.fromarray(getattr(skimage_data, name)())
    for size, crop_fraction in [((224, 224), 0.875), ((160, 224), 0.875), ((384, 384), 1.0), ((32, 32), 0.875)]:
        pixels = resize_for_model(photo, ResizeSpec(*size, crop_fraction=crop_fraction)).astype(int)
        textbook = np.asarray(resize_then_crop(photo, size, crop_fraction)).astype(int)
        difference = np.abs(pixels - textbook)
        assert difference.max() <= 2 and difference.mean() < 0.05, (size, difference.max(), difference.mean())


def test_an_image_at_the_model_size_is_not_resampled():
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_for_model(Image.fromarray(array), ResizeSpec(48, 64)), array)
    np.testing.assert_array_equal(prepare_image(encode(Image.fromarray(array), "PNG"), ResizeSpec(48, 64), LIMITS), array)


def test_prepare_image_gives_model_ready_pixels():
    pixels = prepare_image(encode(photo_like(300, 200), "PNG"), ResizeSpec(32, 48), LIMITS)
    assert pixels.dtype == np.uint8 and pixels.shape == (32, 48, 3) and pixels.flags.c_contiguous


def test_resize_spec_refuses_what_cannot_be_a_resize():
    with pytest.raises(ValueError):
        ResizeSpec(224, 224, interpolation="sinc")
    with pytest.raises(ValueError):
        ResizeSpec(224, 224, crop_fraction=0.0)


# --------------------------------------------------------------------------------------- JPEG draft

def test_jpeg_draft_decodes_smaller_and_nearly_the_same():
    data = encode(photo_like(1920, 1080), "JPEG", quality=90)
    spec = ResizeSpec(224, 224)
    drafted = decode_image(data, LIMITS, target=spec)
    assert drafted.size[0] < 1920 and drafted.size[1] < 1080  # libjpeg scaled the decode
    assert min(drafted.size) >= 224 / 0.875  # still at least what the resize needs
    fast = prepare_image(data, spec, LIMITS).astype(np.int16)
    full = prepare_image(data, spec, LIMITS, draft=False).astype(np.int16)
    assert np.abs(fast - full).mean() < 3


@pytest.mark.parametrize("source", [(1920, 1080), (1080, 1920), (800, 600), (513, 513), (4000, 300)])
@pytest.mark.parametrize("target", [(224, 224), (32, 32), (384, 384), (224, 112)])
def test_jpeg_draft_never_shrinks_below_what_the_resize_needs(source, target):
    data = encode(Image.new("RGB", source, (90, 140, 200)), "JPEG")
    spec = ResizeSpec(*target)
    width, height = decode_image(data, LIMITS, target=spec).size
    need_w, need_h = spec.needed()
    assert width >= min(source[0], need_w) and height >= min(source[1], need_h)
    reducible = source[0] >= 2 * need_w and source[1] >= 2 * need_h
    assert (width < source[0]) if reducible else ((width, height) == source)
    assert prepare_image(data, spec, LIMITS).shape == (*target, 3)


# ------------------------------------------------------------------------------------------ encoding

def test_encode_png_round_trips():
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    data = encode_png(pixels)
    assert data.startswith(b"\x89PNG")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)
    np.testing.assert_array_equal(prepare_image(data, ResizeSpec(24, 40), LIMITS), pixels)
    with pytest.raises(ValueError):
        encode_png(pixels.astype(np.float32))
    with pytest.raises(ValueError):
        encode_png(pixels[..., 0])


# ---------------------------------------------------------------------------------------------- base64

def test_base64_plain_data_url_wrapped_and_url_safe():
    data = encode(two_halves(), "PNG")
    plain = base64.b64encode(data).decode()
    assert decode_base64_image(plain, index=0) == data
    assert decode_base64_image(f"data:image/png;base64,{plain}", index=0) == data
    assert decode_base64_image(f"DATA:image/png;charset=binary;base64,{plain}", index=0) == data
    assert decode_base64_image("\n".join(plain[i:i + 76] for i in range(0, len(plain), 76)) + "\n", index=0) == data
    assert decode_base64_image(base64.urlsafe_b64encode(data).decode().rstrip("="), index=0) == data
    assert decode_image(decode_base64_image(plain, index=0), LIMITS).size == (40, 30)


@pytest.mark.parametrize("text", [
    "not base64 at all!",
    "QUJD*",
    "QUJDR",  # one character past a full group cannot be base64
    "",
    "   ",
    "data:image/png;base64,",
    "data:image/png,%89PNG",  # a data URL that is not base64
    "data:image/png;base64",  # no comma
])
def test_bad_base64_is_invalid_image_naming_the_index(text):
    with pytest.raises(InvalidImage) as excinfo:
        decode_base64_image(text, index=3)
    assert_error(excinfo, InvalidImage, 400, "invalid_image", 3)


def test_base64_must_be_text():
    with pytest.raises(InvalidImage) as excinfo:
        decode_base64_image(b"QUJD", index=1)  # type: ignore[arg-type]
    assert_error(excinfo, InvalidImage, 400, "invalid_image", 1)


def test_an_extreme_aspect_ratio_is_resized_without_a_huge_intermediate_image(monkeypatch):
    from service.images import (
        ImageLimits,
        ResizeSpec,
        prepare_image,
    )

    requested = []
    original_resize = Image.Image.resize

    def recording_resize(self, size, *args, **kwargs):
        requested.append(size)
        return original_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording_resize)
    strip = Image.new("RGB", (20000, 1), (200, 10, 10))  # 162 bytes as PNG; naive resize-then-crop needs ~5 GB
    buffer = io.BytesIO()
    strip.save(buffer, format="PNG")
    pixels = prepare_image(buffer.getvalue(), ResizeSpec(224, 224), ImageLimits())
    assert pixels.shape == (224, 224, 3)
    assert abs(int(pixels[112, 112, 0]) - 200) <= 2  # the colour survives
    assert requested == [(224, 224)]  # only the region the crop keeps is resampled


# ------------------------------------------------------------------------------------- the ground floor

def test_imageprep_imports_neither_torch_nor_any_room():
    """The ground floor must load in a serving install (no torch) and below model/, export/ and service/."""
    probe = ("import sys, imageprep; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'model', 'export', 'service', 'modelrepo', 'onnxruntime'}))")
    completed = subprocess.run([sys.executable, "-c", probe], check=False, cwd=Path(__file__).resolve().parents[1],
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


def test_service_limits_add_only_the_per_request_count_to_the_ground_floors():
    import imageprep

    limits = ImageLimits(max_pixels=100, max_images=3, max_body_bytes=1000)
    assert isinstance(limits, imageprep.ImageLimits) and (limits.max_pixels, limits.max_images) == (100, 3)
    with pytest.raises(ValueError, match="max_images"):
        ImageLimits(max_images=0)
    assert ResizeSpec is imageprep.ResizeSpec  # one definition, not a service copy


def test_ground_floor_errors_carry_the_index_and_stay_free_of_http():
    import imageprep

    with pytest.raises(imageprep.ImageTooLarge) as too_large:
        imageprep.decode_bytes(png_header_only(9000, 9000), imageprep.ImageLimits(), index=2)
    with pytest.raises(imageprep.ImageDecodeError) as broken:
        imageprep.prepare(b"nope", ResizeSpec(8, 8), index=5)
    assert (too_large.value.index, broken.value.index) == (2, 5)
    assert not hasattr(too_large.value, "status") and isinstance(broken.value, imageprep.ImageError)
