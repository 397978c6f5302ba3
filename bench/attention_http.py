"""Does plain /classify get slower because a classifier has attention maps? The real server, over HTTP.

    python bench/attention_http.py --repo models [--model demo-classifier] [--rounds 300] [--image PATH]

Starts one vit-serve process on a repository holding the classifier twice: as exported (with its attention graph),
and as `<model>-legacy`, the same files as exported before attention maps existed (no attention graph, no metadata
section). One process, so that the comparison does not measure two processes' luck with the cores (two identical
servers differed by up to 15% in median latency here). Then sends one request at a time, interleaved in rotating
order, so drift in machine load hits all alike:

- plain:          /classify on the classifier with attention maps;
- plain-legacy:   /classify on the legacy copy (the baseline);
- with-map:       /classify?attention=true on the classifier with them (what asking costs).

Prints each contender's median latency and the median of its per-round ratios against plain-legacy.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_legacy_copy(repo: Path, model: str, folder: Path) -> tuple[Path, str]:
    """A repository with the model, and `<model>-legacy`: its files without the attention graph and metadata section."""
    target, legacy = folder / "repo", f"{model}-legacy"
    shutil.copytree(repo / model, target / model)
    shutil.copytree(repo / model, target / legacy)
    for version in (p for p in (target / legacy).iterdir() if p.is_dir() and p.name.isdigit()):
        metadata = version / "vitserve.json"
        data = json.loads(metadata.read_text())
        if data.get("attention"):
            (version / data["attention"]["file"]).unlink(missing_ok=True)
        data.pop("attention", None)
        data["name"] = legacy
        metadata.write_text(json.dumps(data))
    return target, legacy


def start(repo: Path, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    vit_serve = str(Path(sys.executable).with_name("vit-serve"))
    env = {**os.environ, "VITSERVE_INTRA_OP_THREADS": str(threads), "VITSERVE_INSTANCES": "1", "VITSERVE_MAX_BATCH_SIZE": "1",
           "VITSERVE_LOG_LEVEL": "warning"}
    process = subprocess.Popen([vit_serve, "--repo", str(repo), "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.terminate()
    raise SystemExit(f"vit-serve on {repo} did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--model", default="demo-classifier")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads per server")
    parser.add_argument("--image", type=Path, help="the image to classify (default: matplotlib's grace_hopper.jpg)")
    args = parser.parse_args()
    if args.image:
        image = args.image.read_bytes()
    else:
        from matplotlib.cbook import get_sample_data
        with get_sample_data("grace_hopper.jpg") as file:
            image = file.read()

    folder = Path(tempfile.mkdtemp(prefix="attention-http-"))
    repo, legacy = with_legacy_copy(args.repo, args.model, folder)
    process, url = start(repo, args.threads)
    contenders = {
        "plain": {"model": args.model},
        "plain-legacy": {"model": legacy},
        "with-map": {"model": args.model, "attention": "true"},
    }
    try:
        with httpx.Client(timeout=30) as client:
            def send(params: dict) -> float:
                started = time.perf_counter()
                answer = client.post(f"{url}/classify", files={"file": ("image.jpg", image, "image/jpeg")}, params=params)
                elapsed = time.perf_counter() - started
                answer.raise_for_status()
                return elapsed

            for params in contenders.values():  # warm-up, and the attention graph opened
                for _ in range(5):
                    send(params)
            times: dict[str, list[float]] = {name: [] for name in contenders}
            names = list(contenders)
            for round_index in range(args.rounds):
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    times[name].append(send(contenders[name]))
    finally:
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{args.model} from {args.repo} (and {legacy}), {args.rounds} rounds, one request at a time, {args.threads} onnxruntime thread(s)")
    print(f"{'contender':14} {'median ms':>10} {'ratio vs plain-legacy (median of rounds)':>42}")
    for name in names:
        ratios = [t / b for t, b in zip(times[name], times["plain-legacy"])]
        print(f"{name:14} {statistics.median(times[name]) * 1000:10.2f} {statistics.median(ratios):42.3f}")


if __name__ == "__main__":
    main()
