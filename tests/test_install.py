"""How torch is installed (scripts/install-torch.sh, run by `make venv`): the CPU build from PyTorch's CPU index,
an unreachable index costs seconds rather than minutes before the fallback, and with the CPU build in place no
extra pulls the CUDA stack. Every pip call is a `--dry-run`: nothing is installed."""
from __future__ import annotations

import functools
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install-torch.sh"
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
TORCH_VERSION = next(m[1] for r in EXTRAS["train"] if (m := re.fullmatch(r"torch==(\S+)", r)))
CUDA_STACK = re.compile(r"^(nvidia-.*|triton)$")


def install_torch(*pip_options: str, timeout: float = 120, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run(["sh", str(SCRIPT), sys.executable, "--dry-run", *pip_options], capture_output=True,
                            text=True, timeout=timeout, env={**os.environ, **env})
    return result, time.monotonic() - started


def would_install(report: Path) -> dict[str, str]:
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in json.loads(report.read_text())["install"]}


def a_closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again on return: connections are refused at once


def fake_wheel(folder: Path, name: str, version: str) -> None:
    """A wheel with nothing but its metadata: enough for pip to resolve it in a dry run."""
    dist_info = f"{name}-{version}.dist-info"
    files = {f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist_info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{dist_info}/RECORD"])
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)


class QuietFileHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # pip's requests need no log line each
        pass


@pytest.fixture()
def local_pypi(tmp_path):
    """A stand-in for the default index, on a local port, holding one torch wheel without a local label (as PyPI's),
    and pip without this machine's configuration (wheel mirror, constraints): nothing leaves the machine."""
    project = tmp_path / "index" / "simple" / "torch"
    project.mkdir(parents=True)
    fake_wheel(project, "torch", TORCH_VERSION)
    handler = functools.partial(QuietFileHandler, directory=tmp_path / "index")
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": f"http://127.0.0.1:{server.server_port}/simple",
               "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": ""}
        server.shutdown()


def test_the_cpu_build_is_asked_of_pytorchs_cpu_index(tmp_path):
    """Here the CPU index cannot be reached and the machine's wheel mirror has the +cpu build: it is the one chosen."""
    result, _ = install_torch("--ignore-installed", "--report", str(tmp_path / "report.json"))
    assert result.returncode == 0, result.stderr
    assert f"torch=={TORCH_VERSION}+cpu from https://download.pytorch.org/whl/cpu" in result.stdout
    assert re.search(r"Looking in indexes: .*https://download\.pytorch\.org/whl/cpu", result.stdout)
    assert would_install(tmp_path / "report.json") == {"torch": f"{TORCH_VERSION}+cpu"}


def test_an_index_that_never_answers_falls_back_to_the_default_index_within_seconds(local_pypi, tmp_path):
    """A listening socket that never answers: pip's default patience (here 180 s a read, 5 retries) would stall the
    install for many minutes; the script's own timeout and retry count end the attempt in about 2 x 10 s."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel accepts connections; nobody ever reads or answers
        index = f"http://127.0.0.1:{silent.getsockname()[1]}/whl/cpu"
        result, seconds = install_torch("--report", str(tmp_path / "report.json"), "--ignore-installed",
                                        TORCH_INDEX=index, **local_pypi)
    assert result.returncode == 0, result.stderr
    assert f"torch=={TORCH_VERSION}+cpu from {index}" in result.stdout
    assert "falling back" in result.stderr
    assert would_install(tmp_path / "report.json") == {"torch": TORCH_VERSION}
    assert seconds < 30, f"the unreachable index held the install for {seconds:.0f} s"


def test_a_cuda_build_comes_from_its_own_index_and_never_falls_back(local_pypi):
    result, seconds = install_torch("--ignore-installed", TORCH="cu128", TORCH_INDEX=f"http://127.0.0.1:{a_closed_port()}/cu128",
                                    **local_pypi)
    assert result.returncode == 1 and "falling back" not in result.stderr
    assert f"torch=={TORCH_VERSION}+cu128" in result.stdout and seconds < 30
    result, _ = install_torch("--ignore-installed", TORCH="cu128", **local_pypi)
    assert f"torch=={TORCH_VERSION}+cu128 from https://download.pytorch.org/whl/cu128" in result.stdout
    assert "falling back" not in result.stderr


def test_an_unknown_build_is_refused():
    result, _ = install_torch(TORCH="rocm")
    assert result.returncode == 2 and "TORCH=rocm" in result.stderr


def pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not pypi_reachable(), reason="needs PyPI (pip may look up a missing requirement)")
@pytest.mark.parametrize("extra", ["serve", "train", "export"])
def test_with_the_cpu_torch_installed_no_extra_pulls_the_cuda_stack(extra, tmp_path):
    torch_version = subprocess.run([sys.executable, "-m", "pip", "show", "torch"], capture_output=True, text=True).stdout
    if f"Version: {TORCH_VERSION}+cpu" not in torch_version:
        pytest.skip(f"this environment has no torch {TORCH_VERSION}+cpu")
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-build-isolation", "--report", str(report),
                             f"{ROOT}[{extra}]"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    names = would_install(report)
    assert not [name for name in names if CUDA_STACK.match(name)], names
    assert "torch" not in names
