"""Serving benchmark: vit-serve (its REST API, and the Open Inference Protocol) against raw onnxruntime, itself
without batching, a naive FastAPI + PyTorch server and LitServe, all on the same exported model, side by side in one run.

    python -m bench --models vit-tiny,vit-base --variants fp32,int8 --concurrency 1,4,16,32,64 \\
                    --duration 5 --rounds 3 --contenders raw,vitserve,vitserve-nobatch,naive,litserve --out bench/results
    python -m bench --smoke --out /tmp/bench-smoke      # everything, briefly, on a tiny model

For each model every contender (and variant) is started once. Then, per concurrency, R rounds: in each round every
contender runs once for D seconds, in an order that reverses from round to round (A B C / C B A), so drifting machine
load hits all alike. Figures are medians over rounds; ratios are medians of per-round ratios. Writes
<out>/<timestamp>.json and .png and prints a summary."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import socket
import sys
import time
from importlib import metadata as package_metadata
from pathlib import Path

from . import report
from .contenders import KINDS, LITSERVE_BATCH_TIMEOUT_S, Unavailable, is_raw, make_contender, parse_kind
from .loadgen import LoadGenerator, multipart_image, start_trivial_server
from .workload import build_model, cores, cuda_available, make_jpegs

SMOKE = dict(models="vit-test", variants="fp32,int8", concurrency="1,16,32", duration=0.25, warmup=0.05, rounds=1, min_images=0,
             sweep=0.02, jpegs=4)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--models", default="vit-tiny,vit-base", help="ViT presets, random weights, 1000 classes")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: the GPU variant (onnxruntime-gpu; CUDA provider for raw ORT, vit-serve and LitServe, "
                             "PyTorch on the GPU for the naive server); defaults become --variants fp32,fp16 --raw-max-batch 64")
    parser.add_argument("--variants", default=None, help="graph variants: fp32, int8 (dynamic), int8-static, fp16 (default: "
                        "fp32,int8; on cuda fp32,fp16)")
    parser.add_argument("--concurrency", default="1,4,16,32,64", help="requests kept in flight")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run (at least)")
    parser.add_argument("--min-images", type=int, default=100,
                        help="lengthen a model's runs to about this many images at its slowest raw-ORT rate: a batching "
                             "server completes images in bursts, and a count over few bursts is coarse")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each run")
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds per (model, concurrency)")
    parser.add_argument("--contenders", default=",".join(KINDS),
                        help=f"any of {','.join(KINDS)}; a vitserve contender may carry settings to compare: "
                             "vitserve+max_batch_size=16+decode_threads=1 (VITSERVE_* names, lower case)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="results directory")
    parser.add_argument("--cache", type=Path, default=None, help="exported models (default: OUT/cache)")
    parser.add_argument("--client-processes", type=int, default=None, help="load generator processes (default: cores)")
    parser.add_argument("--raw-max-batch", type=int, default=None, help="largest batch the raw-ORT sweep tries (default: 32; cuda 64)")
    parser.add_argument("--sweep", type=float, default=0.5, help="seconds per batch size in the raw-ORT sweep")
    parser.add_argument("--litserve-batch-timeout", type=float, default=LITSERVE_BATCH_TIMEOUT_S)
    parser.add_argument("--jpegs", type=int, default=16, help="distinct request images")
    parser.add_argument("--smoke", action="store_true", help=f"a quick check of the machinery: {SMOKE}")
    args = parser.parse_args(argv)
    if args.smoke:  # the smoke values become the defaults: options given explicitly still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    if args.device == "cuda" and not cuda_available():
        parser.exit(2, "--device cuda: this onnxruntime has no CUDA provider (install onnxruntime-gpu on a machine with a GPU)\n")
    args.variants = args.variants or ("fp32,fp16" if args.device == "cuda" else "fp32,int8")
    args.raw_max_batch = args.raw_max_batch or (64 if args.device == "cuda" else 32)
    args.models, args.variants, args.contenders = (_names(v) for v in (args.models, args.variants, args.contenders))
    args.concurrency = [int(c) for c in _names(args.concurrency)]
    for kind in args.contenders:
        try:
            parse_kind(kind)
        except ValueError as error:
            parser.error(str(error))
    args.cache = args.cache or args.out / "cache"
    args.client_processes = args.client_processes or cores()
    return args


def _names(text: str) -> list[str]:
    return [item.strip() for item in str(text).split(",") if item.strip()]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally`s that stop the servers
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    jpegs = make_jpegs(args.jpegs)
    results = {"meta": _meta(args), "generator": {}, "samples": [], "raw": [], "servers": [], "skipped": {}}
    paths = args.out / f"{stamp}.json", args.out / f"{stamp}.png"
    with LoadGenerator(args.client_processes) as generator:
        results["generator"] = measure_ceiling(generator, jpegs, max(args.concurrency), args.duration, args.warmup)
        print(f"load generator ceiling (trivial endpoint, c={max(args.concurrency)}): "
              f"{results['generator']['ceiling']['requests_per_s']:.0f} req/s", flush=True)
        for model_name in args.models:
            model = build_model(model_name, args.cache, fp16="fp16" in args.variants)
            contenders = start_contenders(args, model, jpegs, results)
            try:
                results["samples"] += run_rounds(args, model_name, contenders, generator)
            finally:
                for contender in contenders:
                    contender.stop()
            write_results(results, args, *paths)  # after every model: a long run that fails later keeps its figures
    report.print_summary(results)
    print(f"\nwrote {paths[0]} and {paths[1]}")
    return 0


def write_results(results: dict, args: argparse.Namespace, json_path: Path, png_path: Path) -> None:
    results["meta"]["loadavg_end"] = _loadavg()
    results["summary"] = report.summarise(results["samples"])
    results["ratios"] = report.ratios(results["samples"], args.models, args.variants)
    results["physical_limits"] = report.physical_limits(results["samples"], results["raw"], cores())
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    report.plot(results, png_path)


def measure_ceiling(generator: LoadGenerator, jpegs: list[bytes], concurrency: int, duration: float, warmup: float) -> dict:
    """The generator against a server that does nothing: how many requests/s it can drive, at what CPU cost."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = start_trivial_server(port)
    try:
        requests = [multipart_image("/classify", jpeg) for jpeg in jpegs]
        result = generator.run("127.0.0.1", port, requests, concurrency, duration, warmup).summary()
    finally:
        server.terminate()
        server.join()
    return {"processes": generator.processes, "ceiling": {"concurrency": concurrency, "duration_s": duration, **result}}


def start_contenders(args: argparse.Namespace, model, jpegs: list[bytes], results: dict) -> list:
    """Create and start every contender of one model (servers start in parallel); the unavailable are skipped."""
    contenders = []
    for kind in args.contenders:
        for variant in args.variants:
            try:
                contenders.append(make_contender(kind, model, variant, jpegs, args.out / "logs", raw_max_batch=args.raw_max_batch, device=args.device,
                                                 sweep_s=args.sweep, litserve_batch_timeout_s=args.litserve_batch_timeout))
            except Unavailable as reason:
                skipped = f"{kind}/{variant}" if reason.variant_only else kind
                if skipped not in results["skipped"]:
                    print(f"skipping {skipped}: {reason}", flush=True)
                results["skipped"][skipped] = str(reason)
                if not reason.variant_only:
                    break
                continue
    servers = [c for c in contenders if not is_raw(c.kind)]
    started = []
    try:
        for server in servers:  # launch them all, then wait: start-ups overlap
            server.start()
        for contender in servers + [c for c in contenders if is_raw(c.kind)]:  # raw's batch sweep once the servers idle
            try:
                if is_raw(contender.kind):
                    contender.start()
                contender.wait_ready()
                started.append(contender)
            except RuntimeError as error:
                print(f"skipping {contender.kind}/{contender.variant}: {error}", flush=True)
                results["skipped"][f"{contender.kind}/{contender.variant}"] = str(error)
                contender.stop()
    except BaseException:  # interrupted while starting: leave no server behind
        for contender in contenders:
            contender.stop()
        raise
    for contender in started:
        entry = {"model": model.preset, "variant": contender.variant, "contender": contender.kind, **contender.info}
        results["raw" if is_raw(contender.kind) else "servers"].append(entry)
    # the rounds run the contenders in the order asked for
    return sorted(started, key=lambda c: (args.contenders.index(c.kind), args.variants.index(c.variant)))


def run_duration(args: argparse.Namespace, contenders: list) -> float:
    """--duration, or longer for a slow model: long enough for --min-images at the slowest variant's raw-ORT rate."""
    rates = [max(c.info["sweep_images_per_s"].values()) for c in contenders if is_raw(c.kind)]
    return max(args.duration, args.min_images / min(rates)) if rates and args.min_images else args.duration


def run_rounds(args: argparse.Namespace, model_name: str, contenders: list, generator: LoadGenerator) -> list[dict]:
    samples = []
    duration = run_duration(args, contenders)
    if duration > args.duration:
        print(f"{model_name}: runs of {duration:.1f} s (about {args.min_images} images at the raw-ORT rate)", flush=True)
    raws = {(c.kind, c.variant): c for c in contenders if is_raw(c.kind)}
    for concurrency in args.concurrency:
        for round_index in range(args.rounds):
            order = contenders if round_index % 2 == 0 else contenders[::-1]
            for position, contender in enumerate(order):
                raw = raws.get((report.raw_of(contender.kind), contender.variant))
                if concurrency == 1 and raw is not None and not is_raw(contender.kind):
                    result = bracketed_by_raw_latency(contender, raw, generator, duration, args.warmup)
                else:
                    result = contender.run(generator, concurrency, duration, args.warmup)
                samples.append({"model": model_name, "variant": contender.variant, "contender": contender.kind,
                                "concurrency": concurrency, "round": round_index, "position": position,
                                "duration_s": duration, **result})
                errors = f", errors {result['errors']}" if result["errors"] else ""
                print(f"[{model_name} c={concurrency} round {round_index + 1}/{args.rounds}] "
                      f"{contender.kind}/{contender.variant}: {result['images_per_s']:.1f} img/s, "
                      f"p50 {report.fmt(result.get('p50_ms'), 2)} ms, "
                      f"p99 {report.fmt(result.get('p99_ms'), 2)} ms{errors}", flush=True)
    return samples


def bracketed_by_raw_latency(server, raw, generator: LoadGenerator, duration: float, warmup: float) -> dict:
    """A c=1 run of `server` between two short batch-1 latency runs of its raw runtime on the same graph: their mean
    is what its lone-request excess is measured against. A runtime's batch-1 latency can change state for minutes
    (OpenVINO's ViT-Base here: about 32.5 or 28.5 ms), so the raw run's own median, taken in its slot of the round,
    may not be from the state the server ran in."""
    before = raw.batch1_p50_ms(duration / 8)
    result = server.run(generator, 1, duration, warmup)
    after = raw.batch1_p50_ms(duration / 8)
    return {**result, report.BRACKETED_RAW_P50: (before + after) / 2}


def _meta(args: argparse.Namespace) -> dict:
    versions = {}
    for package in ("onnxruntime", "openvino", "torch", "fastapi", "uvicorn", "litserve", "numpy", "pillow"):
        try:
            versions[package] = package_metadata.version(package)
        except package_metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "bench", *sys.argv[1:]]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "host": platform.node(), "cpu": _cpu_model(), "cores": cores(), "python": platform.python_version(),
        "versions": versions, "loadavg_start": _loadavg(),
        "method": "closed-loop clients on keep-alive connections; per (model, concurrency) every contender runs once per "
                  "round, order reversed each round; medians over rounds; ratios are medians of per-round ratios",
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


if __name__ == "__main__":
    sys.exit(main())
