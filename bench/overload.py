"""Overload and soak: the real `vit-serve` process under its normal load, then under an overload, in rounds.

One round at the baseline concurrency (c=16 by default), then `--rounds` rounds at the overload concurrency, each
`--duration` seconds, the same closed-loop load generator as `python -m bench` (one 320x240 JPEG per request to
/classify, a random-weight classifier). Per round it prints what happened to every request (admitted = answered 200,
refused = 503, 504 = admitted but past its deadline), the latency of the admitted and of the refused, goodput
(images answered 200 per second) against the baseline round's, and the server's resident memory at the end of the
round and its peak during it. The targets it checks under overload: no 504, refusals answered in under 20 ms at p99,
goodput at least 0.95 of the baseline's.

    python -m bench.overload --model vit-tiny --overload 256 --duration 60 --rounds 3
    python -m bench.overload --model vit-base --overload 64 --setting timeout_ms=2000
    python -m bench.overload --source /path/to/other/checkout      # the same run on another version of the service
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from .contenders import make_contender
from .loadgen import LoadGenerator, LoadResult
from .workload import build_model, cores, make_jpegs

REFUSAL_P99_TARGET_MS = 20.0
GOODPUT_TARGET = 0.95


@dataclass
class Round:
    name: str
    concurrency: int
    seconds: float
    admitted: int  # answered 200
    refused: int  # answered 503
    deadline_exceeded: int  # answered 504
    other: dict  # any other status or connection error -> count
    admitted_p50_ms: float | None
    admitted_p99_ms: float | None
    refused_p50_ms: float | None
    refused_p99_ms: float | None
    goodput: float  # images answered 200 per second
    goodput_ratio: float | None  # of the baseline round's
    rss_end_mb: float
    rss_peak_mb: float
    client_cpu_cores: float  # what the load generator itself used: its share of the machine
    load_average: tuple[float, float, float]
    collector_passes: list[int] | None = None  # the server's garbage-collector passes in the round, by generation


def percentile_ms(seconds: list[float], q: float) -> float | None:
    if not seconds:
        return None
    if len(seconds) == 1:
        return seconds[0] * 1e3
    return statistics.quantiles(seconds, n=1000, method="inclusive")[round(q * 1000) - 1] * 1e3


class RssSampler:
    """The server process's resident memory (VmRSS), sampled in a thread: the latest value and the peak since reset."""

    def __init__(self, pid: int, every_s: float = 0.25) -> None:
        self.pid, self.every_s = pid, every_s
        self.peak_mb = self.latest_mb = self.read_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def read_mb(self) -> float:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS for process {self.pid}")

    def reset_peak(self) -> None:
        self.peak_mb = self.read_mb()

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.latest_mb = self.read_mb()
            except (OSError, RuntimeError):  # the process ended
                return
            self.peak_mb = max(self.peak_mb, self.latest_mb)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


_COLLECTIONS = re.compile(r'^python_gc_collections_total\{generation="(\d)"\} (\S+)$', re.MULTILINE)


def collector_passes(metrics_text: str) -> list[int] | None:
    """The garbage collector's passes so far, by generation, from a /metrics page (None where it has none: another
    server, or a version of ours before these series). Each pass stops the server's event loop."""
    found = {int(generation): int(float(value)) for generation, value in _COLLECTIONS.findall(metrics_text)}
    return [found[g] for g in sorted(found)] or None


def scrape_collector_passes(port: int) -> list[int] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            return collector_passes(answer.read().decode())
    except OSError:
        return None


def summarise(name: str, result: LoadResult, rss: RssSampler, baseline: float | None,
              collector_passes: list[int] | None) -> Round:
    refused = result.error_latencies_s.get("503", [])
    other = {key: count for key, count in result.errors.items() if key not in ("503", "504")}
    goodput = result.per_second
    return Round(name, result.concurrency, result.duration_s, result.completed, len(refused), result.errors.get("504", 0),
                 other, percentile_ms(result.latencies_s, 0.5), percentile_ms(result.latencies_s, 0.99),
                 percentile_ms(refused, 0.5), percentile_ms(refused, 0.99), goodput,
                 goodput / baseline if baseline else None, rss.read_mb(), rss.peak_mb,
                 result.client_cpu_s / result.duration_s, os.getloadavg(), collector_passes)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def print_table(rounds: list[Round]) -> None:
    print("| round | c | admitted (200) | refused (503) | 504 | other | admitted p50 / p99 ms | refused p50 / p99 ms "
          "| goodput img/s | vs baseline | RSS end / peak MB | collector passes (gen 0/1/2) | client CPU | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rounds:
        other = ", ".join(f"{k}: {v}" for k, v in r.other.items()) or "0"
        ratio = "-" if r.goodput_ratio is None else f"{r.goodput_ratio:.2f}"
        passes = "-" if r.collector_passes is None else "/".join(map(str, r.collector_passes))
        print(f"| {r.name} | {r.concurrency} | {r.admitted} | {r.refused} | {r.deadline_exceeded} | {other} "
              f"| {_ms(r.admitted_p50_ms)} / {_ms(r.admitted_p99_ms)} | {_ms(r.refused_p50_ms)} / {_ms(r.refused_p99_ms)} "
              f"| {r.goodput:.1f} | {ratio} | {r.rss_end_mb:.0f} / {r.rss_peak_mb:.0f} | {passes} "
              f"| {r.client_cpu_cores:.2f} | {r.load_average[0]:.2f} |")


def verdicts(rounds: list[Round]) -> list[str]:
    """The targets, checked on the overload rounds: one line each, PASS or FAIL."""
    overload = rounds[1:]
    lines = []
    late = sum(r.deadline_exceeded for r in overload)
    lines.append(f"{'PASS' if late == 0 else 'FAIL'}: admitted requests answered 504 under overload: {late}")
    worst = max((r.refused_p99_ms for r in overload if r.refused_p99_ms is not None), default=None)
    lines.append(f"{'PASS' if worst is None or worst < REFUSAL_P99_TARGET_MS else 'FAIL'}: worst refusal p99 "
                 f"{_ms(worst)} ms (target < {REFUSAL_P99_TARGET_MS:.0f} ms)")
    ratios = [r.goodput_ratio for r in overload if r.goodput_ratio is not None]
    lowest = min(ratios, default=0.0)
    lines.append(f"{'PASS' if lowest >= GOODPUT_TARGET else 'FAIL'}: lowest goodput under overload {lowest:.2f} of the "
                 f"baseline's (target >= {GOODPUT_TARGET})")
    if len(overload) >= 2:
        first, last = overload[0].rss_end_mb, overload[-1].rss_end_mb
        lines.append(f"{'PASS' if last <= first * 1.10 else 'FAIL'}: RSS after the last overload round {last:.0f} MB, "
                     f"{(last / first - 1) * 100:+.1f}% of the first's {first:.0f} MB (target within 10%)")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", default="vit-tiny", help="ViT preset, random weights, 1000 classes")
    parser.add_argument("--variant", default="fp32", choices=["fp32", "int8"])
    parser.add_argument("--baseline", type=int, default=16, help="concurrency of the baseline round")
    parser.add_argument("--overload", type=int, default=256, help="concurrency of the overload rounds")
    parser.add_argument("--rounds", type=int, default=3, help="overload rounds")
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds per round")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each round")
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                        help="a server setting (VITSERVE_<NAME>, lower case), e.g. --setting timeout_ms=2000; repeatable")
    parser.add_argument("--source", type=Path, default=None, help="serve the code of another checkout of this repository")
    parser.add_argument("--honour-retry-after", action="store_true",
                        help="a refused client waits the Retry-After it was given (default: it asks again at once, as wrk does)")
    parser.add_argument("--cache", type=Path, default=Path("bench/results/cache"), help="exported models")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="where the JSON and the server log go")
    parser.add_argument("--client-processes", type=int, default=None, help="load generator processes (default: cores)")
    parser.add_argument("--jpegs", type=int, default=16, help="distinct request images")
    return parser.parse_args(argv)


def server_kind(args: argparse.Namespace) -> str:
    settings = list(args.setting) + ([f"source={args.source}"] if args.source else [])
    return "+".join(["vitserve", *settings])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally` that stops the server
    args.out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.model, args.cache)
    jpegs = make_jpegs(args.jpegs)
    server = make_contender(server_kind(args), model, args.variant, jpegs, args.out / "logs")
    print(f"{args.model} {args.variant}, server {server_kind(args)}, rounds of {args.duration:g} s, "
          f"load average {os.getloadavg()[0]:.2f}, {cores()} cores", flush=True)
    server.start()
    rounds: list[Round] = []
    try:
        server.wait_ready()
        rss = RssSampler(server.process.pid)
        with LoadGenerator(args.client_processes or cores()) as generator:
            plan = [("baseline", args.baseline)] + [(f"overload {i + 1}", args.overload) for i in range(args.rounds)]
            for name, concurrency in plan:
                rss.reset_peak()
                passes_before = scrape_collector_passes(server.port)
                result = generator.run("127.0.0.1", server.port, server.requests, concurrency, args.duration, args.warmup,
                                       honour_retry_after=args.honour_retry_after)
                passes_after = scrape_collector_passes(server.port)  # the round with its warm-up
                passes = ([a - b for a, b in zip(passes_after, passes_before)]
                          if passes_before and passes_after else None)
                rounds.append(summarise(name, result, rss, rounds[0].goodput if rounds else None, passes))
                print(f"{name}: c={concurrency} admitted {rounds[-1].admitted}, refused {rounds[-1].refused}, "
                      f"504 {rounds[-1].deadline_exceeded}, RSS {rounds[-1].rss_end_mb:.0f} MB", flush=True)
        rss.stop()
    finally:
        server.stop()
    print()
    print_table(rounds)
    print()
    for line in verdicts(rounds):
        print(line)
    path = args.out / f"overload-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "server": server.info,
                                "rounds": [asdict(r) for r in rounds]}, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
