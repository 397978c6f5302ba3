"""The contenders. Each serves the same exported model: raw onnxruntime in this process, the others as servers on
127.0.0.1 that receive the same JPEGs in multipart requests, or (`v2`, `v2-bytes`) over the Open Inference Protocol
with binary tensors: the JPEGs as a BYTES tensor, or their pixels after the service's own decode and resize.
`start()`, then `run(...)` any number of times, `stop()`."""
from __future__ import annotations

import http.client
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .loadgen import HttpRequest, LoadGenerator, multipart_image, request_once
from .v2_requests import bytes_request, pixels_request
from modelrepo.names import IMAGES, LOGITS

from .workload import BuiltModel, cores, make_jpegs, preprocess, service_session

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
KINDS = ("raw", "raw-openvino", "vitserve", "vitserve-nobatch", "v2", "v2-bytes", "naive", "litserve")
OPENVINO_SETTING = "VITSERVE_RUNTIME"  # vitserve+runtime=openvino: the service on OpenVINO
# Measured (ViT-Base, batch 4, 2 cores): OpenVINO runs the dynamic int8 graph at 0.87x onnxruntime fp32, its
# DynamicQuantizeLinear and MatMulInteger run unfused; static int8 (QDQ) is its int8 graph.
OPENVINO_VARIANTS = ("fp32", "int8-static")
START_TIMEOUT_S = 180.0
LITSERVE_MAX_BATCH_SIZE = 8
# LitServe's batching docs and examples pair max_batch_size 8 with batch_timeout 0.05 s (its LitAPI docstring: 0.1).
LITSERVE_BATCH_TIMEOUT_S = 0.05


def is_raw(kind: str) -> bool:
    """In-process runtimes on preprocessed tensors (the limits), as opposed to servers."""
    return kind in ("raw", "raw-openvino")


class Unavailable(Exception):
    """A contender that cannot run on this machine; the message says why (and how to fix it). `variant_only`: only
    this variant of it is left out."""

    def __init__(self, reason: str, variant_only: bool = False):
        super().__init__(reason)
        self.variant_only = variant_only


SOURCE_SETTING = "source"  # vitserve+source=PATH: the server's code from another checkout (before/after a change)


def parse_kind(kind: str) -> tuple[str, dict[str, str]]:
    """`vitserve+max_batch_size=16+decode_threads=1` -> ("vitserve", {"VITSERVE_MAX_BATCH_SIZE": "16", ...}): a
    vitserve contender with other settings, so that settings can be compared side by side in one paired run.
    `source=PATH` runs the service's code from another checkout of this repository (PYTHONPATH, not a setting)."""
    base, *settings = kind.split("+")
    if base not in KINDS:
        raise ValueError(f"unknown contender {base!r}; known: {', '.join(KINDS)}")
    if settings and not base.startswith("vitserve"):
        raise ValueError(f"only vitserve contenders take settings (NAME=VALUE after '+'): {kind!r}")
    env = {}
    for setting in settings:
        name, equals, value = setting.partition("=")
        if not equals or not name.strip():
            raise ValueError(f"bad setting {setting!r} in {kind!r}: write NAME=VALUE, e.g. vitserve+max_batch_size=16")
        if name.strip() == SOURCE_SETTING:
            env["PYTHONPATH"] = str(Path(value.strip()).resolve())
        else:
            env["VITSERVE_" + name.strip().upper().replace("-", "_")] = value.strip()
    return base, env


def make_contender(kind: str, model: BuiltModel, variant: str, jpegs: list[bytes], logs: Path, *,
                   raw_max_batch: int = 32, sweep_s: float = 0.5,
                   litserve_batch_timeout_s: float = LITSERVE_BATCH_TIMEOUT_S, device: str = "cpu"):
    base, settings = parse_kind(kind)
    on_openvino = base == "raw-openvino" or settings.get(OPENVINO_SETTING) == "openvino"
    if on_openvino:
        _require("openvino", hint="pip install -e '.[openvino]'")
        if variant not in OPENVINO_VARIANTS:
            raise Unavailable(f"OpenVINO runs the {variant} graph slowly (its int8 graph is int8-static); not a contender",
                              variant_only=True)
    if base == "raw":
        return RawOrt(model, variant, jpegs, max_batch=raw_max_batch, sweep_s=sweep_s, device=device)
    if base == "raw-openvino":
        return RawOpenVino(model, variant, jpegs, max_batch=raw_max_batch, sweep_s=sweep_s, device=device)
    gpu = ["--device", "cuda"] if device == "cuda" else []
    log = logs / f"{model.preset}-{variant}-{kind}.log".replace("/", "_").replace(" ", "_")
    vit_serve = [str(Path(sys.executable).with_name("vit-serve")), "--repo", str(model.repo), "--variant", variant,
                 "--log-level", "warning", "--port"]
    if base in ("vitserve", "vitserve-nobatch"):
        env = {"VITSERVE_MAX_BATCH_SIZE": "1"} if base == "vitserve-nobatch" else {}
        env["VITSERVE_DEVICE"] = device
        return Server(kind, variant, vit_serve, {**env, **settings}, "/readyz", _multipart("/classify", jpegs), log)
    if base in ("v2", "v2-bytes"):  # the same vit-serve process and settings as `vitserve`, spoken to over V2
        name = model.entry.name
        requests = ([pixels_request(name, pixels) for pixels in preprocess(jpegs, model.entry)] if base == "v2"
                    else [bytes_request(name, jpeg) for jpeg in jpegs])
        return Server(kind, variant, vit_serve, {"VITSERVE_DEVICE": device}, "/v2/health/ready", requests, log)
    if base == "naive":
        _require("torch", "fastapi", "uvicorn", "multipart", hint="pip install -e '.[train,serve]'")
        if device == "cuda" and variant == "int8":
            raise Unavailable("PyTorch's dynamic int8 quantisation runs on the CPU only")
        argv = [sys.executable, "-m", "bench.naive_server", "--checkpoint", str(model.checkpoint),
                *(["--int8"] if variant == "int8" else []), *(["--fp16"] if variant == "fp16" else []), *gpu, "--port"]
        return Server(kind, variant, argv, {}, "/healthz", _multipart("/classify", jpegs), log)
    if base == "litserve":
        _require("litserve", hint="pip install litserve")
        argv = [sys.executable, "-m", "bench.litserve_server", "--model-dir", str(model.version_dir), "--variant", variant,
                "--max-batch-size", str(LITSERVE_MAX_BATCH_SIZE), "--batch-timeout", str(litserve_batch_timeout_s), *gpu, "--port"]
        return Server(kind, variant, argv, {}, "/health", _multipart("/predict", jpegs), log)
    raise AssertionError(base)


def _multipart(path: str, jpegs: list[bytes]) -> list[HttpRequest]:
    return [multipart_image(path, jpeg) for jpeg in jpegs]


def _require(*modules: str, hint: str) -> None:
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise Unavailable(f"{', '.join(missing)} not installed ({hint})")


FINALISTS = 3  # the sweep's fastest layouts timed again before one is chosen
CONFIRM_SWEEPS = 3  # each for this many sweep steps' time, at least 3 batches per runner


class RawOrt:
    """onnxruntime in this process on preprocessed uint8 tensors: the physical limit of the model on this machine.

    `start` sweeps batch sizes in two layouts and keeps the fastest (the sweep's three fastest timed again, longer):
    one runner on a session with `cores` intra-op threads, and `cores` runner threads sharing a session with one
    thread each (what `vit-serve --instances` does).
    It also measures the decode + resize CPU time per image. A run times the best layout and batch for
    `duration_s` (its throughput is the ceiling), then batch 1 on the `cores`-thread session for a quarter of
    that (the lowest single-image latency: the run's p50/p99)."""

    kind = "raw"

    def __init__(self, model: BuiltModel, variant: str, jpegs: list[bytes], *, max_batch: int, sweep_s: float,
                 device: str = "cpu") -> None:
        self.model, self.variant, self.jpegs = model, variant, jpegs
        self.max_batch, self.sweep_s, self.device = max_batch, sweep_s, device
        self.info: dict = {}

    def start(self) -> None:
        entry = self.model.entry
        self.pixels = preprocess(self.jpegs, entry)
        decode_ms = _decode_cpu_ms(self.jpegs, entry, seconds=self.sweep_s)
        path = self.model.onnx_path(self.variant)
        self.sessions = {1: self._open(path, threads=cores(), runners=1)}  # runners -> run(feeds)
        if cores() > 1 and self.device == "cpu":  # on a GPU one runner keeps it busy
            self.sessions[cores()] = self._open(path, threads=1, runners=cores())
        agreement = top1_agreement(self.model, self.sessions[1])
        sweep = {}
        for runners in self.sessions:
            for batch in (b for b in (1, 2, 4, 8, 16, 32, 64) if b <= self.max_batch):
                images, seconds = self._time(runners, batch, self.sweep_s, min_runs=2)
                sweep[f"{runners}x{batch}"] = images / seconds
        # A sweep step of a large model is a couple of batches: its order is noise between close layouts, and the
        # layout chosen is every ratio's denominator. The closest few are timed again, longer, in turn.
        finalists = sorted(sweep, key=sweep.get, reverse=True)[:FINALISTS]
        confirmed = {}
        for layout in finalists:
            runners, batch = (int(v) for v in layout.split("x"))
            images, seconds = self._time(runners, batch, CONFIRM_SWEEPS * self.sweep_s, min_runs=3)
            confirmed[layout] = images / seconds
        best = max(confirmed, key=confirmed.get)
        self.best_runners, self.best_batch = (int(v) for v in best.split("x"))
        self.info = {"best_batch": self.best_batch, "best_runners": self.best_runners,
                     "sweep_images_per_s": sweep, "confirmed_images_per_s": confirmed,
                     "sweep_key": "runners x batch (1 runner: cores threads; "
                     "cores runners: 1 thread each, one shared session)",
                     "decode_cpu_ms_per_image": decode_ms, "cores": cores(), "device": self.device,
                     "top1_agreement_vs_ort_fp32": agreement, "runtime": self.runtime, "precision": self.precision}

    runtime, precision = "onnxruntime", "f32"

    def _open(self, path: Path, threads: int, runners: int):
        """A function running one batch of feeds, for `runners` threads calling it at once with `threads` each."""
        session = service_session(path, threads=threads if runners > 1 else None, device=self.device)
        return lambda feeds: session.run(None, feeds)

    def wait_ready(self) -> None:
        pass

    def run(self, generator: LoadGenerator | None, concurrency: int, duration_s: float, warmup_s: float) -> dict:
        self._time(self.best_runners, self.best_batch, warmup_s, min_runs=1)
        images, seconds = self._time(self.best_runners, self.best_batch, duration_s, min_runs=3)
        single = self._latencies(duration_s / 4, min_runs=10)
        return {
            "images_per_s": images / seconds, "completed": images,
            "p50_ms": float(np.percentile(single, 50)) * 1e3, "p99_ms": float(np.percentile(single, 99)) * 1e3,
            "best_batch": self.best_batch, "best_runners": self.best_runners,
            "inference_ms_per_image": seconds * 1e3 / images,  # wall time: all cores are busy
            "errors": {},
        }

    def _feeds(self, batch: int) -> dict:
        return {IMAGES: self.pixels[np.arange(batch) % len(self.pixels)]}

    def _time(self, runners: int, batch: int, seconds: float, min_runs: int) -> tuple[int, float]:
        """Images done and wall seconds, with `runners` threads calling the session back to back."""
        run, feeds = self.sessions[runners], self._feeds(batch)
        run(feeds)  # first run of a shape allocates
        counts = [0] * runners
        started = time.perf_counter()
        deadline = started + seconds

        def runner(index: int) -> None:
            while counts[index] < min_runs * batch or time.perf_counter() < deadline:
                run(feeds)
                counts[index] += batch

        threads = [threading.Thread(target=runner, args=(i,)) for i in range(runners)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sum(counts), time.perf_counter() - started

    def batch1_p50_ms(self, seconds: float) -> float:
        """The median batch-1 latency now, on the all-cores session (at least 10 runs)."""
        return float(np.percentile(self._latencies(seconds, min_runs=10), 50)) * 1e3

    def _latencies(self, seconds: float, min_runs: int) -> list[float]:
        run, feeds = self.sessions[1], self._feeds(1)
        run(feeds)
        times, deadline = [], time.perf_counter() + seconds
        while len(times) < min_runs or time.perf_counter() < deadline:
            started = time.perf_counter()
            run(feeds)
            times.append(time.perf_counter() - started)
        return times

    def stop(self) -> None:
        self.sessions = {}


class RawOpenVino(RawOrt):
    """OpenVINO in this process, as the service runs it (`service.runtimes.openvino`, precision auto: bf16 where the
    CPU has it): the limit of `vitserve+runtime=openvino`. Same sweep and layouts as raw onnxruntime; the runners of the
    one-thread layout each get their own stream."""

    kind = "raw-openvino"
    runtime = "openvino"

    def _open(self, path: Path, threads: int, runners: int):
        from service.runtimes.openvino import OpenVinoSession, resolve_precision

        session = OpenVinoSession(path, threads=threads, streams=runners, precision=resolve_precision("auto"))
        self.precision = session.precision
        return session.run


AGREEMENT_IMAGES = 64


def top1_agreement(model: BuiltModel, run) -> float:
    """Top-1 agreement of `run` with onnxruntime fp32 on AGREEMENT_IMAGES photo-like images other than the requests'
    (the fp32 logits are computed once per model and cached beside its repository)."""
    pixels = preprocess(make_jpegs(AGREEMENT_IMAGES, seed=1), model.entry)
    reference = model.repo.parent / "fp32-top1.npy"
    if not reference.is_file():
        fp32 = service_session(model.onnx_path("fp32"))
        np.save(reference, _top1(lambda feeds: fp32.run(None, feeds), pixels))
    return float((_top1(run, pixels) == np.load(reference)).mean())


def _top1(run, pixels: np.ndarray) -> np.ndarray:
    tops = []
    for start in range(0, len(pixels), 8):
        outputs = run({IMAGES: pixels[start:start + 8]})
        logits = outputs[LOGITS] if isinstance(outputs, dict) else outputs[0]
        tops.append(np.asarray(logits).argmax(-1))
    return np.concatenate(tops)


def _decode_cpu_ms(jpegs: list[bytes], entry, seconds: float) -> float:
    """CPU time of the service's decode + resize per image, on one thread."""
    count, started, deadline = 0, time.thread_time(), time.perf_counter() + seconds
    while count < len(jpegs) or time.perf_counter() < deadline:
        preprocess([jpegs[count % len(jpegs)]], entry)
        count += 1
    return (time.thread_time() - started) / count * 1e3


class Server:
    """A server process of ours or someone else's, started in its own session so that it and its children stop
    together. `argv` ends with `--port`; the port is appended at start. `requests` are replayed in turn."""

    def __init__(self, kind: str, variant: str, argv: list[str], env: dict[str, str], ready_path: str,
                 requests: list[HttpRequest], log: Path) -> None:
        self.kind, self.variant, self.argv, self.env = kind, variant, argv, env
        self.ready_path, self.log, self.requests = ready_path, log, requests
        self.process: subprocess.Popen | None = None
        self.info: dict = {}

    def start(self) -> None:
        """Launch the process (returns at once: `wait_ready` waits, so several servers can start together)."""
        self.port = _free_port()
        environment = {k: v for k, v in os.environ.items() if not k.startswith("VITSERVE_")}
        environment.update({"PYTHONPATH": str(ROOT), **self.env})
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen([*self.argv, str(self.port)], env=environment, cwd=environment["PYTHONPATH"], stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.started_at = time.perf_counter()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.kind} ({self.variant}) exited with {self.process.returncode}:\n{self._log_tail()}")
            if _get_status(self.port, self.ready_path) == 200:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"{self.kind} ({self.variant}) not ready after {START_TIMEOUT_S:.0f} s:\n{self._log_tail()}")
        self.info["start_s"] = time.perf_counter() - self.started_at
        status, body = request_once(HOST, self.port, self.requests[0])
        if status != 200:
            raise RuntimeError(f"{self.kind} ({self.variant}) answered {status} to a real request: {body[:300]!r}")
        self.info["example_response"] = json.loads(body)

    def run(self, generator: LoadGenerator, concurrency: int, duration_s: float, warmup_s: float) -> dict:
        result = generator.run(HOST, self.port, self.requests, concurrency, duration_s, warmup_s).summary()
        result["images_per_s"] = result.pop("requests_per_s")  # one image per request
        return result

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(self.process.pid, signal.SIGKILL)  # what is left of its session: LitServe's workers, say
        self.process.wait()

    def _log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _get_status(port: int, path: str) -> int | None:
    connection = http.client.HTTPConnection(HOST, port, timeout=2)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    except OSError:
        return None
    finally:
        connection.close()
