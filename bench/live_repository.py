"""The live model repository, measured on the real server process:

    python -m bench.live_repository [--swap-preset vit-tiny] [--memory-preset vit-small] [--cycles 20] [--poll 1]

1. Swap: vit-serve in poll mode serves version 1 of a random-weight classifier (224x224) to a stream of clients (one
   320x240 JPEG per request); a complete version 2 is renamed into the repository, as vit-export does. Prints the
   time from the rename to the first answer from version 2 (poll wait + load: sessions, batch-size timing, warm-up),
   the load time the server measured, and every answer's status (a swap must fail none).
2. Memory: vit-serve in explicit mode; the model is unloaded and loaded again through the repository API `--cycles`
   times. Prints the server's RSS after each load and unload, against the size of the model's graph: unloading must
   give the memory back, so RSS must not grow by more than one model over the cycles.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.serving_harness import Server

from .workload import build_model, make_jpegs


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def metric(url: str, name: str, model: str) -> float | None:
    match = re.search(rf'^{name}\{{model="{model}"\}} (\S+)$', httpx.get(f"{url}/metrics").text, re.MULTILINE)
    return float(match.group(1)) if match else None


def swap(preset: str, cache: Path, poll_s: float, clients: int) -> None:
    built = build_model(preset, cache)
    with tempfile.TemporaryDirectory(prefix="live-swap-") as tmp:
        repo = Path(tmp) / "repo"
        shutil.copytree(built.version_dir, repo / "model" / "1")
        server = Server(repo, model_control="poll", repository_poll_s=str(poll_s))
        answers: list[tuple[float, int, int | None]] = []
        stop = threading.Event()
        jpeg = make_jpegs(1)[0]

        def client() -> None:
            with httpx.Client(base_url=server.url, timeout=60) as http:
                while not stop.is_set():
                    response = http.post("/classify", files=[("file", ("a.jpg", jpeg, "image/jpeg"))])
                    version = response.json().get("version") if response.status_code == 200 else None
                    answers.append((time.monotonic(), response.status_code, version))

        threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        try:
            for thread in threads:
                thread.start()
            time.sleep(3)
            staging = repo / ".staging-v2"
            shutil.copytree(built.version_dir, staging)
            renamed_at = time.monotonic()
            os.rename(staging, repo / "model" / "2")
            while not any(v == 2 for _, _, v in list(answers)) and time.monotonic() - renamed_at < 120:
                time.sleep(0.01)
            first_v2 = min(t for t, _, v in answers if v == 2)
            time.sleep(3)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
            load_s = metric(server.url, "vitserve_model_load_seconds_sum", "model")
            server.stop()
        statuses = Counter(status for _, status, _ in answers)
        print(f"swap, {preset} 224x224, poll every {poll_s:g} s, {clients} clients streaming:")
        print(f"  rename -> first answer from version 2: {first_v2 - renamed_at:.2f} s "
              f"(the server's load times, both versions: {load_s:.2f} s in all)")
        print(f"  answers: {sum(statuses.values())}, by status: {dict(statuses)}, "
              f"by version: {dict(Counter(v for _, _, v in answers))}")


def memory(preset: str, cache: Path, cycles: int) -> None:
    built = build_model(preset, cache)
    model_mib = built.onnx_path("fp32").stat().st_size / 2**20
    with tempfile.TemporaryDirectory(prefix="live-memory-") as tmp:
        repo = Path(tmp) / "repo"
        shutil.copytree(built.version_dir, repo / "model" / "1")
        server = Server(repo, model_control="explicit")
        loaded, unloaded = [], []
        try:
            with httpx.Client(base_url=server.url, timeout=300) as http:
                http.post("/classify", files=[("file", ("a.jpg", make_jpegs(1)[0], "image/jpeg"))]).raise_for_status()
                loaded.append(rss_mib(server.process.pid))
                for _ in range(cycles):
                    http.post("/v2/repository/models/model/unload").raise_for_status()
                    unloaded.append(rss_mib(server.process.pid))
                    http.post("/v2/repository/models/model/load").raise_for_status()
                    loaded.append(rss_mib(server.process.pid))
        finally:
            server.stop()
        print(f"memory, {preset} 224x224 (graph {model_mib:.0f} MiB; fp32 weights held twice with the solo session), "
              f"{cycles} unload/load cycles:")
        print(f"  RSS loaded:   first {loaded[0]:.0f} MiB, last {loaded[-1]:.0f} MiB, max {max(loaded):.0f} MiB, "
              f"median {statistics.median(loaded):.0f} MiB")
        print(f"  RSS unloaded: first {unloaded[0]:.0f} MiB, last {unloaded[-1]:.0f} MiB, max {max(unloaded):.0f} MiB")
        growth = loaded[-1] - loaded[0]
        print(f"  growth over the cycles: {growth:+.0f} MiB loaded, {unloaded[-1] - unloaded[0]:+.0f} MiB unloaded "
              f"({growth / model_mib:+.2f} graphs; must stay under 1)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.live_repository", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swap-preset", default="vit-tiny")
    parser.add_argument("--memory-preset", default="vit-small")
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between repository scans")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--cache", type=Path, default=Path("bench/results/cache"))
    parser.add_argument("--only", choices=["swap", "memory"])
    args = parser.parse_args(argv)
    if args.only != "memory":
        swap(args.swap_preset, args.cache, args.poll, args.clients)
    if args.only != "swap":
        memory(args.memory_preset, args.cache, args.cycles)


if __name__ == "__main__":
    main()
