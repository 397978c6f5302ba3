"""The messages of the Open Inference Protocol's gRPC API (`inference.GRPCInferenceService`, the KServe V2 / Triton
protocol), declared here from the specification and turned into protobuf classes at import with protobuf's descriptor
API: no generated code, no build step.

Why declared here: the message and field names and numbers are protocol facts, and nothing ships them lightly.
tritonclient[grpc] ships generated code, but importing a client in the server would add the client, ml_dtypes and
python-rapidjson (about 33 MB installed) to the serving install and pin protobuf below 7; kserve ships its own, with
pandas, kubernetes and more; compiling a .proto at build time needs grpcio-tools for every build and gives code that
must match the protobuf runtime's major version. Declared here, the `grpc` extra adds grpcio alone (protobuf already
comes with onnxruntime), and any protobuf from 4.25 reads it. The classes live in a pool of their own, so a process
that also holds a client's generated `inference.*` classes (a test) has no clash.

Only the methods vitserve serves are declared (SERVICE, METHODS): the six of the specification and the three of the
model repository extension (Triton's); a client calling another one gets UNIMPLEMENTED.
The wire format depends on field numbers and types only; the names follow the specification so that the messages read
as it does. `version` and `model_version` are plain strings (proto3 `optional` in the newest text): the same bytes on
the wire, "" when not given."""
from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "inference"
SERVICE = f"{PACKAGE}.GRPCInferenceService"

_Field = descriptor_pb2.FieldDescriptorProto
BOOL, INT32, INT64, UINT32, UINT64 = _Field.TYPE_BOOL, _Field.TYPE_INT32, _Field.TYPE_INT64, _Field.TYPE_UINT32, _Field.TYPE_UINT64
FLOAT, DOUBLE, STRING, BYTES = _Field.TYPE_FLOAT, _Field.TYPE_DOUBLE, _Field.TYPE_STRING, _Field.TYPE_BYTES


@dataclass(frozen=True)
class Field:
    name: str
    number: int
    type: int | str  # a scalar type above, or a message's name (nested ones as "Outer.Inner")
    repeated: bool = False
    map_value: int | str | None = None  # map<string, map_value>


@dataclass(frozen=True)
class Message:
    name: str
    fields: tuple[Field, ...] = ()
    nested: tuple["Message", ...] = ()
    oneof: str | None = None  # every field belongs to this oneof
    map_entry: bool = field(default=False, repr=False)


def scalar(name: str, number: int, kind: int | str) -> Field:
    return Field(name, number, kind)


def repeated(name: str, number: int, kind: int | str) -> Field:
    return Field(name, number, kind, repeated=True)


def mapping(name: str, number: int, value: int | str) -> Field:
    return Field(name, number, "", repeated=True, map_value=value)


def parameters(number: int) -> Field:
    return mapping("parameters", number, "InferParameter")


def tensor_fields(with_contents: bool) -> tuple[Field, ...]:
    """name, datatype, shape; then parameters and typed contents for the tensors of an inference."""
    common = (scalar("name", 1, STRING), scalar("datatype", 2, STRING), repeated("shape", 3, INT64))
    return common + ((parameters(4), scalar("contents", 5, "InferTensorContents")) if with_contents else ())


MESSAGES: tuple[Message, ...] = (
    Message("ServerLiveRequest"),
    Message("ServerLiveResponse", (scalar("live", 1, BOOL),)),
    Message("ServerReadyRequest"),
    Message("ServerReadyResponse", (scalar("ready", 1, BOOL),)),
    Message("ModelReadyRequest", (scalar("name", 1, STRING), scalar("version", 2, STRING))),
    Message("ModelReadyResponse", (scalar("ready", 1, BOOL),)),
    Message("ServerMetadataRequest"),
    Message("ServerMetadataResponse", (scalar("name", 1, STRING), scalar("version", 2, STRING),
                                       repeated("extensions", 3, STRING))),
    Message("ModelMetadataRequest", (scalar("name", 1, STRING), scalar("version", 2, STRING))),
    Message("ModelMetadataResponse", (
        scalar("name", 1, STRING), repeated("versions", 2, STRING), scalar("platform", 3, STRING),
        repeated("inputs", 4, "ModelMetadataResponse.TensorMetadata"),
        repeated("outputs", 5, "ModelMetadataResponse.TensorMetadata"),
        mapping("properties", 6, STRING),
    ), nested=(Message("TensorMetadata", tensor_fields(with_contents=False)),)),
    Message("ModelInferRequest", (
        scalar("model_name", 1, STRING), scalar("model_version", 2, STRING), scalar("id", 3, STRING), parameters(4),
        repeated("inputs", 5, "ModelInferRequest.InferInputTensor"),
        repeated("outputs", 6, "ModelInferRequest.InferRequestedOutputTensor"),
        repeated("raw_input_contents", 7, BYTES),
    ), nested=(Message("InferInputTensor", tensor_fields(with_contents=True)),
               Message("InferRequestedOutputTensor", (scalar("name", 1, STRING), parameters(2))))),
    Message("ModelInferResponse", (
        scalar("model_name", 1, STRING), scalar("model_version", 2, STRING), scalar("id", 3, STRING), parameters(4),
        repeated("outputs", 5, "ModelInferResponse.InferOutputTensor"),
        repeated("raw_output_contents", 6, BYTES),
    ), nested=(Message("InferOutputTensor", tensor_fields(with_contents=True)),)),
    Message("InferParameter", (
        scalar("bool_param", 1, BOOL), scalar("int64_param", 2, INT64), scalar("string_param", 3, STRING),
        scalar("double_param", 4, DOUBLE), scalar("uint64_param", 5, UINT64),
    ), oneof="parameter_choice"),
    # the model repository extension
    Message("RepositoryIndexRequest", (scalar("repository_name", 1, STRING), scalar("ready", 2, BOOL))),
    Message("RepositoryIndexResponse", (repeated("models", 1, "RepositoryIndexResponse.ModelIndex"),), nested=(
        Message("ModelIndex", (scalar("name", 1, STRING), scalar("version", 2, STRING), scalar("state", 3, STRING),
                               scalar("reason", 4, STRING))),)),
    Message("RepositoryModelLoadRequest", (scalar("repository_name", 1, STRING), scalar("model_name", 2, STRING),
                                           mapping("parameters", 3, "ModelRepositoryParameter"))),
    Message("RepositoryModelLoadResponse"),
    Message("RepositoryModelUnloadRequest", (scalar("repository_name", 1, STRING), scalar("model_name", 2, STRING),
                                             mapping("parameters", 3, "ModelRepositoryParameter"))),
    Message("RepositoryModelUnloadResponse"),
    Message("ModelRepositoryParameter", (
        scalar("bool_param", 1, BOOL), scalar("int64_param", 2, INT64), scalar("string_param", 3, STRING),
        scalar("bytes_param", 4, BYTES),
    ), oneof="parameter_choice"),
    Message("InferTensorContents", (
        repeated("bool_contents", 1, BOOL), repeated("int_contents", 2, INT32), repeated("int64_contents", 3, INT64),
        repeated("uint_contents", 4, UINT32), repeated("uint64_contents", 5, UINT64),
        repeated("fp32_contents", 6, FLOAT), repeated("fp64_contents", 7, DOUBLE), repeated("bytes_contents", 8, BYTES),
    )),
)

# method -> (request message, response message); all unary
METHODS: dict[str, tuple[str, str]] = {method: (f"{method}Request", f"{method}Response") for method in (
    "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
    "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")}


# --- descriptors -> classes --------------------------------------------------------------------------------

def _with_map_entries(message: Message, outer: str = "") -> Message:
    """A map field is, on the wire, a repeated message `<Name>Entry {key = 1; value = 2}` nested in its message."""
    path = f"{outer}{message.name}"
    entries, fields = [], []
    for f in message.fields:
        if f.map_value is None:
            fields.append(f)
            continue
        entry = "".join(part.title() for part in f.name.split("_")) + "Entry"
        entries.append(Message(entry, (scalar("key", 1, STRING), scalar("value", 2, f.map_value)), map_entry=True))
        fields.append(repeated(f.name, f.number, f"{path}.{entry}"))
    nested = tuple(_with_map_entries(m, f"{path}.") for m in message.nested) + tuple(entries)
    return Message(message.name, tuple(fields), nested, message.oneof, message.map_entry)


def _add_message(proto: descriptor_pb2.DescriptorProto, message: Message) -> None:
    proto.name = message.name
    if message.map_entry:
        proto.options.map_entry = True
    if message.oneof:
        proto.oneof_decl.add(name=message.oneof)
    for f in message.fields:
        described = proto.field.add(name=f.name, number=f.number, json_name=_json_name(f.name),
                                    label=_Field.LABEL_REPEATED if f.repeated else _Field.LABEL_OPTIONAL)
        if isinstance(f.type, str):  # a message, named from the top: "Outer.Inner"
            described.type, described.type_name = _Field.TYPE_MESSAGE, f".{PACKAGE}.{f.type}"
        else:
            described.type = f.type
        if message.oneof:
            described.oneof_index = 0
    for inner in message.nested:
        _add_message(proto.nested_type.add(), inner)


def _json_name(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(part.title() for part in rest)


def _file() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(name="vitserve/open_inference_grpc.proto", package=PACKAGE, syntax="proto3")
    for message in MESSAGES:
        _add_message(proto.message_type.add(), _with_map_entries(message))
    return proto


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file())


def message_class(name: str) -> type:
    """The class of message `name` ("ModelInferRequest", "ModelInferRequest.InferInputTensor", ...)."""
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


ModelInferRequest = message_class("ModelInferRequest")
ModelInferResponse = message_class("ModelInferResponse")
ModelMetadataResponse = message_class("ModelMetadataResponse")
InferParameter = message_class("InferParameter")
