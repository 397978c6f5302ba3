"""Which outputs a V2 request asked for and how (JSON or binary, raw or as classifications), checked before any
work is done; then the model's per-image outputs as the V2 response."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modelrepo.names import LOGITS

from ..errors import BadRequest
from ..state import ServedModel
from ..tasks.base import Item
from .binary import EncodedResponse
from .messages import InferenceRequest, bool_parameter, int_parameter
from .tensors import datatype_of, tensor_to_binary, tensor_to_json

CLASSIFICATION = "classification"


@dataclass(frozen=True)
class OutputPlan:
    name: str
    binary: bool
    classes: int | None = None  # top-N classifications instead of the tensor (Triton's classification extension)


def plan_outputs(request: InferenceRequest, model: ServedModel) -> list[OutputPlan]:
    """The requested outputs in request order (all of the model's, in its order, when none is named).
    `binary_data_output` sets the default, a requested output's `binary_data` overrides it."""
    names = model.metadata.output_names
    binary_default = bool_parameter(request.parameters, "binary_data_output", False, "request")
    if request.outputs is None:
        return [OutputPlan(name, binary_default) for name in names]
    plans: list[OutputPlan] = []
    for output in request.outputs:
        where = f"output '{output.name}'"
        if output.name not in names:
            raise BadRequest(f"model '{model.name}' has no output '{output.name}' (its outputs: {', '.join(names)})")
        if any(plan.name == output.name for plan in plans):
            raise BadRequest(f"{where} is requested more than once")
        classes = int_parameter(output.parameters, CLASSIFICATION, where, minimum=1)
        if classes is not None and (model.metadata.classification is None or output.name != LOGITS):
            raise BadRequest(f"{where}: '{CLASSIFICATION}' is available on the '{LOGITS}' output of a classifier only")
        plans.append(OutputPlan(output.name, bool_parameter(output.parameters, "binary_data", binary_default, where), classes))
    return plans


def encode_response(request: InferenceRequest, model: ServedModel, plans: list[OutputPlan],
                    outputs: list[Item]) -> EncodedResponse:
    """The requested outputs, stacked over the request's images, in JSON or after the header in binary."""
    tensors, binary = [], []
    for plan in plans:
        values = output_values(model, plan, outputs)
        tensor = {"name": plan.name, "datatype": datatype_of(values.dtype), "shape": list(values.shape)}
        if plan.binary:
            raw = tensor_to_binary(values)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            binary.append(raw)
        else:
            tensor["data"] = tensor_to_json(values)
        tensors.append(tensor)
    header = {"model_name": model.name, "model_version": str(model.version), "outputs": tensors}
    if request.id is not None:
        header["id"] = request.id
    return EncodedResponse(header, binary)


def output_values(model: ServedModel, plan: OutputPlan, outputs: list[Item]) -> np.ndarray:
    """One requested output over the request's images: (B, ...), or its top-N classifications."""
    values = np.stack([item[plan.name] for item in outputs])
    return values if plan.classes is None else classifications(values, model.labels, plan.classes)


def classifications(logits: np.ndarray, labels: tuple[str, ...], count: int) -> np.ndarray:
    """(B, C) logits -> (B, min(count, C)) BYTES "value:index:label", highest first (ties: lower index first).
    As in Triton, the value is the model's output (a logit), not a probability."""
    top = np.argsort(-logits, axis=1, kind="stable")[:, :count]
    return np.array([[f"{row[i]:f}:{i}:{labels[i]}".encode() for i in indices] for row, indices in zip(logits, top)],
                    dtype=object).reshape(top.shape)
