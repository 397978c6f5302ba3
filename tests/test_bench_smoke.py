"""`python -m bench --smoke` starts every contender, runs it briefly and writes the results JSON and the plot."""
from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report

ROOT = Path(__file__).resolve().parents[1]
ALWAYS = {"raw", "vitserve", "vitserve-nobatch", "v2", "v2-bytes"}  # need only what the project itself installs
OPTIONAL = {"naive": ("torch", "fastapi"), "litserve": ("litserve",),  # skipped, with a reason, without their packages
            "raw-openvino": ("openvino",)}


def test_smoke_benchmark_writes_json_and_png_with_every_contender(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    [json_path] = tmp_path.glob("*.json")
    [png_path] = tmp_path.glob("*.png")
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads(json_path.read_text())

    measured = {row["contender"] for row in results["summary"]}
    assert ALWAYS <= measured
    for kind, modules in OPTIONAL.items():
        installed = all(importlib.util.find_spec(module) for module in modules)
        if installed:
            assert kind in measured, results["skipped"].get(kind)
        else:
            assert kind in results["skipped"] and results["skipped"][kind]
    for row in results["summary"]:
        assert row["images_per_s"] > 0 and row["p50_ms"] > 0 and not row["errors"], row
    assert {(row["variant"], row["concurrency"]) for row in results["summary"]} == {
        (variant, c) for variant in ("fp32", "int8") for c in (1, 16, 32)}

    names = {ratio["name"] for ratio in results["ratios"]}
    assert {"vitserve / raw ORT", "p50(c=1) - raw batch-1 latency", "int8 / fp32"} <= names
    # a lone request's excess is taken against raw's batch-1 latency measured just around the server's own c=1 run
    lone = {s["round"]: s for s in results["samples"]
            if (s["contender"], s["variant"], s["concurrency"]) == ("vitserve", "fp32", 1)}
    [excess] = [r for r in results["ratios"] if r["name"] == "p50(c=1) - raw batch-1 latency" and r["a"] == "vitserve/fp32"]
    assert excess["per_round"] == [lone[i]["p50_ms"] - lone[i]["raw_batch1_p50_ms"] for i in sorted(lone)]
    assert all(lone[i]["raw_batch1_p50_ms"] > 0 for i in lone)
    # and split by the server's own Server-Timing answers: decode and inference are the server's, the rest is outside
    assert all(lone[i]["server_timing_p50_ms"]["decode"] > 0 and lone[i]["server_timing_p50_ms"]["inference"] > 0
               for i in lone)
    [breakdown] = [row for row in report.lone_request_breakdown(results["samples"])
                   if (row["contender"], row["variant"]) == ("vitserve", "fp32")]
    assert breakdown["excess_ms"] == pytest.approx(statistics.median(s["p50_ms"] for s in lone.values())
                                                   - statistics.median(s["raw_batch1_p50_ms"] for s in lone.values()))
    assert 0 < breakdown["decode_ms"] < breakdown["p50_ms"] and breakdown["outside_server_ms"] > 0
    assert "where a lone request's time goes" in completed.stdout
    assert not any(row["contender"] in ("naive", "litserve") for row in report.lone_request_breakdown(results["samples"]))
    for protocol in ("v2", "v2-bytes"):  # the same server over V2, against raw ORT and /classify
        assert {f"{protocol} / raw ORT", f"{protocol} / vitserve", f"{protocol} p50(c=1) / vitserve p50"} <= names
    # the V2 requests carry the same image as /classify's (pixels after the service's own decode and resize, or the
    # JPEG): the same classes come back, in the same order
    servers = {(entry["contender"], entry["variant"]): entry["example_response"] for entry in results["servers"]}
    classify = [p["index"] for p in servers[("vitserve", "fp32")]["results"][0]["predictions"]]
    for protocol in ("v2", "v2-bytes"):
        [output] = servers[(protocol, "fp32")]["outputs"]
        assert output["name"] == "logits" and output["shape"] == [1, len(classify)]
        assert [int(entry.split(":")[1]) for entry in output["data"]] == classify, protocol
    assert all(limit["limit_images_per_s"] > 0 for limit in results["physical_limits"])
    # every raw runtime measured its top-1 agreement with onnxruntime fp32; OpenVINO only on the graphs it runs well
    agreements = {(entry["contender"], entry["variant"]): entry["top1_agreement_vs_ort_fp32"] for entry in results["raw"]}
    assert agreements[("raw", "fp32")] == 1.0 and 0.9 <= agreements[("raw", "int8")] <= 1.0
    if ("raw-openvino", "fp32") in agreements:
        assert "raw-openvino/int8" in results["skipped"] and ("raw-openvino", "int8") not in agreements
    assert results["generator"]["ceiling"]["requests_per_s"] > 0


def test_settings_contenders_are_parsed_and_bad_ones_refused():
    from bench.contenders import parse_kind

    assert parse_kind("vitserve") == ("vitserve", {})
    assert parse_kind("vitserve+max_batch_size=4+instances=1") == (
        "vitserve", {"VITSERVE_MAX_BATCH_SIZE": "4", "VITSERVE_INSTANCES": "1"})
    assert parse_kind(f"vitserve+source={ROOT}") == ("vitserve", {"PYTHONPATH": str(ROOT.resolve())})  # another checkout
    for bad in ("litserve+max_batch_size=4", "vitserve+max_batch_size", "nginx"):
        completed = subprocess.run([sys.executable, "-m", "bench", "--contenders", bad], cwd=ROOT,
                                   capture_output=True, text=True, timeout=60)
        assert completed.returncode == 2 and bad.split("+")[0] in completed.stderr


def test_the_gpu_variant_refuses_clearly_without_a_cuda_provider():
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        import pytest

        pytest.skip("this onnxruntime has CUDA: the GPU variant would run")
    completed = subprocess.run([sys.executable, "-m", "bench", "--device", "cuda", "--smoke"], cwd=ROOT,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2
    assert "no CUDA provider" in completed.stderr


def test_the_overload_bench_reads_the_collector_passes_from_the_service_metrics():
    from prometheus_client import generate_latest

    from bench.overload import collector_passes
    from service.metrics import Metrics

    passes = collector_passes(generate_latest(Metrics().registry).decode())
    assert passes is not None and len(passes) == 3 and all(count >= 0 for count in passes)
    assert collector_passes("vitserve_ready 1.0\n") is None  # a server without the series: the column says "-"
