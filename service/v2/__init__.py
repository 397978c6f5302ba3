"""The Open Inference Protocol (KServe V2) over REST, with Triton's binary tensor data and classification extensions,
and over gRPC.

    rest.py      the router: /v2, /v2/health/{live,ready}, /v2/models/{name}[/versions/{v}][/ready|/infer]
    infer.py     an inference request, top-down, on the vitserve task handlers, batchers and limits
    inputs.py    input tensors against the model's V2 inputs -> the task handler's batch work
    outputs.py   requested outputs (JSON or binary, classification) -> the response
    metadata.py  a served model as V2 describes it; the `image_bytes` input (encoded images)
    messages.py  the request's JSON and its parameters
    tensors.py   V2 datatypes <-> NumPy; tensor data in JSON and in binary
    binary.py    the body: JSON header + binary part (Inference-Header-Content-Length), Content-Encoding
    errors.py    {"error": "<message>"} for every failure of a V2 route
    grpc_service.py  inference.GRPCInferenceService on its own port (--grpc-port), on the same infer path
    grpc_codec.py    gRPC messages <-> the request of messages.py; raw or typed tensor contents
    grpc_schema.py   the protocol's gRPC messages, declared from the specification (no generated code)
"""
from .rest import HEALTH_PATHS, v2_router

__all__ = ["HEALTH_PATHS", "v2_router"]
