"""What a served model looks like over V2: its inputs (the graph's own, plus `image_bytes`, encoded images the
server decodes and resizes as /classify does), its outputs, and the server and model metadata answers.

One catalogue of inputs (`v2_inputs`) serves both the metadata endpoint and the checks of a request, so what the
metadata promises is what infer accepts."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import metadata as package_metadata

from modelrepo import ModelMetadata
from modelrepo.names import BATCH, IMAGES, KEEP, LOGITS, NOISE

from ..state import ServedModel
from .tensors import BYTES, datatype_of

SERVER_NAME = "vitserve"
PLATFORM = "onnxruntime_onnx"  # Triton's name for what runs the graphs
IMAGE_BYTES = "image_bytes"  # encoded images (JPEG, PNG, ...), one per BYTES element
EXTENSIONS = ("binary_tensor_data", "classification", "model_repository")


@dataclass(frozen=True)
class V2Input:
    name: str
    datatype: str
    shape: tuple[int, ...]  # BATCH (-1) for the batch axis
    usage: str  # said in the metadata's parameters: how the input is given

    def to_json(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape), "parameters": {"usage": self.usage}}


def v2_inputs(meta: ModelMetadata) -> tuple[V2Input, ...]:
    inputs = []
    for spec in meta.inputs:
        if spec.name == IMAGES:
            height, width = meta.image.size
            either = f"give either {IMAGES} or {IMAGE_BYTES}"
            inputs.append(V2Input(IMAGES, datatype_of(spec.dtype), spec.shape,
                                  f"{either}: RGB pixels at {height}x{width}, the model's size (normalised in the graph)"))
            inputs.append(V2Input(IMAGE_BYTES, BYTES, (BATCH,),
                                  f"{either}: encoded images (JPEG, PNG, ...; base64 strings in JSON), decoded and "
                                  f"resized by the server as /{meta.task} does"))
        elif spec.name == NOISE:
            inputs.append(V2Input(NOISE, datatype_of(spec.dtype), spec.shape,
                                  "optional: per patch, the lowest `keep` are visible (default: uniform random, "
                                  "reproducible with the request parameter seed)"))
        elif spec.name == KEEP:  # a scalar, declared [1] as Triton declares scalars
            inputs.append(V2Input(KEEP, datatype_of(spec.dtype), (1,),
                                  f"optional: visible patches, 1..{meta.num_patches}; or the request parameter keep "
                                  f"(default: {meta.default_keep})"))
    return tuple(inputs)


@cache
def server_version() -> str:
    try:
        return package_metadata.version("vitserve")
    except package_metadata.PackageNotFoundError:
        return "unknown"


def server_metadata() -> dict:
    return {"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)}


def model_metadata(model: ServedModel, versions: list[int]) -> dict:
    """`model`'s metadata; `versions`: every version of it being served."""
    meta = model.metadata
    parameters: dict = {"task": meta.task, "image_size": list(meta.image.size)}
    if meta.classification is not None:
        parameters["classification"] = f"the {LOGITS} output takes the parameter classification: N (top N as " \
                                       f"'logit:index:label' BYTES)"
    return {
        "name": model.name, "versions": [str(v) for v in versions], "platform": PLATFORM,
        "inputs": [spec.to_json() for spec in v2_inputs(meta)],
        "outputs": [{"name": spec.name, "datatype": datatype_of(spec.dtype), "shape": list(spec.shape)} for spec in meta.outputs],
        "parameters": parameters,
    }
