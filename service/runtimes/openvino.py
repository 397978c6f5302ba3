"""OpenVINO's CPU plugin as a `Session`: the same ONNX files, compiled for this CPU.

Streams and threads follow the service's instance layout: one compiled model has one stream per instance thread
that may call it at once, each with its own infer request and `threads` threads (INFERENCE_NUM_THREADS is the total),
so concurrent batches never queue behind each other inside OpenVINO nor fight over the same cores.
bf16 (INFERENCE_PRECISION_HINT) runs the float operations in bfloat16 where the CPU has AVX512_BF16 or AMX.
"""
from __future__ import annotations

import queue
from pathlib import Path

import numpy as np

PROVIDER = "OpenVINO:CPU"


def bf16_supported() -> bool:
    """Whether this CPU computes bf16 natively (OpenVINO lists BF16 among its capabilities on AVX512_BF16 / AMX)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def resolve_precision(requested: str) -> str:
    """auto -> bf16 where the CPU has it, else f32; bf16 on a CPU without it is refused (emulated bf16 is slower)."""
    if requested == "auto":
        return "bf16" if bf16_supported() else "f32"
    if requested == "bf16" and not bf16_supported():
        raise ValueError("precision bf16 asked for, but this CPU has no bf16 instructions (AVX512_BF16 or AMX); use f32 or auto")
    return requested


class OpenVinoSession:
    provider = PROVIDER

    def __init__(self, path: Path, *, threads: int, streams: int, precision: str):
        import openvino as ov

        # No pinning: the instance and solo models, and the decode threads, share the same cores.
        config = {"INFERENCE_PRECISION_HINT": precision, "NUM_STREAMS": streams, "INFERENCE_NUM_THREADS": threads * streams,
                  "ENABLE_CPU_PINNING": False,
                  "PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT"}
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # f32 | bf16
        if self.precision != precision:  # never a silent change of precision
            raise RuntimeError(f"OpenVINO compiled {path} for {self.precision}, not the {precision} asked for")
        self.output_names = [output.get_any_name() for output in self.compiled.outputs]
        self._requests: queue.SimpleQueue = queue.SimpleQueue()  # one per stream: a caller takes one, runs, gives it back
        for _ in range(streams):
            self._requests.put(self.compiled.create_infer_request())

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = self._requests.get()
        try:
            # share_inputs: the batch array is read in place (np.stack made it contiguous); outputs are copied out,
            # since the request's buffers are reused by the next batch.
            results = request.infer(feeds, share_inputs=True, share_outputs=False)
            return {name: np.asarray(results[index]) for index, name in enumerate(self.output_names)}
        finally:
            self._requests.put(request)
