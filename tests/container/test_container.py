"""The CPU image and the compose stack, for real: build, no torch inside, healthy with the demo models mounted,
real images through /classify, /embed and /reconstruct, metrics, and a clean exit 0 on SIGTERM (`docker stop`).

Run with `make docker-test` (or VITSERVE_CONTAINER_TESTS=1 with DOCKER_HOST pointing at an engine). Skips when no
engine answers or the model repository is missing (`make models`)."""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("VITSERVE_IMAGE", "vitserve:latest")
MODELS = Path(os.environ.get("VITSERVE_MODELS_DIR", ROOT / "models")).resolve()
HEALTHY_WITHIN_S = 90
pytestmark = pytest.mark.timeout(900)


def docker(*args: str, check: bool = True, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def compose(*args: str, env: dict, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    command = ["docker-compose"] if shutil.which("docker-compose") else ["docker", "compose"]
    result = subprocess.run([*command, "-p", env["COMPOSE_PROJECT_NAME"], *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout, env={**os.environ, **env})
    if check and result.returncode != 0:
        raise AssertionError(f"compose {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module", autouse=True)
def engine():
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.skip("no Docker engine answers `docker info` (start one, or set DOCKER_HOST)")
    if not (MODELS / "demo-classifier").is_dir():
        pytest.skip(f"no demo model repository in {MODELS}: run `make models` first")


@pytest.fixture(scope="module")
def image(engine):
    if docker("image", "inspect", IMAGE, check=False).returncode != 0:
        started = time.monotonic()
        docker("build", "-t", IMAGE, str(ROOT), timeout=1800)
        print(f"\nbuilt {IMAGE} in {time.monotonic() - started:.1f} s")
    size = int(docker("image", "inspect", "-f", "{{.Size}}", IMAGE).stdout)
    print(f"\n{IMAGE}: {size / 1e6:.0f} MB")
    return IMAGE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(container: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < HEALTHY_WITHIN_S:
        state = json.loads(docker("inspect", "-f", "{{json .State}}", container).stdout)
        if state.get("Health", {}).get("Status") == "healthy":
            return time.monotonic() - started
        if state["Status"] == "exited":
            break
        time.sleep(0.5)
    logs = docker("logs", "--tail", "40", container, check=False)
    raise AssertionError(f"{container} not healthy in {HEALTHY_WITHIN_S} s: {state}\n{logs.stdout}{logs.stderr}")


# ---- real images and requests (standard library only, so nothing here needs the service's packages) ----

def sample_images() -> dict[str, tuple[str, bytes]]:
    from PIL import Image, ImageDraw  # Pillow is in the dev venv (the serve extra)

    disc = Image.new("RGB", (320, 240), (20, 20, 40))
    ImageDraw.Draw(disc).ellipse((100, 60, 220, 180), fill=(240, 220, 30))
    bar = Image.new("RGB", (64, 64), (0, 0, 0))
    ImageDraw.Draw(bar).rectangle((4, 6, 60, 18), fill=(255, 255, 255))
    out = {}
    for name, img, fmt, mime in (("circle.jpg", disc, "JPEG", "image/jpeg"), ("bar.png", bar, "PNG", "image/png")):
        buffer = io.BytesIO()
        img.save(buffer, fmt)
        out[name] = (mime, buffer.getvalue())
    return out


def post_images(url: str, fields: dict[str, str] | None = None) -> dict:
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for name, (mime, data) in sample_images().items():
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                   f"Content-Type: {mime}\r\n\r\n".encode() + data + b"\r\n")
    for key, value in (fields or {}).items():
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    body.write(f"--{boundary}--\r\n".encode())
    request = urllib.request.Request(url, data=body.getvalue(), method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
        return json.loads(response.read())


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode()


def probe_the_service(base: str) -> None:
    status, body = get(f"{base}/readyz")
    assert status == 200 and json.loads(body)["models"] == ["demo-classifier", "demo-mae-embed", "demo-mae-reconstruct"]
    classified = post_images(f"{base}/classify", {"top_k": "2"})
    labels = json.loads((MODELS / "demo-classifier" / "1" / "vitserve.json").read_text())["labels"]
    assert classified["results"][0]["predictions"][0]["label"] == "circle"  # a plain yellow disc
    assert len(classified["results"]) == 2 and all(len(r["predictions"]) == 2 for r in classified["results"])
    assert {p["label"] for r in classified["results"] for p in r["predictions"]} <= set(labels)
    embedded = post_images(f"{base}/embed")
    assert len(embedded["embeddings"]) == 2 and len(embedded["embeddings"][0]) == embedded["dim"]
    reconstructed = post_images(f"{base}/reconstruct", {"seed": "0"})
    assert len(reconstructed["results"]) == 2 and reconstructed["results"][0]["composite_png"]
    status, metrics = get(f"{base}/metrics")
    assert status == 200
    for route in ("/classify", "/embed", "/reconstruct"):
        assert f'vitserve_requests_total{{method="POST",route="{route}",status="200"}}' in metrics, route
    assert 'vitserve_images_inferred_total{model="demo-classifier"} 2.0' in metrics


# ---- the image ----

def test_the_image_contains_no_torch(image):
    result = docker("run", "--rm", image, "python", "-c",
                    "import importlib.util,sys; sys.exit(importlib.util.find_spec('torch') is not None)", check=False)
    assert result.returncode == 0, "torch is importable in the serving image"


def test_the_image_runs_as_a_non_root_user(image):
    assert docker("run", "--rm", image, "id", "-u").stdout.strip() != "0"


@pytest.fixture(scope="module")
def container(image):
    name = f"vitserve-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    docker("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", "-v", f"{MODELS}:/models:ro", image)
    try:
        print(f"\n{name}: healthy after {wait_healthy(name):.1f} s")
        yield name, f"http://127.0.0.1:{port}"
    finally:
        docker("rm", "-f", name, check=False)


def test_the_container_serves_real_images_and_metrics(container):
    probe_the_service(container[1])


def test_sigterm_drains_and_exits_0(container):
    name, _ = container
    started = time.monotonic()
    docker("stop", "-t", "40", name)  # SIGTERM, through tini, to vit-serve
    state = json.loads(docker("inspect", "-f", "{{json .State}}", name).stdout)
    print(f"\n{name}: stopped in {time.monotonic() - started:.1f} s, exit code {state['ExitCode']}")
    assert state["ExitCode"] == 0 and not state["OOMKilled"]
    assert "Application shutdown complete" in docker("logs", name).stderr


# ---- the compose stack (the service alone: the monitoring profile's images are not needed) ----

def test_compose_file_is_valid():
    env = {"COMPOSE_PROJECT_NAME": "vitserve-config-check"}
    compose("config", "-q", env=env)
    compose("-f", "docker-compose.yml", "-f", "docker-compose.gpu.yml", "config", "-q", env=env)


def test_compose_up_serves_and_down_stops_cleanly(image):
    env = {"COMPOSE_PROJECT_NAME": f"vitservetest{uuid.uuid4().hex[:6]}", "VITSERVE_PUBLISH": str(free_port())}
    try:
        compose("up", "-d", "--no-build", "vitserve", env=env)
        container = compose("ps", "-q", "vitserve", env=env).stdout.strip()
        print(f"\ncompose: healthy after {wait_healthy(container):.1f} s")
        probe_the_service(f"http://127.0.0.1:{env['VITSERVE_PUBLISH']}")
        limits = json.loads(docker("inspect", "-f", "{{json .HostConfig}}", container).stdout)
        assert limits["Memory"] > 0, "the compose memory limit is applied"
        compose("stop", env=env)
        assert json.loads(docker("inspect", "-f", "{{json .State}}", container).stdout)["ExitCode"] == 0
    finally:
        compose("down", "--remove-orphans", env=env, check=False)
