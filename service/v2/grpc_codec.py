"""Between the gRPC messages (grpc_schema.py) and the protocol-neutral V2 request of messages.py: `parameters` maps,
each input's data (raw bytes in `raw_input_contents`, or the typed `contents` of its datatype), and the response
(`raw_output_contents` when the request sent raw inputs, as tritonclient does; typed `contents` when it sent typed
ones). Raw data follows the same rules as REST's binary tensor data, and every check names the tensor at fault."""
from __future__ import annotations

import json

import numpy as np
from pydantic import ValidationError

from ..errors import BadRequest
from ..request_parsing import validation_message
from ..state import ServedModel
from ..tasks.base import Item
from .grpc_schema import InferParameter, ModelInferResponse, ModelMetadataResponse
from .messages import InferenceRequest, Parameters, RequestInput
from .outputs import OutputPlan, output_values
from .tensors import BYTES, check_count, datatype_of, tensor_from_binary, tensor_from_json, tensor_to_binary

# Which typed field of InferTensorContents holds each datatype; FP16 has none: raw only, as the protocol says.
CONTENTS_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
                  "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
                  "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
                  "FP64": "fp64_contents", BYTES: "bytes_contents"}
_INT64_MAX = 2**63 - 1


# --- in ----------------------------------------------------------------------------------------------------

def parameters_from_proto(parameters) -> Parameters:
    """map<string, InferParameter> -> {key: bool | int | float | str}, as the JSON request's `parameters`."""
    values = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            values[key] = getattr(parameter, choice)
    return values


def inference_request(message) -> InferenceRequest:
    """A ModelInferRequest as the neutral request: names, datatypes, shapes, parameters. The data stays in the message
    (`tensor_data` reads it once the request has passed its checks)."""
    try:
        return InferenceRequest.model_validate({
            "id": message.id or None,
            "parameters": parameters_from_proto(message.parameters),
            "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape),
                        "parameters": parameters_from_proto(t.parameters)} for t in message.inputs],
            "outputs": [{"name": o.name, "parameters": parameters_from_proto(o.parameters)} for o in message.outputs] or None,
        })
    except ValidationError as error:
        raise BadRequest(f"malformed inference request: {validation_message(error)}") from None


def uses_raw_contents(message) -> bool:
    return len(message.raw_input_contents) > 0


def typed_elements(message) -> int:
    """How many values the request carries in typed contents (what converting them costs)."""
    return sum(len(getattr(t.contents, f.name)) for t in message.inputs for f, _ in t.contents.ListFields())


def tensor_data(message, given: dict[str, RequestInput]) -> dict:
    """Each checked input's data: raw bytes (one entry of raw_input_contents per input, in the order of `inputs`), or
    the typed contents; never a mix."""
    tensors = list(message.inputs)
    raw = message.raw_input_contents
    if raw:
        if len(raw) != len(tensors):
            raise BadRequest(f"raw_input_contents has {len(raw)} entries for {len(tensors)} inputs; give one per input, "
                             f"in the order of the inputs")
        typed = next((t.name for t in tensors if t.HasField("contents")), None)
        if typed is not None:
            raise BadRequest(f"input '{typed}' has contents, but the request uses raw_input_contents; give every input "
                             f"one way")
        by_name = {t.name: raw[i] for i, t in enumerate(tensors)}
        return {name: tensor_from_binary(name, t.datatype, t.shape, memoryview(by_name[name])) for name, t in given.items()}
    contents = {t.name: t.contents for t in tensors}
    return {name: typed_contents(name, t.datatype, t.shape, contents[name]) for name, t in given.items()}


def typed_contents(name: str, datatype: str, shape: list[int], contents) -> np.ndarray | list[bytes]:
    """The values of an input's typed contents, from the field its datatype takes, checked as JSON data is."""
    expected = CONTENTS_FIELD.get(datatype)
    if expected is None:
        raise BadRequest(f"input '{name}': datatype {datatype} has no typed contents; send it in raw_input_contents")
    other = next((f.name for f, _ in contents.ListFields() if f.name != expected), None)
    if other is not None:
        raise BadRequest(f"input '{name}': datatype {datatype} takes its values in contents.{expected}, not contents.{other}")
    values = getattr(contents, expected)
    if datatype == BYTES:
        check_count(name, shape, len(values))
        return list(values)
    return tensor_from_json(name, datatype, shape, list(values))


# --- out ---------------------------------------------------------------------------------------------------

def set_parameters(target, values: Parameters) -> None:
    """{key: value} -> map<string, InferParameter> (ints beyond int64 go in uint64_param)."""
    for key, value in values.items():
        parameter: InferParameter = target[key]
        if isinstance(value, bool):
            parameter.bool_param = value
        elif isinstance(value, int):
            if value > _INT64_MAX:
                parameter.uint64_param = value
            else:
                parameter.int64_param = value
        elif isinstance(value, float):
            parameter.double_param = value
        else:
            parameter.string_param = str(value)


def infer_response(request: InferenceRequest, model: ServedModel, plans: list[OutputPlan], outputs: list[Item],
                   raw: bool) -> ModelInferResponse:
    """The requested outputs over the request's images, raw or typed (raw for all when one has no typed field)."""
    values = [(plan, output_values(model, plan, outputs)) for plan in plans]
    raw = raw or any(datatype_of(array.dtype) not in CONTENTS_FIELD for _, array in values)
    response = ModelInferResponse(model_name=model.name, model_version=str(model.version), id=request.id or "")
    for plan, array in values:
        datatype = datatype_of(array.dtype)
        tensor = response.outputs.add(name=plan.name, datatype=datatype, shape=array.shape)
        if raw:
            response.raw_output_contents.append(tensor_to_binary(array))
        elif datatype == BYTES:
            tensor.contents.bytes_contents.extend(array.ravel().tolist())
        else:
            getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(array.ravel().tolist())
    return response


def model_metadata_response(metadata: dict) -> ModelMetadataResponse:
    """The REST model metadata (metadata.model_metadata) as ModelMetadataResponse; its parameters and each input's usage
    become `properties` (strings; JSON for other values)."""
    response = ModelMetadataResponse(name=metadata["name"], versions=metadata["versions"], platform=metadata["platform"])
    for kind in ("inputs", "outputs"):
        for tensor in metadata[kind]:
            getattr(response, kind).add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
    properties = {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata["parameters"].items()}
    properties.update({f"input {tensor['name']}": tensor["parameters"]["usage"] for tensor in metadata["inputs"]})
    response.properties.update(properties)
    return response
