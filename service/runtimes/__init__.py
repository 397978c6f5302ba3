"""Inference runtimes behind one small interface. A `Session` runs one batch of named inputs on one graph file and
says what really runs it; `service.runtime` builds the served model on top and never asks which runtime it has.

onnxruntime (the default, always installed with the serve extra) and OpenVINO (the openvino extra: bf16 compute on
CPUs that have it, and the fastest int8 on the static QDQ graph) read the same repository files."""
from __future__ import annotations

import importlib.util
from typing import Literal, Protocol

import numpy as np

RuntimeName = Literal["onnxruntime", "openvino"]
Precision = Literal["auto", "f32", "bf16"]


class Session(Protocol):
    output_names: list[str]
    provider: str  # what runs the graph: CPUExecutionProvider, CUDAExecutionProvider, OpenVINO:CPU
    precision: str  # the compute precision of its float operations: f32, bf16 (int8 graphs: of what is left in float)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One batch: every output of the graph, by name."""


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None
