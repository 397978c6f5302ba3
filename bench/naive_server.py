"""The naive server, as most people would first write it: a FastAPI `async def` endpoint that decodes the upload with
Pillow and runs the PyTorch model on it, one request at a time, inside the event loop. No batching, no ONNX.

    python -m bench.naive_server --checkpoint CHECKPOINT [--int8] [--port 8000]

`--int8` applies PyTorch's own dynamic quantisation to the Linear layers (torch.ao quantize_dynamic)."""
from __future__ import annotations

import argparse
import io
import warnings
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, File, UploadFile
from PIL import Image

from model.checkpoints import load_checkpoint
from model.transforms import eval_transform


def create_app(checkpoint: Path, int8: bool = False, top_k: int = 5, device: str = "cpu", fp16: bool = False) -> FastAPI:
    loaded = load_checkpoint(checkpoint)
    model = loaded.model.eval().to(device)
    dtype = torch.float16 if fp16 else torch.float32
    model = model.to(dtype)
    transform = eval_transform(model.config.image_size, loaded.mean, loaded.std)
    labels = loaded.labels or [str(i) for i in range(model.config.num_classes)]
    if int8:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao quantisation is deprecated in favour of torchao
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/classify")
    async def classify(file: UploadFile = File(...)) -> dict:
        image = Image.open(io.BytesIO(await file.read())).convert("RGB")
        with torch.inference_mode():
            probs = model(transform(image).unsqueeze(0).to(device, dtype)).float().softmax(dim=-1)[0]
        scores, indices = probs.topk(top_k)
        return {"predictions": [{"label": labels[i], "index": i, "score": s}
                                for s, i in zip(scores.tolist(), indices.tolist())]}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="naive FastAPI + PyTorch classifier server (benchmark contender)")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--int8", action="store_true", help="torch dynamic int8 quantisation of the Linear layers")
    parser.add_argument("--fp16", action="store_true", help="half precision (GPU)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(create_app(args.checkpoint, args.int8, device=args.device, fp16=args.fp16), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
