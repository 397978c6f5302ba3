"""The real `vit-serve` process for end-to-end tests: a small exported repository, a server on a free port,
and helpers to build requests and check the error envelope."""
from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from export.pipeline import ExportRequest, export_checkpoint
from model.checkpoints import save_checkpoint
from model.data import SYNTHETIC_CLASSES, SYNTHETIC_MEAN, SYNTHETIC_STD, make_synthetic
from model.mae import MaskedAutoencoder
from model.presets import mae_preset, vit_preset
from model.vit import VisionTransformer

API_KEY = "test-secret-key"
VIT_SERVE = str(Path(sys.executable).with_name("vit-serve"))


def build_serving_repo(root: Path) -> Path:
    """A small repository: a vit-test classifier (int8 too) and an mae-test embedder + reconstructor (16x16, patch 4)."""
    torch.manual_seed(0)
    save_checkpoint(root / "cls" / "checkpoint.pt", VisionTransformer(vit_preset("vit-test", num_classes=6)),
                    labels=SYNTHETIC_CLASSES, mean=SYNTHETIC_MEAN, std=SYNTHETIC_STD)
    save_checkpoint(root / "mae" / "checkpoint.pt", MaskedAutoencoder(mae_preset("mae-test")), mean=SYNTHETIC_MEAN, std=SYNTHETIC_STD)
    repository = root / "repo"
    export_checkpoint(ExportRequest(checkpoint=root / "cls" / "checkpoint.pt", repo=repository, name="shapes", int8=True))
    export_checkpoint(ExportRequest(checkpoint=root / "mae" / "checkpoint.pt", repo=repository, name="mae"))
    return repository


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, repo: Path, wait: bool = True, command: list[str] | None = None, **env: str) -> None:
        """`command` starts the server instead of `vit-serve` (given the same arguments): a wrapper that observes it."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {**os.environ, "VITSERVE_INTRA_OP_THREADS": "1", "VITSERVE_DECODE_THREADS": "2",
                       **{f"VITSERVE_{k.upper()}": v for k, v in env.items()}}
        # The log goes to a file: a pipe nobody reads fills after ~64 KB of access lines and blocks the server.
        self.log = tempfile.NamedTemporaryFile("w+", prefix="vit-serve-", suffix=".log")
        self.process = subprocess.Popen([*(command or [VIT_SERVE]), "--repo", str(repo), "--port", str(self.port)], env=environment,
                                        stdout=self.log, stderr=subprocess.STDOUT, text=True)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        self.wait_until(lambda: httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200, timeout)

    def wait_until(self, condition, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vit-serve exited: {self.output()}")
            try:
                if condition():
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("vit-serve did not reach the expected state")

    def exit_status(self, timeout: float = 30) -> int:
        """After the test's own SIGTERM: the status the server exits with by itself. Not stop(): a second SIGTERM that
        lands once uvicorn has given the signal its default action back (the process on its way out) kills it: -15."""
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self.log.close()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        finally:
            self.log.close()

    def output(self) -> str:
        """Everything the server has logged so far."""
        return Path(self.log.name).read_text()


def png_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def shapes(n: int, size: int = 16, seed: int = 5) -> list[bytes]:
    return [png_bytes(img) for img in make_synthetic(n, size, seed=seed)[0]]


def files(images: list[bytes]) -> list:
    return [("file", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]


def assert_error(response: httpx.Response, status: int, kind: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["type"] == kind and body["error"]["message"]
    return body["error"]
