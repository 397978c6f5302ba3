"""The model repository format (`modelrepo`): versions, staging, typed metadata and its format versions, Triton's config."""
import json

import pytest

from modelrepo import (
    FORMAT_VERSION, InvalidMetadata, ModelMetadata, RepositoryError, UnsupportedFormat, check_repository, read_metadata,
    staged_version, versions, write_metadata,
)
from modelrepo.layout import write_atomically
from modelrepo.metadata import Classification, ImageInput, Normalization, Reconstruction, TensorSpec
from modelrepo.names import METADATA_FILE, VERSION_POLICY_FILE
from modelrepo.policy import InvalidPolicy, VersionPolicy, read_version_policy
from modelrepo.triton import triton_config

IMAGES = TensorSpec("images", "uint8", (-1, 32, 32, 3))
LOGITS = TensorSpec("logits", "float32", (-1, 6))
LABELS = ("circle", "square", "triangle", "cross", "ring", "bar")


def classifier_metadata(name="demo") -> ModelMetadata:
    return ModelMetadata(name=name, task="classify", inputs=(IMAGES,), outputs=(LOGITS,), image=ImageInput(32, 32),
                         normalization=Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), patch_size=4, grid=(8, 8),
                         classification=Classification(LABELS))


def export_fake(repo, name, payload="x"):
    with staged_version(repo, name) as staged:
        (staged.path / "model.onnx").write_text(payload)
        write_metadata(staged.path, classifier_metadata(name))
    return staged.version


def test_versions_count_up_and_the_directory_alone_names_the_version(tmp_path):
    assert export_fake(tmp_path, "demo") == 1
    assert export_fake(tmp_path, "demo") == 2
    assert versions(tmp_path, "demo") == [1, 2]
    stored = json.loads((tmp_path / "demo" / "2" / METADATA_FILE).read_text())
    assert "version" not in stored and stored["format_version"] == FORMAT_VERSION


def test_metadata_survives_a_round_trip_through_json(tmp_path):
    export_fake(tmp_path, "demo")
    read = read_metadata(tmp_path / "demo" / "1")
    assert read == classifier_metadata()
    assert read.classification.labels == LABELS and read.num_patches == 64 and read.input_names == ("images",)


# What the previous vit-export wrote (format 1): the version number inside, labels and sizes at the top level.
LEGACY_RECONSTRUCTOR = {
    "format": "vitserve-model", "format_version": 1, "name": "demo-mae-reconstruct", "version": 3, "task": "reconstruct",
    "inputs": [{"name": "images", "dtype": "uint8", "shape": [-1, 32, 32, 3]}, {"name": "noise", "dtype": "float32", "shape": [-1, 64]},
               {"name": "keep", "dtype": "int64", "shape": []}],
    "outputs": [{"name": "patches", "dtype": "float32", "shape": [-1, 64, 48]}, {"name": "mask", "dtype": "float32", "shape": [-1, 64]},
                {"name": "loss", "dtype": "float32", "shape": [-1]}, {"name": "reconstruction", "dtype": "uint8", "shape": [-1, 32, 32, 3]}],
    "image": {"size": [32, 32], "layout": "NHWC", "dtype": "uint8", "color": "RGB",
              "resize": {"interpolation": "bicubic", "crop_fraction": 0.875}},
    "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "in_graph": True},
    "patch_size": 4, "grid": [8, 8], "num_patches": 64, "labels": None, "num_classes": None, "embedding": None,
    "reconstruction": {"default_mask_ratio": 0.75, "norm_pix_loss": False, "patch_dim": 48},
    "variants": {"fp32": {"file": "model.onnx", "tolerance": 0.0001, "max_abs_diff_vs_torch": {"patches": 1e-6}}},
    "source": {"checkpoint": "runs/demo-mae/checkpoint.pt", "sha256": "ab", "format": "vitserve", "step": 10},
    "exporter": {"opset": 23}, "created": "2026-11-01T00:00:00+00:00",
}


def test_a_repository_written_by_the_previous_exporter_still_reads(tmp_path):
    version_dir = tmp_path / "demo-mae-reconstruct" / "3"
    version_dir.mkdir(parents=True)
    (version_dir / METADATA_FILE).write_text(json.dumps(LEGACY_RECONSTRUCTOR))
    meta = read_metadata(version_dir)
    assert meta.task == "reconstruct" and meta.reconstruction == Reconstruction(0.75, False, 48)
    assert meta.default_keep == 16 and meta.image.size == (32, 32) and meta.variants["fp32"].file == "model.onnx"
    legacy_without_marker = {k: v for k, v in LEGACY_RECONSTRUCTOR.items() if k != "format_version"}
    assert ModelMetadata.from_json(legacy_without_marker).task == "reconstruct"  # no format_version: format 1


def test_a_newer_or_unknown_format_is_refused_with_the_reason(tmp_path):
    newer = {**classifier_metadata().to_json(), "format_version": FORMAT_VERSION + 1}
    with pytest.raises(UnsupportedFormat, match="newer vit-export.*upgrade vitserve"):
        ModelMetadata.from_json(newer)
    with pytest.raises(UnsupportedFormat, match="not vitserve model metadata"):
        ModelMetadata.from_json({"format": "something-else"})
    with pytest.raises(UnsupportedFormat, match="unknown metadata format_version"):
        ModelMetadata.from_json({**newer, "format_version": "two"})


def test_incomplete_metadata_names_what_is_missing(tmp_path):
    broken = classifier_metadata().to_json()
    del broken["grid"]
    with pytest.raises(InvalidMetadata, match="grid"):
        ModelMetadata.from_json(broken)
    with pytest.raises(InvalidMetadata, match="lacks its classify section"):
        ModelMetadata(**{**vars(classifier_metadata()), "classification": None})
    (tmp_path / "1").mkdir()
    write_atomically(tmp_path / "1" / METADATA_FILE, "{not json")
    with pytest.raises(InvalidMetadata, match="vitserve.json: not JSON"):
        read_metadata(tmp_path / "1")
    with pytest.raises(InvalidMetadata, match="cannot read"):
        read_metadata(tmp_path / "absent")


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
    keep = TensorSpec("keep", "int64", ())
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


def test_labels_that_do_not_match_the_logits_are_refused():
    wrong = {**classifier_metadata().to_json(), "labels": ["a", "b", "c"]}  # 3 labels, 6 logits
    with pytest.raises(InvalidMetadata, match="3 labels for 6 logits"):
        ModelMetadata.from_json(wrong)


# --- version policies ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "available", "chosen"), [
    ("latest", [1, 2, 3], [3]),
    ("latest:2", [3, 1, 2], [3, 2]),
    ("latest:5", [1, 2], [2, 1]),
    ("all", [2, 1], [2, 1]),
    ("specific:1,3", [1, 2, 3], [3, 1]),
    ("specific:4", [1, 2, 3], []),
])
def test_a_version_policy_chooses_triton_s_versions_newest_first(text, available, chosen):
    policy = VersionPolicy.parse(text)
    assert policy.select(available) == chosen
    assert VersionPolicy.parse(policy.describe()) == policy
    assert VersionPolicy.from_json(policy.to_json()) == policy


@pytest.mark.parametrize("text", ["newest", "latest:0", "latest:x", "specific:", "specific:a,b", "all:2", "specific:0"])
def test_a_version_policy_that_cannot_be_read_says_what_is_expected(text):
    with pytest.raises(InvalidPolicy):
        VersionPolicy.parse(text)


def test_a_model_s_policy_file_is_read_and_a_broken_one_names_the_file(tmp_path):
    (tmp_path / "m").mkdir()
    assert read_version_policy(tmp_path, "m") is None
    (tmp_path / "m" / VERSION_POLICY_FILE).write_text('{"latest": {"num_versions": 2}}')
    assert read_version_policy(tmp_path, "m") == VersionPolicy("latest", num_versions=2)
    (tmp_path / "m" / VERSION_POLICY_FILE).write_text('{"newest": {}}')
    with pytest.raises(InvalidPolicy, match=f"m/{VERSION_POLICY_FILE}: unknown version policy 'newest'"):
        read_version_policy(tmp_path, "m")
    (tmp_path / "m" / VERSION_POLICY_FILE).write_text('{"specific": {"versions": [1, "two"]}}')
    with pytest.raises(InvalidPolicy, match="specific"):
        read_version_policy(tmp_path, "m")
