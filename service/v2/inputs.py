"""A V2 request's input tensors, checked against the model's V2 inputs (`metadata.v2_inputs`), and turned into the
task handler's batch work: pixels go straight to the graph, encoded images through the same decoding as /classify."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from modelrepo.names import BATCH, IMAGES, KEEP, NOISE

from ..errors import BadRequest, PayloadTooLarge
from ..reconstruction import choose_mask
from ..state import ServedModel
from ..tasks import HANDLERS, BatchWork, PreparedImage, ReconstructHandler
from .binary import HEADER_LENGTH, carve
from .messages import InferenceRequest, RequestInput, int_parameter
from .metadata import IMAGE_BYTES, V2Input, v2_inputs
from .tensors import check_datatype, tensor_from_binary, tensor_from_json

BINARY_SIZE = "binary_data_size"


@dataclass
class ModelInputs:
    """One request's images (pixels at the model's size, or encoded files still to decode) and mask inputs."""
    batch: int
    pixels: np.ndarray | None = None  # (B, H, W, 3) uint8
    encoded: list[bytes | str] | None = None  # image files; base64 text when they came in JSON
    noise: np.ndarray | None = None  # (B, L) float32
    keep: int | None = None
    seed: int | None = None


def check_inputs(request: InferenceRequest, model: ServedModel, max_images: int) -> tuple[dict[str, RequestInput], int]:
    """(the inputs by name, the batch size): names, datatypes and shapes against the model's V2 inputs, and the
    batch size against the request limit. Cheap: nothing is converted yet."""
    catalogue = {spec.name: spec for spec in v2_inputs(model.metadata)}
    given: dict[str, RequestInput] = {}
    for tensor in request.inputs:
        if tensor.name in given:
            raise BadRequest(f"input '{tensor.name}' is given more than once")
        spec = catalogue.get(tensor.name)
        if spec is None:
            raise BadRequest(f"model '{model.name}' has no input '{tensor.name}' (its inputs: {', '.join(catalogue)})")
        check_datatype(tensor.name, tensor.datatype)
        if tensor.datatype != spec.datatype:
            raise BadRequest(f"input '{tensor.name}': datatype {tensor.datatype}, expected {spec.datatype}")
        _check_shape(tensor, spec)
        given[tensor.name] = tensor
    image_inputs = [name for name in (IMAGES, IMAGE_BYTES) if name in given]
    if len(image_inputs) != 1:
        found = "both" if image_inputs else "neither"
        raise BadRequest(f"give either '{IMAGES}' (pixels) or '{IMAGE_BYTES}' (encoded images), not {found}")
    batch = given[image_inputs[0]].shape[0]
    if batch == 0:
        raise BadRequest(f"input '{image_inputs[0]}' holds no images (batch size 0)")
    if batch > max_images:
        raise PayloadTooLarge(f"{batch} images in one request; the limit is {max_images}")
    return given, batch


def model_inputs(request: InferenceRequest, data: dict, batch: int, model: ServedModel) -> ModelInputs:
    """The checked inputs' data (arrays; lists of encoded images, which stay undecoded), read by the protocol's own
    `tensor_data`, as the model's inputs."""
    inputs = ModelInputs(batch, seed=int_parameter(request.parameters, "seed", "request"))
    if IMAGES in data:
        inputs.pixels = data[IMAGES]
    else:
        inputs.encoded = list(data[IMAGE_BYTES])
    if NOISE in data:
        if data[NOISE].shape[0] != batch:
            raise BadRequest(f"input '{NOISE}': batch size {data[NOISE].shape[0]}, but the request has {batch} images")
        inputs.noise = data[NOISE]
    inputs.keep = _keep(data.get(KEEP), request, model.metadata.num_patches)
    return inputs


def _check_shape(tensor: RequestInput, spec: V2Input) -> None:
    """The declared shape against the model's (-1: any size). `image_bytes` may be [B] or [B, 1] and `keep` [1] or
    [], as clients with Triton's conventions send them."""
    accepted = [spec.shape]
    if spec.name == IMAGE_BYTES:
        accepted.append((BATCH, 1))
    elif spec.name == KEEP:
        accepted.append(())
    if not any(_fits(tensor.shape, shape) for shape in accepted):
        expected = " or ".join(str(list(shape)) for shape in accepted)
        hint = f"; send other sizes as encoded images in '{IMAGE_BYTES}'" if spec.name == IMAGES else ""
        raise BadRequest(f"input '{tensor.name}': shape {tensor.shape} does not match {expected} (-1: any size){hint}")


def _fits(shape: Sequence[int], expected: Sequence[int]) -> bool:
    return len(shape) == len(expected) and all(e == BATCH or s == e for s, e in zip(shape, expected))


def tensor_data(given: dict[str, RequestInput], binary: memoryview, has_binary_part: bool) -> dict:
    """Over REST: each input's data, from the JSON header or from the binary part after it."""
    sizes = []
    for tensor in given.values():
        size = int_parameter(tensor.parameters, BINARY_SIZE, f"input '{tensor.name}'")
        if size is None:
            if tensor.data is None:
                raise BadRequest(f"input '{tensor.name}' has no data (give 'data', or '{BINARY_SIZE}' with binary data)")
            continue
        if tensor.data is not None:
            raise BadRequest(f"input '{tensor.name}' has both 'data' and '{BINARY_SIZE}'; give one")
        if not has_binary_part:
            raise BadRequest(f"input '{tensor.name}' has '{BINARY_SIZE}', but the request has no {HEADER_LENGTH} "
                             f"header to say where the binary data starts")
        sizes.append((tensor.name, size))
    parts = carve(binary, sizes)
    return {name: tensor_from_binary(name, t.datatype, t.shape, parts[name]) if name in parts
            else tensor_from_json(name, t.datatype, t.shape, t.data) for name, t in given.items()}


def _keep(tensor: np.ndarray | None, request: InferenceRequest, num_patches: int) -> int | None:
    """Visible patches, from the `keep` input or the request parameter (not both); None: the model's default."""
    parameter = int_parameter(request.parameters, KEEP, "request")
    if tensor is not None and parameter is not None:
        raise BadRequest(f"give '{KEEP}' as an input or as a request parameter, not both")
    keep = int(np.asarray(tensor).reshape(-1)[0]) if tensor is not None else parameter
    if keep is not None and not 1 <= keep <= num_patches:
        raise BadRequest(f"'{KEEP}' must be between 1 and {num_patches} (the model's patches), got {keep}")
    return keep


def batch_work(model: ServedModel, inputs: ModelInputs, images: list[PreparedImage]) -> BatchWork:
    """The task handler's batch items. A reconstructor takes the request's noise and keep (or the defaults:
    uniform noise, reproducible with `seed`, and the metadata's visible count)."""
    meta = model.metadata
    if meta.task != "reconstruct":
        handler = HANDLERS[meta.task]
        return handler.batch_work(images, handler.params_type(), model)
    noise = inputs.noise
    if noise is None:
        noise, _ = choose_mask(len(images), meta.num_patches, mask_ratio=meta.reconstruction.default_mask_ratio,
                               seed=inputs.seed, visible=None, masked=None)
    return ReconstructHandler.masked_work(images, noise, inputs.keep if inputs.keep is not None else meta.default_keep)
