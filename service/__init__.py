"""The vitserve inference service: onnxruntime + FastAPI with dynamic batching. Never imports torch."""
