"""onnxruntime sessions (CPU or CUDA) as a `Session`; the session options are the repository's own (modelrepo.session)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from modelrepo.session import open_session

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class OrtSession:
    precision = "f32"  # onnxruntime's CPU provider has no bf16 kernels: float operations run in the graph's types

    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.output_names = [output.name for output in session.get_outputs()]
        self.provider = session.get_providers()[0]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """On CUDA the inputs are bound once and copied to the device once (IO binding)."""
        if self.provider != CUDA:
            return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))


def open_ort(path: Path, providers: list[str], intra_op_threads: int, spin_us: int | None) -> OrtSession:
    return OrtSession(open_session(path, providers, intra_op_threads, spin_us))


def cuda_available() -> bool:
    return CUDA in ort.get_available_providers()
