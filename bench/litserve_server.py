"""LitServe wrapping the same ONNX session as the service, with LitServe's own dynamic batching.

    python -m bench.litserve_server --model-dir REPO/NAME/VERSION [--variant int8] [--max-batch-size 8]
                                    [--batch-timeout 0.05] [--port 8000]

POST /predict with a multipart `file` part. Decoding and resizing use the service's own functions (service.images),
so the comparison with vit-serve is of the serving machinery, not of the image code."""
from __future__ import annotations

import argparse
from pathlib import Path

import litserve as ls
import numpy as np

from modelrepo.names import VARIANT_FILES
from service.images import ImageLimits, prepare_image
from service.repository import read_version

from .workload import service_session


class OnnxClassifierAPI(ls.LitAPI):
    def __init__(self, model_dir: Path, variant: str, top_k: int = 5, device: str = "cpu", **batching) -> None:
        super().__init__(**batching)
        self.model_dir, self.variant, self.top_k, self.device = model_dir, variant, top_k, device

    def setup(self, device) -> None:
        entry = read_version(self.model_dir.parent.parent, self.model_dir.parent.name, int(self.model_dir.name))
        self.session = service_session(self.model_dir / VARIANT_FILES[self.variant], device=self.device)
        self.input_name = self.session.get_inputs()[0].name
        self.spec, self.limits = entry.resize, ImageLimits()
        self.labels = entry.metadata.classification.labels
        self.session.run(None, {self.input_name: np.zeros((1, *self.spec.size, 3), np.uint8)})  # warm up

    def decode_request(self, request) -> np.ndarray:
        return prepare_image(request["file"].file.read(), self.spec, self.limits)  # uint8 (H, W, 3)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: images})[0]  # (B, num_classes) logits

    def unbatch(self, logits: np.ndarray) -> list[np.ndarray]:
        return list(logits)

    def encode_response(self, logits: np.ndarray) -> dict:
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs, kind="stable")[: self.top_k]
        return {"predictions": [{"label": self.labels[i], "index": int(i), "score": float(probs[i])} for i in top]}


def main() -> None:
    parser = argparse.ArgumentParser(description="LitServe + onnxruntime classifier server (benchmark contender)")
    parser.add_argument("--model-dir", type=Path, required=True, help="a model version directory of the repository")
    parser.add_argument("--variant", default="fp32", choices=sorted(VARIANT_FILES))
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout", type=float, default=0.05, help="seconds LitServe waits to fill a batch")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    api = OnnxClassifierAPI(args.model_dir, args.variant, device=args.device, max_batch_size=args.max_batch_size,
                            batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator="cuda" if args.device == "cuda" else "cpu", workers_per_device=1)
    server.run(host=args.host, port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
