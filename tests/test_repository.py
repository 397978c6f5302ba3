import json

import pytest

from export.repository import (
    METADATA_FILE, RepositoryError, check_repository, staged_version, triton_config, versions, write_json,
)

IMAGES = {"name": "images", "dtype": "uint8", "shape": [-1, 32, 32, 3]}
LOGITS = {"name": "logits", "dtype": "float32", "shape": [-1, 6]}


def export_fake(repo, name, payload="x"):
    with staged_version(repo, name) as staged:
        (staged.path / "model.onnx").write_text(payload)
        write_json(staged.path / METADATA_FILE, {"name": name, "version": None})
    return staged.version


def test_versions_count_up_and_metadata_records_its_version(tmp_path):
    assert export_fake(tmp_path, "demo") == 1
    assert export_fake(tmp_path, "demo") == 2
    assert versions(tmp_path, "demo") == [1, 2]
    assert json.loads((tmp_path / "demo" / "2" / METADATA_FILE).read_text())["version"] == 2


def test_a_failed_export_leaves_no_version_and_no_staging_directory(tmp_path):
    export_fake(tmp_path, "demo")
    with pytest.raises(RuntimeError):
        with staged_version(tmp_path, "demo") as staged:
            (staged.path / "model.onnx").write_text("half")
            raise RuntimeError("parity failed")
    assert versions(tmp_path, "demo") == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_a_repository_path_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "repo"
    target.write_text("not a directory")
    with pytest.raises(RepositoryError, match="is a file"):
        check_repository(target)
    with pytest.raises(RepositoryError, match="is a file"):
        export_fake(target, "demo")


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden", "x" * 200])
def test_model_names_that_are_not_plain_directory_names_are_refused(tmp_path, name):
    with pytest.raises(RepositoryError, match="model name"):
        export_fake(tmp_path, name)


def test_triton_config_is_valid_text_format_with_batching():
    text = triton_config("demo", [IMAGES], [LOGITS], max_batch_size=8)
    assert 'platform: "onnxruntime_onnx"' in text and "max_batch_size: 8" in text
    assert "dims: [ 32, 32, 3 ]" in text and "dims: [ 6 ]" in text and "TYPE_UINT8" in text
    assert "dynamic_batching" in text
    parsed = parse_pbtxt(text)
    assert [i["name"] for i in parsed["input"]] == ["images"] and [o["name"] for o in parsed["output"]] == ["logits"]


def test_scalar_inputs_disable_triton_batching_and_use_the_scalar_reshape():
    keep = {"name": "keep", "dtype": "int64", "shape": []}
    text = triton_config("rec", [IMAGES, keep], [LOGITS], max_batch_size=8)
    assert "max_batch_size: 0" in text and "dynamic_batching" not in text
    assert "dims: [ -1, 32, 32, 3 ]" in text and "reshape: { shape: [ ] }" in text
    parse_pbtxt(text)


def parse_pbtxt(text: str) -> dict:
    """Parse Triton's ModelConfig subset with protobuf's own text-format parser, via a dynamic message type."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, json_format

    file = descriptor_pb2.FileDescriptorProto(name="mc.proto", package="mc", syntax="proto3")
    T = descriptor_pb2.FieldDescriptorProto
    reshape = file.message_type.add(name="Reshape")
    reshape.field.add(name="shape", number=1, type=T.TYPE_INT64, label=T.LABEL_REPEATED)
    tensor = file.message_type.add(name="Tensor")
    tensor.field.add(name="name", number=1, type=T.TYPE_STRING)
    data_type = file.enum_type.add(name="DataType")
    for number, value in enumerate(["TYPE_INVALID", "TYPE_UINT8", "TYPE_FP32", "TYPE_FP16", "TYPE_INT64"]):
        data_type.value.add(name=value, number=number)
    tensor.field.add(name="data_type", number=2, type=T.TYPE_ENUM, type_name=".mc.DataType")
    tensor.field.add(name="dims", number=3, type=T.TYPE_INT64, label=T.LABEL_REPEATED)
    tensor.field.add(name="reshape", number=4, type=T.TYPE_MESSAGE, type_name=".mc.Reshape")
    batching = file.message_type.add(name="Batching")
    batching.field.add(name="max_queue_delay_microseconds", number=1, type=T.TYPE_UINT64)
    config = file.message_type.add(name="ModelConfig")
    config.field.add(name="name", number=1, type=T.TYPE_STRING)
    config.field.add(name="platform", number=2, type=T.TYPE_STRING)
    config.field.add(name="max_batch_size", number=3, type=T.TYPE_INT32)
    config.field.add(name="input", number=4, type=T.TYPE_MESSAGE, type_name=".mc.Tensor", label=T.LABEL_REPEATED)
    config.field.add(name="output", number=5, type=T.TYPE_MESSAGE, type_name=".mc.Tensor", label=T.LABEL_REPEATED)
    config.field.add(name="dynamic_batching", number=6, type=T.TYPE_MESSAGE, type_name=".mc.Batching")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    message = message_factory.GetMessageClass(pool.FindMessageTypeByName("mc.ModelConfig"))()
    text_format.Parse(text, message)
    return json_format.MessageToDict(message, preserving_proto_field_name=True)
