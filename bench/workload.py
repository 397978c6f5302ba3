"""What every contender serves and receives: a random-weight classifier exported once into a cached model
repository (fp32, dynamic and static int8), 320x240 JPEG request bodies, and onnxruntime sessions built with the
service's options.

torch and export/ are imported only when a model has to be built, so the servers and the load generator stay light."""
from __future__ import annotations

import io
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image

from modelrepo import model_names
from modelrepo.names import VARIANT_FILES
from modelrepo.session import open_session, usable_cores
from service.images import ImageLimits, prepare_image
from service.settings import Settings
from service.repository import ModelVersion, newest_version

NUM_CLASSES = 1000
SERVICE_SPIN_US = Settings.model_fields["intra_op_spin_us"].default
JPEG_SIZE = (320, 240)  # (width, height) of the request images
JPEG_QUALITY = 90
BIAS_SPREAD = 8.0  # class biases, in units of the random model's logit spread


@dataclass(frozen=True)
class BuiltModel:
    """One exported classifier: its PyTorch checkpoint (for the naive server) and a repository holding only it."""

    preset: str
    checkpoint: Path
    repo: Path
    entry: ModelVersion  # the exported version, as the service reads it

    @property
    def version_dir(self) -> Path:
        return self.entry.path

    def onnx_path(self, variant: str) -> Path:
        return self.version_dir / VARIANT_FILES[variant]


def cores() -> int:
    return usable_cores()


def build_model(preset: str, cache: Path, log=print, fp16: bool = False) -> BuiltModel:
    """Random weights (seed 0), `num_classes=1000`, the preset's own image size; exported with --int8 --int8 static
    (calibrated on the export's built-in synthetic images) and --fp16 for the GPU benchmark. Cached."""
    root = cache / f"{preset}-{NUM_CLASSES}{'-fp16' if fp16 else ''}"
    checkpoint, repo, done = root / "checkpoint.pt", root / "repo", root / "built.json"
    if not done.is_file() or "int8-static" not in json.loads(done.read_text()).get("variants", []):  # an older cache
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        started = time.perf_counter()
        _export_random_classifier(preset, checkpoint, repo, fp16)
        done.write_text(json.dumps({"preset": preset, "export_s": round(time.perf_counter() - started, 1),
                                    "variants": ["fp32", "int8", "int8-static", *(["fp16"] if fp16 else [])]}) + "\n")
        log(f"{preset}: built and exported in {time.perf_counter() - started:.0f} s -> {repo}")
    [name] = model_names(repo)
    entry = newest_version(repo, name)
    return BuiltModel(preset, checkpoint, repo, entry)


def _export_random_classifier(preset: str, checkpoint: Path, repo: Path, fp16: bool) -> None:
    import torch

    from export.pipeline import ExportRequest, export_checkpoint
    from model.checkpoints import save_checkpoint
    from model.presets import vit_preset
    from model.vit import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(vit_preset(preset, num_classes=NUM_CLASSES)).eval()
    with torch.no_grad():
        # Random weights give near-tied logits: int8 rounding then flips the top-1 class and the export's agreement
        # check (meant for trained models) refuses the variant. Class biases several logit spreads apart make the
        # top-1 as decisive as a trained model's; weight values do not change the speed.
        spread = vit(torch.randn(4, 3, *vit.config.image_size)).std()
        vit.head.bias.copy_(torch.randn(NUM_CLASSES) * BIAS_SPREAD * spread)
    save_checkpoint(checkpoint, vit)
    export_checkpoint(ExportRequest(checkpoint=checkpoint, repo=repo, name=preset, int8=True, int8_static=True, fp16=fp16))


def make_jpegs(count: int = 16, seed: int = 0) -> list[bytes]:
    """`count` different 320x240 JPEGs with photo-like smooth content (not noise, which JPEG compresses badly)."""
    rng = np.random.default_rng(seed)
    jpegs = []
    for _ in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize(JPEG_SIZE, Image.Resampling.BICUBIC), dtype=np.int16)
        grain = rng.integers(-12, 13, smooth.shape, dtype=np.int16)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=JPEG_QUALITY)
        jpegs.append(buffer.getvalue())
    return jpegs


def preprocess(jpegs: list[bytes], entry: ModelVersion) -> np.ndarray:
    """uint8 (N, H, W, 3): the service's own decode and resize (service.images.prepare_image)."""
    spec, limits = entry.resize, ImageLimits()
    return np.stack([prepare_image(data, spec, limits) for data in jpegs])


CUDA = "CUDAExecutionProvider"


def cuda_available() -> bool:
    return CUDA in onnxruntime.get_available_providers()


def service_session(path: Path, threads: int | None = None, device: str = "cpu") -> onnxruntime.InferenceSession:
    """A session opened as the service opens it (modelrepo.session, with the service's default spinning: onnxruntime's
    own spun for milliseconds, which on a busy machine made a raw batch-1 run slower than the service's); on
    `device="cuda"` the CUDA provider, which must really load (no silent CPU fallback in a GPU benchmark)."""
    providers = [CUDA, "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    session = open_session(path, providers, threads, SERVICE_SPIN_US)
    if device == "cuda" and session.get_providers()[0] != CUDA:
        raise RuntimeError(f"the CUDA provider did not load for {path} (check the CUDA and cuDNN libraries)")
    return session
