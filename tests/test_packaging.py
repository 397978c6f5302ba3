"""What a serving install contains: the `serve` extra must never bring torch, and torch is pinned exactly."""
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]


def test_the_serve_extra_has_no_torch_and_no_training_packages():
    names = {re.split(r"[<>=\[ ;]", req)[0].lower() for req in EXTRAS["serve"]}
    assert not names & {"torch", "einops", "onnxscript", "transformers", "vitserve"}


def test_torch_is_pinned_exactly_wherever_it_appears():
    for extra, requirements in EXTRAS.items():
        for requirement in requirements:
            if re.match(r"torch\b", requirement):
                assert requirement == "torch==2.13.0", f"{extra}: {requirement}"


ROOT = Path(__file__).resolve().parents[1]


def _importing(package: str, forbidden: str) -> list[str]:
    pattern = re.compile(rf"^\s*(import|from)\s+({forbidden})\b", re.M)
    return [str(p.relative_to(ROOT)) for p in (ROOT / package).rglob("*.py") if pattern.search(p.read_text())]


def test_the_service_package_never_imports_torch_model_or_export():
    assert not _importing("service", "torch|model|export|einops")


@pytest.mark.parametrize("package", ["modelrepo", "imageprep"])
def test_the_ground_floor_imports_no_room_and_no_torch(package):
    assert not _importing(package, "torch|model|export|service|einops")


def test_device_cuda_without_a_cuda_provider_refuses_to_start(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    vit_serve = str(Path(sys.executable).with_name("vit-serve"))
    result = subprocess.run([vit_serve, "--repo", str(tmp_path), "--device", "cuda", "--port", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "no CUDA provider" in result.stdout + result.stderr


def test_the_license_is_an_spdx_expression_and_building_warns_about_no_license(tmp_path):
    """setuptools deprecated the `license = {text = ...}` table (a warning on every install); the SPDX string needs
    setuptools >= 77, and the LICENSE file travels in the wheel."""
    pytest.importorskip("setuptools", minversion="77")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())  # the metadata alone: no build/ in the checkout
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", "dist", "."],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "license" not in (result.stdout + result.stderr).lower()
    dist_info = f"vitserve-{PYPROJECT['project']['version']}.dist-info"
    with zipfile.ZipFile(next((tmp_path / "dist").glob("vitserve-*.whl"))) as wheel:
        assert "License-Expression: Apache-2.0" in wheel.read(f"{dist_info}/METADATA").decode()
        assert "Apache License" in wheel.read(f"{dist_info}/licenses/LICENSE").decode()
