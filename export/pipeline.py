"""Checkpoint in, model repository versions out: pick the graphs, export, check, write metadata."""
from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass, field
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from model.checkpoints import LoadedCheckpoint, load_checkpoint
from model.data import IMAGE_EXTENSIONS, decode_image, make_synthetic
from model.mae import MaskedAutoencoder
from model.transforms import resize_and_centre_crop
from model.vit import VisionTransformer

from .graphs import ClassifierGraph, EmbedderGraph, ReconstructorGraph, graph_info
from .onnx_export import DEFAULT_DYNAMO, DEFAULT_OPSET, export_onnx
from .parity import FP32_TOLERANCE, check_parity, parity_inputs
from .repository import (
    METADATA_FILE, METADATA_FORMAT, METADATA_VERSION, VARIANT_FILES, check_name, check_repository, read_metadata,
    staged_version, triton_config, write_json, write_triton_config,
)
from .variants import FP16_TOLERANCE, INT8_TOLERANCE, check_variant, compare_variant, convert_fp16, quantize_int8

# How the service must resize an image before the graph sees it: the evaluation transform of model/transforms.py.
CROP_FRACTION = 0.875
NUM_REAL_IMAGES = 64


class ExportError(ValueError):
    """An export that cannot be done as asked (the message says why)."""


@dataclass
class ExportRequest:
    checkpoint: Path
    repo: Path
    source: str = "auto"
    preset: str | None = None
    name: str | None = None
    image_size: int | None = None
    int8: bool = False
    fp16: bool = False
    images: Path | None = None  # real images for the parity and variant checks (default: built-in synthetic ones)
    opset: int = DEFAULT_OPSET
    dynamo: bool = DEFAULT_DYNAMO
    max_batch_size: int = 64
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class PlannedGraph:
    name: str
    task: str  # classify | embed | reconstruct
    graph: nn.Module


def export_checkpoint(request: ExportRequest) -> list[dict[str, Any]]:
    """Export every graph the checkpoint supports; returns the metadata of each version written."""
    check_repository(request.repo)
    base_name = request.name or default_name(request.checkpoint)
    check_name(base_name)
    if not request.checkpoint.exists():
        raise ExportError(f"checkpoint {request.checkpoint} does not exist")
    loaded = load_checkpoint(request.checkpoint, source=request.source, preset=request.preset, **request.overrides)
    if request.image_size:
        set_image_size(loaded.model, request.image_size)
    planned = plan_graphs(loaded, base_name)
    real_images = load_real_images(request.images, image_size_of(loaded.model))
    checkpoint_sha = sha256_of(request.checkpoint)
    return [export_graph(request, loaded, plan, real_images, checkpoint_sha) for plan in planned]


def default_name(checkpoint: Path) -> str:
    """runs/demo-classifier/checkpoint.pt -> demo-classifier; vit_base.pth -> vit_base."""
    stem = checkpoint.stem if checkpoint.is_file() else checkpoint.name
    return checkpoint.parent.name if stem in ("checkpoint", "model", "pytorch_model") else stem


def set_image_size(model: nn.Module, size: int) -> None:
    vit = model.encoder if isinstance(model, MaskedAutoencoder) else model
    patch = vit.config.patch_size
    if size <= 0 or size % patch:
        raise ExportError(f"image size {size} is not a positive multiple of the model's patch size {patch}")
    if isinstance(model, MaskedAutoencoder):
        raise ExportError("an MAE's sin-cos position tables are fixed to its training grid; export it at its own image size")
    model.set_image_size(size)


def image_size_of(model: nn.Module) -> tuple[int, int]:
    return getattr(model.config, "encoder", model.config).image_size


def plan_graphs(loaded: LoadedCheckpoint, name: str) -> list[PlannedGraph]:
    model, mean, std = loaded.model.eval(), loaded.mean, loaded.std
    if isinstance(model, MaskedAutoencoder):
        return [PlannedGraph(f"{name}-embed", "embed", EmbedderGraph(model.encoder, mean, std)),
                PlannedGraph(f"{name}-reconstruct", "reconstruct", ReconstructorGraph(model, mean, std))]
    if isinstance(model, VisionTransformer) and model.config.num_classes > 0:
        return [PlannedGraph(name, "classify", ClassifierGraph(model, mean, std))]
    return [PlannedGraph(f"{name}-embed", "embed", EmbedderGraph(model, mean, std))]


def load_real_images(folder: Path | None, size: tuple[int, int]) -> np.ndarray:
    """uint8 (N, H, W, 3) images at the model's size: from a folder when given, else the built-in synthetic set."""
    if folder is None:
        return make_synthetic(NUM_REAL_IMAGES, size, seed=12345)[0]
    if not folder.is_dir():
        raise ExportError(f"--images {folder} is not a directory")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:NUM_REAL_IMAGES]
    if not files:
        raise ExportError(f"--images {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return np.stack([np.asarray(resize_and_centre_crop(decode_image(p), size, CROP_FRACTION)) for p in files])


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def export_graph(request: ExportRequest, loaded: LoadedCheckpoint, plan: PlannedGraph, real_images: np.ndarray, checkpoint_sha: str) -> dict[str, Any]:
    info = graph_info(plan.graph)
    inputs = parity_inputs(plan.graph, real_images=real_images)
    # Variants are judged on the real images, all at once: top-1 agreement on noise images means little.
    if plan.task == "reconstruct":
        variant_inputs = parity_inputs(plan.graph, real_images=real_images, batch_sizes=(len(real_images),))
    else:
        variant_inputs = [{plan.graph.input_names[0]: real_images}]
    with staged_version(request.repo, plan.name) as staged:
        staging = staged.path
        fp32_path = staging / VARIANT_FILES["fp32"]
        export_onnx(plan.graph, inputs[0], fp32_path, opset=request.opset, dynamo=request.dynamo)
        variants = {"fp32": {"file": fp32_path.name, "tolerance": FP32_TOLERANCE,
                             "max_abs_diff_vs_torch": check_parity(plan.graph, fp32_path, inputs, FP32_TOLERANCE)}}
        if request.int8:
            path = staging / VARIANT_FILES["int8"]
            quantize_int8(fp32_path, path)
            variants["int8"] = {"file": path.name, "tolerance": INT8_TOLERANCE, **checked_variant(fp32_path, path, variant_inputs, "int8")}
        if request.fp16:
            path = staging / VARIANT_FILES["fp16"]
            convert_fp16(fp32_path, path)
            variants["fp16"] = {"file": path.name, "tolerance": FP16_TOLERANCE, **checked_variant(fp32_path, path, variant_inputs, "fp16")}
        metadata = build_metadata(request, loaded, plan, info, variants, checkpoint_sha)
        write_json(staging / METADATA_FILE, metadata)
    write_triton_config(request.repo, plan.name, triton_config(plan.name, info["inputs"], info["outputs"], max_batch_size=request.max_batch_size))
    return read_metadata(request.repo / plan.name / str(staged.version))


def checked_variant(reference: Path, variant: Path, inputs: list[dict], kind: str) -> dict[str, Any]:
    """Agreement of a variant with the fp32 graph; the export fails when it is outside the variant's tolerance."""
    comparison = compare_variant(reference, variant, inputs)
    check_variant(comparison, kind)
    return {"agreement_vs_fp32": comparison}


def build_metadata(request: ExportRequest, loaded: LoadedCheckpoint, plan: PlannedGraph, info: dict, variants: dict, checkpoint_sha: str) -> dict[str, Any]:
    model = loaded.model
    vit = model.encoder if isinstance(model, MaskedAutoencoder) else model
    config = vit.config
    metadata: dict[str, Any] = {
        "format": METADATA_FORMAT,
        "format_version": METADATA_VERSION,
        "name": plan.name,
        "version": None,  # set when the version directory is committed
        "task": plan.task,
        "inputs": info["inputs"],
        "outputs": info["outputs"],
        "image": {
            "size": list(config.image_size),  # (H, W) the graph takes
            "layout": "NHWC", "dtype": "uint8", "color": "RGB",
            # the service resizes as the model was evaluated: shorter side to size / crop_fraction, bicubic, centre crop
            "resize": {"interpolation": "bicubic", "crop_fraction": CROP_FRACTION},
        },
        "normalization": {"mean": list(loaded.mean), "std": list(loaded.std), "in_graph": True},
        "patch_size": config.patch_size,
        "grid": list(config.grid_size),
        "num_patches": config.num_patches,
        "labels": loaded.labels if plan.task == "classify" else None,
        "num_classes": config.num_classes if plan.task == "classify" else None,
        "embedding": {"dim": config.embed_dim, "pooling": config.pooling} if plan.task == "embed" else None,
        "reconstruction": {
            "default_mask_ratio": model.config.mask_ratio, "norm_pix_loss": model.config.norm_pix_loss,
            "patch_dim": config.patch_size**2 * config.in_chans,
        } if plan.task == "reconstruct" else None,
        "variants": variants,
        "source": {"checkpoint": str(request.checkpoint), "sha256": checkpoint_sha, "format": loaded.source, "step": loaded.step},
        "exporter": {
            "vitserve": _version("vitserve"), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "opset": request.opset, "dynamo": request.dynamo,
        },
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return metadata


def _version(package: str) -> str:
    try:
        return package_metadata.version(package)
    except package_metadata.PackageNotFoundError:
        return "unknown"
