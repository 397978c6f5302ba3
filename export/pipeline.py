"""Checkpoint in, model repository versions out: pick the graphs, export, check, write metadata."""
from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from model.checkpoints import LoadedCheckpoint, load_checkpoint
from model.data import IMAGE_EXTENSIONS, decode_image, make_synthetic
from model.mae import MaskedAutoencoder, encoder_of, image_size_of
from model.provenance import recorded_name, validation_images
from model.transforms import resize_and_centre_crop
from model.vit import VisionTransformer
from modelrepo import (AttentionMaps, ModelMetadata, VariantRecord, check_name, check_repository, read_version_policy,
                       staged_version, write_metadata)
from modelrepo.names import ATTENTION_FILE, IMAGES, KEEP, NOISE, VARIANT_FILES
from modelrepo.triton import triton_config, write_triton_config

from .calibration import CalibrationSet, calibration_set
from .errors import ExportError, VariantError
from .graphs import AttentionGraph, ClassifierGraph, EmbedderGraph, ExportGraph, ReconstructorGraph
from .metadata import CROP_FRACTION, build_metadata
from .onnx_export import DEFAULT_DYNAMO, DEFAULT_OPSET, check_opset, export_onnx
from .parity import FP32_TOLERANCE, check_parity, parity_inputs
from .variants import (FP16_TOLERANCE, INT8_TOLERANCE, STATIC_INT8_TOLERANCE, check_variant, compare_variant, convert_fp16,
                       image_batches, quantize_int8, quantize_int8_static)

NUM_REAL_IMAGES = 64
# kind -> (builder(src, dst), tolerance); int8-static's builder also takes the calibration input sets.
VARIANT_BUILDERS = {"int8": (quantize_int8, INT8_TOLERANCE), "int8-static": (quantize_int8_static, STATIC_INT8_TOLERANCE),
                    "fp16": (convert_fp16, FP16_TOLERANCE)}


@dataclass
class ExportRequest:
    checkpoint: Path
    repo: Path
    source: str = "auto"
    preset: str | None = None
    name: str | None = None
    image_size: int | None = None
    int8: bool = False  # dynamic int8
    int8_static: bool = False  # static int8, calibrated on real images (see export.calibration)
    fp16: bool = False
    images: Path | None = None  # real images for the parity and variant checks (default: built-in synthetic ones)
    opset: int = DEFAULT_OPSET
    dynamo: bool = DEFAULT_DYNAMO
    max_batch_size: int = 64
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def variant_kinds(self) -> list[str]:
        wanted = {"int8": self.int8, "int8-static": self.int8_static, "fp16": self.fp16}
        return [kind for kind in VARIANT_BUILDERS if wanted[kind]]


@dataclass
class PlannedGraph:
    name: str
    task: str  # classify | embed | reconstruct
    graph: ExportGraph
    attention: AttentionGraph | None = None  # a classifier's heat maps, a graph of its own beside it


@dataclass(frozen=True)
class WrittenVersion:
    """What one export wrote: where, and its metadata."""
    name: str
    version: int
    path: Path
    metadata: ModelMetadata


def export_checkpoint(request: ExportRequest) -> list[WrittenVersion]:
    """Export every graph the checkpoint supports; returns the metadata of each version written."""
    check_repository(request.repo)
    check_opset(request.opset, request.dynamo)
    if request.name:
        check_name(request.name)
    if not request.checkpoint.exists():
        raise ExportError(f"checkpoint {request.checkpoint} does not exist")
    loaded = load_checkpoint(request.checkpoint, source=request.source, preset=request.preset, **request.overrides)
    base_name = request.name or recorded_name(loaded.training) or default_name(request.checkpoint)
    check_name(base_name)
    if request.image_size:
        set_image_size(loaded.model, request.image_size)
    planned = plan_graphs(loaded, base_name)
    size = image_size_of(loaded.model)
    real_images = load_real_images(request.images, size, loaded.training)
    calibration = calibration_set(loaded.training, request.images, size, real_images) if request.int8_static else None
    checkpoint_sha = sha256_of(request.checkpoint)
    return [export_graph(request, loaded, plan, real_images, checkpoint_sha, calibration) for plan in planned]


def default_name(checkpoint: Path) -> str:
    """runs/demo-classifier/checkpoint.pt -> demo-classifier; vit_base.pth -> vit_base."""
    stem = checkpoint.stem if checkpoint.is_file() else checkpoint.name
    return checkpoint.parent.name if stem in ("checkpoint", "model", "pytorch_model") else stem


def set_image_size(model: nn.Module, size: int) -> None:
    patch = encoder_of(model).config.patch_size
    if size <= 0 or size % patch:
        raise ExportError(f"image size {size} is not a positive multiple of the model's patch size {patch}")
    if isinstance(model, MaskedAutoencoder):
        raise ExportError("an MAE's sin-cos position tables are fixed to its training grid; export it at its own image size")
    model.set_image_size(size)


def plan_graphs(loaded: LoadedCheckpoint, name: str) -> list[PlannedGraph]:
    model, mean, std = loaded.model.eval(), loaded.mean, loaded.std
    if isinstance(model, MaskedAutoencoder):
        return [PlannedGraph(f"{name}-embed", "embed", EmbedderGraph(model.encoder, mean, std)),
                PlannedGraph(f"{name}-reconstruct", "reconstruct", ReconstructorGraph(model, mean, std))]
    if isinstance(model, VisionTransformer) and model.config.num_classes > 0:
        attention = AttentionGraph(model, mean, std) if AttentionGraph.supports(model) else None
        return [PlannedGraph(name, "classify", ClassifierGraph(model, mean, std), attention)]
    return [PlannedGraph(f"{name}-embed", "embed", EmbedderGraph(model, mean, std))]


def load_real_images(folder: Path | None, size: tuple[int, int], training: dict | None = None) -> np.ndarray:
    """uint8 (N, H, W, 3) images at the model's size: from a folder when given, else the validation images of the
    run that wrote the checkpoint (vit-train records them), else the built-in synthetic set."""
    if folder is None:
        own = validation_images(training, size, NUM_REAL_IMAGES)
        if own is not None:
            return own[0]
        if (training or {}).get("data", {}).get("source", "synthetic") != "synthetic":
            logging.getLogger(__name__).warning("the checkpoint's training images (%s) cannot be read: checking on "
                                                "built-in synthetic images instead (--images names others)", training["data"]["source"])
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


def export_graph(request: ExportRequest, loaded: LoadedCheckpoint, plan: PlannedGraph, real_images: np.ndarray,
                 checkpoint_sha: str, calibration: CalibrationSet | None = None) -> WrittenVersion:
    inputs = parity_inputs(plan.graph, real_images=real_images)
    # Variants are judged on the real images, all at once: top-1 agreement on noise images means little.
    if plan.task == "reconstruct":
        variant_inputs = parity_inputs(plan.graph, real_images=real_images, batch_sizes=(len(real_images),))
    else:
        variant_inputs = [{plan.graph.input_names[0]: real_images}]
    with staged_version(request.repo, plan.name) as staged:
        fp32_path = staged.path / VARIANT_FILES["fp32"]
        export_onnx(plan.graph, inputs[0], fp32_path, opset=request.opset, dynamo=request.dynamo)
        variants = {"fp32": VariantRecord(fp32_path.name, FP32_TOLERANCE,
                                          max_abs_diff_vs_torch=check_parity(plan.graph, fp32_path, inputs, FP32_TOLERANCE))}
        for kind in request.variant_kinds:
            target = staged.path / VARIANT_FILES[kind]
            if kind == "int8-static":
                variants[kind] = build_static_int8(plan, fp32_path, target, variant_inputs, calibration)
            else:
                variants[kind] = build_variant(kind, fp32_path, target, variant_inputs)
        attention = export_attention(request, plan.attention, staged.path, real_images) if plan.attention else None
        source = {"checkpoint": str(request.checkpoint), "sha256": checkpoint_sha, "format": loaded.source, "step": loaded.step}
        metadata = build_metadata(plan.name, plan.graph, loaded, variants, source,
                                  {"opset": request.opset, "dynamo": request.dynamo}, attention)
        write_metadata(staged.path, metadata)
    write_triton_config(request.repo, plan.name, triton_config(plan.name, metadata.inputs, metadata.outputs,
                                                                max_batch_size=request.max_batch_size,
                                                                version_policy=read_version_policy(request.repo, plan.name)))
    return WrittenVersion(plan.name, staged.version, request.repo / plan.name / str(staged.version), metadata)


def export_attention(request: ExportRequest, graph: AttentionGraph, folder: Path, real_images: np.ndarray) -> AttentionMaps:
    """The classifier's attention maps as their own graph, checked against PyTorch like the classifier."""
    inputs = parity_inputs(graph, real_images=real_images)
    path = folder / ATTENTION_FILE
    export_onnx(graph, inputs[0], path, opset=request.opset, dynamo=request.dynamo)
    differences = check_parity(graph, path, inputs, FP32_TOLERANCE)
    return AttentionMaps(path.name, graph.output_specs[0], tolerance=FP32_TOLERANCE, max_abs_diff_vs_torch=differences)


def build_variant(kind: str, reference: Path, path: Path, inputs: list[dict], *, labels: np.ndarray | None = None,
                  convert=None, calibration: dict | None = None) -> VariantRecord:
    """Write a variant beside the fp32 graph and record its agreement (and accuracy, with `labels`); the export fails
    when it cannot be built or strays outside its tolerance."""
    builder, tolerance = VARIANT_BUILDERS[kind]
    try:
        (convert or builder)(reference, path)
        comparison = compare_variant(reference, path, inputs, labels=labels)
    except Exception as error:  # noqa: BLE001 - the quantiser and converter raise whatever their internals hit
        raise VariantError(f"{kind} variant could not be built: {type(error).__name__}: {error}") from error
    check_variant(comparison, kind)
    return VariantRecord(path.name, tolerance, agreement_vs_fp32=comparison, calibration=calibration)


def build_static_int8(plan: PlannedGraph, reference: Path, path: Path, inputs: list[dict],
                      calibration: CalibrationSet) -> VariantRecord:
    """Static int8 calibrated on `calibration`, judged on its held-out images (with their labels) when it has them,
    else on the images the other variants are judged on."""
    feeds = image_batches(calibration.images)
    if plan.task == "reconstruct":  # the masking inputs as the service sends them: uniform noise, the default keep
        rng = np.random.default_rng(0)
        keep = np.array(plan.graph.default_keep, dtype=np.int64)
        feeds = [{**feed, NOISE: rng.random((len(feed[IMAGES]), plan.graph.num_patches), dtype=np.float32), KEEP: keep}
                 for feed in feeds]
    labels = None
    if calibration.held_out is not None and plan.task != "reconstruct":
        inputs, labels = [{IMAGES: calibration.held_out}], calibration.held_out_labels if plan.task == "classify" else None
    convert = functools.partial(quantize_int8_static, calibration=feeds)
    return build_variant("int8-static", reference, path, inputs, labels=labels, convert=convert,
                         calibration=calibration.describe())
