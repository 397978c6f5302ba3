"""What a new user sees of `vit-serve`: its help (words, defaults, sections, environment variables; no pydantic
internals), its errors, and its log lines (with --log-format json, every line of the real process is JSON)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.settings import OPTION_GROUPS, Settings, env_name, load_settings

VIT_SERVE = str(Path(sys.executable).with_name("vit-serve"))


def run_vit_serve(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([VIT_SERVE, *args], capture_output=True, text=True, timeout=60, env={**os.environ, **env})


# --- help ----------------------------------------------------------------------------------------------------

def test_help_shows_plain_words_defaults_sections_and_environment_variables():
    result = run_vit_serve("--help", COLUMNS="100")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for internal in ("{SecretStr", "SecretStr", "default factory", "null}", "list[str]", "dict[str", "Path"):
        assert internal not in text, internal
    for title in OPTION_GROUPS:
        assert f"\n{title}:\n" in text
    for name in Settings.model_fields:
        assert env_name(name) in text
    assert "--api-key SECRET" in text and "--port N" in text and "--max-delay-ms NUMBER" in text
    assert "(default: 127.0.0.1)" in text and "(default: on)" in text and "(default: 2)" in text
    assert "--log-format {text,json}" in text


def test_every_setting_is_in_exactly_one_help_section():
    listed = [name for names in OPTION_GROUPS.values() for name in names]
    assert sorted(listed) == sorted(Settings.model_fields)


def test_a_setting_without_a_plain_default_says_its_default_in_words():
    for name, field in Settings.model_fields.items():
        assert field.description, name
        if not field.is_required() and (field.default_factory is not None or field.default is None):
            assert "default" in field.description, name


# --- the command line and the environment -------------------------------------------------------------------

def test_command_line_forms_and_that_the_command_line_beats_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("VITSERVE_PORT", "9001")
    monkeypatch.setenv("VITSERVE_HOST", "0.0.0.0")
    settings = load_settings(["--repo", str(tmp_path), "--port", "9002", "--models", "a,b", "--pin-versions", '{"a": 2}',
                              "--no-solo-all-cores", "--intra-op-spin-us", "null", "--log-format", "json"])
    assert (settings.port, settings.host) == (9002, "0.0.0.0")
    assert settings.models == ["a", "b"] and settings.pin_versions == {"a": 2}
    assert settings.solo_all_cores is False and settings.intra_op_spin_us is None and settings.log_format == "json"
    assert load_settings(["--repo", str(tmp_path), "--models", '["c"]']).models == ["c"]


def test_null_in_the_environment_asks_for_the_computed_default_as_on_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("VITSERVE_INTRA_OP_SPIN_US", "null")
    monkeypatch.setenv("VITSERVE_MAX_QUEUE_DELAY_MS", "null")
    settings = load_settings(["--repo", str(tmp_path)])
    assert settings.intra_op_spin_us is None and settings.max_queue_delay_ms is None


def test_a_bad_value_exits_2_naming_the_field_its_option_and_its_variable(tmp_path):
    result = run_vit_serve("--repo", str(tmp_path), "--log-format", "xml")
    assert result.returncode == 2
    assert "log_format (--log-format, VITSERVE_LOG_FORMAT)" in result.stderr and "Traceback" not in result.stderr
    result = run_vit_serve(VITSERVE_REPO="")
    assert result.returncode == 2 and "repo (--repo, VITSERVE_REPO): the model repository is set but empty" in result.stderr
    result = subprocess.run([VIT_SERVE], capture_output=True, text=True, timeout=60,
                            env={k: v for k, v in os.environ.items() if k != "VITSERVE_REPO"})
    assert result.returncode == 2 and "repo (--repo, VITSERVE_REPO): Field required" in result.stderr
    result = run_vit_serve("--repo", str(tmp_path), "--no-such-option", "1")
    assert result.returncode == 2 and "unrecognized arguments: --no-such-option" in result.stderr


# --- logs of the real process ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A repository with one small classifier (vit-test, 16x16)."""
    torch = pytest.importorskip("torch")
    from export.pipeline import ExportRequest, export_checkpoint
    from model.checkpoints import save_checkpoint
    from model.data import SYNTHETIC_CLASSES, SYNTHETIC_MEAN, SYNTHETIC_STD
    from model.presets import vit_preset
    from model.vit import VisionTransformer

    root = tmp_path_factory.mktemp("logs")
    torch.manual_seed(0)
    save_checkpoint(root / "checkpoint.pt", VisionTransformer(vit_preset("vit-test", num_classes=6)),
                    labels=SYNTHETIC_CLASSES, mean=SYNTHETIC_MEAN, std=SYNTHETIC_STD)
    export_checkpoint(ExportRequest(checkpoint=root / "checkpoint.pt", repo=root / "repo", name="shapes"))
    return root / "repo"


def serve_a_few_requests(repo: Path, tmp_path: Path, *options: str) -> list[str]:
    """Start vit-serve, send a good request, a refused one and one to a wrong route, stop it with SIGTERM: every line
    it wrote to stdout and stderr."""
    from model.data import make_synthetic
    from PIL import Image

    images = []
    for i, pixels in enumerate(make_synthetic(2, 16, seed=3)[0]):
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        images.append(("file", (f"{i}.png", (tmp_path / f"{i}.png").read_bytes(), "image/png")))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "VITSERVE_API_KEY": "k", "VITSERVE_MAX_BATCH_SIZE": "2", "VITSERVE_INTRA_OP_THREADS": "1"}
    log_file = tmp_path / "vit-serve.log"
    with log_file.open("w") as out:
        process = subprocess.Popen([VIT_SERVE, "--repo", str(repo), "--port", str(port), *options], env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_ready(process, url)
            headers = {"Authorization": "Bearer k", "X-Request-ID": "trace-7"}
            assert httpx.post(f"{url}/classify", files=images, headers=headers, timeout=30).status_code == 200
            assert httpx.post(f"{url}/classify", files=images, timeout=30).status_code == 401
            assert httpx.get(f"{url}/no-such-route", headers=headers, timeout=30).status_code == 404
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
    print(log_file.read_text())  # shown when a test fails
    return log_file.read_text().splitlines()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(process: subprocess.Popen, url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "vit-serve exited before it was ready"
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("vit-serve did not become ready")


def test_with_log_format_json_every_line_of_the_process_is_a_json_object(repo, tmp_path):
    lines = serve_a_few_requests(repo, tmp_path, "--log-format", "json")
    records = []
    for line in lines:
        record = json.loads(line)  # fails on any line that is not JSON
        assert isinstance(record, dict) and {"time", "level", "logger", "message"} <= record.keys(), line
        records.append(record)
    loggers = {r["logger"] for r in records}
    assert "uvicorn.error" in loggers and "vitserve" in loggers  # uvicorn's lines and ours, one format
    access = [r for r in records if r["logger"] == "vitserve.access" and r["route"] != "/readyz"]  # not the probes
    assert [(r["method"], r["route"], r["status"]) for r in access] == [
        ("POST", "/classify", 200), ("POST", "unmatched", 401), ("GET", "unmatched", 404)]  # refused before routing
    assert access[0]["request_id"] == "trace-7" and access[0]["duration_ms"] > 0 and access[0]["client"] == "127.0.0.1"


def test_text_logs_read_as_lines_for_a_person(repo, tmp_path):
    lines = serve_a_few_requests(repo, tmp_path)
    access = [line for line in lines if " vitserve.access: " in line and "/readyz" not in line]
    assert len(access) == 3
    assert "POST /classify 200 " in access[0] and "request trace-7 client 127.0.0.1" in access[0]
    assert not any(line.lstrip().startswith("{") for line in lines)


def test_a_json_line_keeps_a_traceback_and_the_record_fields_on_one_line():
    import logging

    from service.logs import JsonFormatter

    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("vitserve", logging.ERROR, __file__, 1, "failed %s", ("x",), sys.exc_info())
    record.fields = {"request_id": "r1", "message": "must not replace the message"}
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "failed x" and entry["request_id"] == "r1" and entry["level"] == "error"
    assert "Traceback" in entry["exception"] and "ValueError: boom" in entry["exception"]


def test_a_negative_queue_time_bound_or_refusal_pause_exits_2_naming_the_option(tmp_path):
    result = run_vit_serve("--repo", str(tmp_path), "--max-queue-delay-ms", "-1")
    assert result.returncode == 2 and "--max-queue-delay-ms" in result.stderr and "auto or null" in result.stderr
    result = run_vit_serve("--repo", str(tmp_path), VITSERVE_REFUSAL_PAUSE_MS="-5")
    assert result.returncode == 2 and "VITSERVE_REFUSAL_PAUSE_MS" in result.stderr
