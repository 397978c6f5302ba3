"""The model repository: the on-disk contract between `vit-export` (which writes it) and `vit-serve` (which reads it).

    <repo>/<name>/config.pbtxt              Triton's model configuration (the same repository loads in Triton)
    <repo>/<name>/version_policy.json       optional: which versions to serve (`VersionPolicy`; default: the newest)
    <repo>/<name>/<version>/model.onnx      the fp32 graph; variants beside it: model.int8.onnx, model.int8-static.onnx,
                                            model.fp16.onnx
    <repo>/<name>/<version>/attention.onnx  a classifier's attention maps (optional; older exports lack it)
    <repo>/<name>/<version>/vitserve.json   the typed metadata (`ModelMetadata`): task, inputs, sizes, labels, ...

The version is the directory's number and nothing else. Torch-free: both sides import it.
"""
from .errors import InvalidMetadata, RepositoryError, UnsupportedFormat
from .layout import (
    check_name, check_repository, model_names, read_metadata, staged_version, version_dirs, versions, write_metadata,
)
from .metadata import (
    FORMAT_VERSION, AttentionMaps, Classification, Embedding, ImageInput, ModelMetadata, Normalization, Reconstruction,
    TensorSpec, VariantRecord,
)
from .names import TASKS, VARIANT_FILES, Task
from .policy import InvalidPolicy, VersionPolicy, read_version_policy

__all__ = [
    "FORMAT_VERSION", "TASKS", "VARIANT_FILES", "AttentionMaps", "Classification", "Embedding", "ImageInput",
    "InvalidMetadata", "InvalidPolicy", "ModelMetadata", "Normalization", "Reconstruction", "RepositoryError", "Task", "TensorSpec", "UnsupportedFormat",
    "VariantRecord", "check_name", "check_repository", "model_names", "read_metadata", "staged_version", "version_dirs",
    "versions", "write_metadata", "VersionPolicy", "read_version_policy",
]
