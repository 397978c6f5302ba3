"""The one builder of a graph's repository metadata: everything the service needs, from the graph and the checkpoint."""
from __future__ import annotations

import datetime
from importlib import metadata as package_metadata
from typing import Any, Mapping

import onnx
import onnxruntime
import torch

from imageprep import DEFAULT_CROP_FRACTION, DEFAULT_INTERPOLATION
from model.checkpoints import LoadedCheckpoint
from model.mae import encoder_of
from modelrepo import (
    AttentionMaps, Classification, Embedding, ImageInput, ModelMetadata, Normalization, Reconstruction, VariantRecord,
)

from .graphs import ClassifierGraph, EmbedderGraph, ExportGraph, ReconstructorGraph

# How the service must resize an image before the graph sees it: the evaluation transform of training.
CROP_FRACTION = DEFAULT_CROP_FRACTION
INTERPOLATION = DEFAULT_INTERPOLATION


def build_metadata(name: str, graph: ExportGraph, loaded: LoadedCheckpoint, variants: Mapping[str, VariantRecord],
                   source: Mapping[str, Any], exporter_options: Mapping[str, Any],
                   attention: AttentionMaps | None = None) -> ModelMetadata:
    config = encoder_of(loaded.model).config
    height, width = config.image_size
    return ModelMetadata(
        name=name, task=graph.task, inputs=graph.input_specs, outputs=graph.output_specs,
        image=ImageInput(height, width, INTERPOLATION, CROP_FRACTION),
        normalization=Normalization(tuple(loaded.mean), tuple(loaded.std)),
        patch_size=config.patch_size, grid=tuple(config.grid_size),
        **task_section(graph, loaded.labels), attention=attention,
        variants=dict(variants), source=dict(source),
        exporter={"vitserve": _version("vitserve"), "torch": torch.__version__, "onnx": onnx.__version__,
                  "onnxruntime": onnxruntime.__version__, **exporter_options},
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def task_section(graph: ExportGraph, labels: list[str] | None) -> dict[str, Any]:
    """The task's own part of the metadata: label names, embedding width and pooling, or masking defaults."""
    if isinstance(graph, ClassifierGraph):
        count = graph.vit.config.num_classes
        return {"classification": Classification(tuple(labels) if labels else tuple(str(i) for i in range(count)))}
    if isinstance(graph, EmbedderGraph):
        return {"embedding": Embedding(graph.encoder.embed_dim, graph.pooling)}
    if isinstance(graph, ReconstructorGraph):
        mae = graph.mae.config
        return {"reconstruction": Reconstruction(mae.mask_ratio, mae.norm_pix_loss, graph.mae.patch_size**2 * 3)}
    raise TypeError(f"no metadata for {type(graph).__name__}")


def _version(package: str) -> str:
    try:
        return package_metadata.version(package)
    except package_metadata.PackageNotFoundError:
        return "unknown"
