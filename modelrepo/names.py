"""Names fixed by the repository format: files, tasks, and the graphs' tensor names."""
from __future__ import annotations

from typing import Literal

METADATA_FILE = "vitserve.json"
METADATA_FORMAT = "vitserve-model"  # the "format" marker that tells our metadata from any other JSON
TRITON_CONFIG_FILE = "config.pbtxt"
VERSION_POLICY_FILE = "version_policy.json"  # which versions of a model to serve (optional, per model)
STAGING_PREFIX = ".staging-"  # a version being written; readers skip it
# int8: dynamic quantisation (activations quantised at run time); int8-static: QDQ, activation ranges calibrated at export.
VARIANT_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "int8-static": "model.int8-static.onnx",
                 "fp16": "model.fp16.onnx"}
# A classifier's attention maps: a graph of its own, run only for requests that ask for them.
ATTENTION_FILE = "attention.onnx"

Task = Literal["classify", "embed", "reconstruct"]
TASKS: tuple[Task, ...] = ("classify", "embed", "reconstruct")

# Tensor names, in the ONNX graphs and in the metadata.
IMAGES, NOISE, KEEP = "images", "noise", "keep"
LOGITS, EMBEDDING = "logits", "embedding"
PATCHES, MASK, LOSS, RECONSTRUCTION = "patches", "mask", "loss", "reconstruction"
ATTENTION = "attention"  # (B, grid rows, grid columns): attention rollout to each patch, summing to 1 per image
BATCH = -1  # the dynamic batch axis in a tensor's shape
