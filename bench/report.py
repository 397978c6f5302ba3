"""From paired samples to figures: medians per (model, variant, contender, concurrency), paired ratios (the median of
per-round ratios: both sides of a ratio ran in the same round, minutes apart at most), the physical limit, a printed
summary, and the plot."""
from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

Key = tuple[str, str, str, int]  # model, variant, contender, concurrency
# Below this many images per run, a count is coarse: a batching server completes images in bursts of up to its batch size.
FEW_IMAGES = 80
V2_CONTENDERS = ("v2", "v2-bytes")  # vit-serve over the Open Inference Protocol: pixels, encoded images
RAW = ("raw", "raw-openvino")


BRACKETED_RAW_P50 = "raw_batch1_p50_ms"  # in a server's c=1 sample: its raw runtime's batch-1 p50 just around it


def raw_of(contender: str) -> str:
    """The in-process limit a contender is measured against: raw OpenVINO for the service on OpenVINO, else raw ORT."""
    return "raw-openvino" if contender == "raw-openvino" or "runtime=openvino" in contender else "raw"


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(samples: list[dict]) -> list[dict]:
    """One row per (model, variant, contender, concurrency): medians over rounds."""
    groups: dict[Key, list[dict]] = defaultdict(list)
    for sample in samples:
        groups[(sample["model"], sample["variant"], sample["contender"], sample["concurrency"])].append(sample)
    rows = []
    for (model, variant, contender, concurrency), group in groups.items():
        errors: dict[str, int] = defaultdict(int)
        for sample in group:
            for key, count in sample.get("errors", {}).items():
                errors[key] += count
        rows.append({
            "model": model, "variant": variant, "contender": contender, "concurrency": concurrency, "rounds": len(group),
            "images_per_s": _median([s["images_per_s"] for s in group]),
            "images_per_s_range": [min(s["images_per_s"] for s in group), max(s["images_per_s"] for s in group)],
            "p50_ms": _median([s.get("p50_ms") for s in group]), "p99_ms": _median([s.get("p99_ms") for s in group]),
            "completed": min(s.get("completed", 0) for s in group), "errors": dict(errors),
            "client_cpu_cores": _median([s.get("client_cpu_cores") for s in group]),
        })
    return rows


def _by_round(samples: list[dict], model: str, variant: str, contender: str, concurrency: int) -> dict[int, dict]:
    return {s["round"]: s for s in samples if (s["model"], s["variant"], s["contender"], s["concurrency"])
            == (model, variant, contender, concurrency)}


def paired(samples: list[dict], name: str, model: str, concurrency: int, a: tuple[str, str], b: tuple[str, str],
           metric_a: str = "images_per_s", metric_b: str | None = None, difference: bool = False) -> dict | None:
    """a / b (or a - b) per round, for (contender, variant) pairs a and b; None when either was not measured.
    A difference of a server's p50 from its raw runtime's uses the raw batch-1 latency measured around the server's
    own run when there is one (`raw_batch1_p50_ms`, see bench.__main__.bracketed_by_raw_latency)."""
    left = _by_round(samples, model, a[1], a[0], concurrency)
    right = _by_round(samples, model, b[1], b[0], concurrency)
    values = []
    for round_index in sorted(set(left) & set(right)):
        x, y = left[round_index].get(metric_a), right[round_index].get(metric_b or metric_a)
        if difference and b[0] == raw_of(a[0]) and BRACKETED_RAW_P50 in left[round_index]:
            y = left[round_index][BRACKETED_RAW_P50]
        if x is None or y is None or (not difference and not y):
            continue
        values.append(x - y if difference else x / y)
    if not values:
        return None
    return {"name": name, "model": model, "concurrency": concurrency, "a": "/".join(a), "b": "/".join(b),
            "value": statistics.median(values), "per_round": values, "unit": "ms" if difference else "x"}


def ratios(samples: list[dict], models: list[str], variants: list[str]) -> list[dict]:
    """The ratios the issue asks for, each paired by round; those whose contenders or concurrency were not run are left out."""
    wanted = []
    for model in models:
        for variant in variants:
            vs = ("vitserve", variant)
            wanted += [
                paired(samples, "vitserve / raw ORT", model, 16, vs, ("raw", variant)),
                paired(samples, "p50(c=1) - raw batch-1 latency", model, 1, vs, ("raw", variant), "p50_ms", difference=True),
                paired(samples, "vitserve / vitserve-nobatch", model, 16, vs, ("vitserve-nobatch", variant)),
                paired(samples, "vitserve / LitServe", model, 16, vs, ("litserve", variant)),
                paired(samples, "vitserve / LitServe", model, 32, vs, ("litserve", variant)),
                paired(samples, "vitserve / naive", model, 32, vs, ("naive", variant)),
            ]
            for protocol in V2_CONTENDERS:  # the same server over V2: against the model's limit and against /classify
                v2 = (protocol, variant)
                wanted += [
                    paired(samples, f"{protocol} / raw ORT", model, 16, v2, ("raw", variant)),
                    paired(samples, f"{protocol} / vitserve", model, 16, v2, vs),
                    paired(samples, f"{protocol} p50(c=1) - raw batch-1", model, 1, v2, ("raw", variant), "p50_ms", difference=True),
                    paired(samples, f"{protocol} p50(c=1) / vitserve p50", model, 1, v2, vs, "p50_ms"),
                ]
        # settings experiments (vitserve+name=value): against their raw runtime and plain vitserve, same concurrency
        experiments = sorted({s["contender"] for s in samples if s["model"] == model and "+" in s["contender"]})
        for variant in variants:
            for experiment in experiments:
                raw = raw_of(experiment)
                for concurrency in sorted({s["concurrency"] for s in samples if s["contender"] == experiment}):
                    wanted += [
                        paired(samples, f"experiment / {raw}", model, concurrency, (experiment, variant), (raw, variant)),
                        paired(samples, "experiment / vitserve", model, concurrency, (experiment, variant), ("vitserve", variant)),
                    ]
                wanted.append(paired(samples, f"experiment p50(c=1) - {raw} batch-1", model, 1, (experiment, variant),
                                     (raw, variant), "p50_ms", difference=True))
        # runtimes and variants against the baseline everything is judged by: onnxruntime fp32, in-process
        for contender in sorted({s["contender"] for s in samples if s["model"] == model}):
            for variant in variants:
                if (contender, variant) != ("raw", "fp32"):
                    wanted.append(paired(samples, "x raw ORT fp32", model, 16, (contender, variant), ("raw", "fp32")))
        for faster in ("int8", "fp16"):
            if "fp32" in variants and faster in variants:
                for contender in ("vitserve", "raw", "litserve", "naive"):
                    wanted.append(paired(samples, f"{faster} / fp32", model, 16, (contender, faster), (contender, "fp32")))
    return [r for r in wanted if r is not None]


def _limit(inference_ms: float, decode_ms: float, cores: int, device: str) -> float:
    """Images/s of a machine that only decoded and inferred. CPU: both share the cores, so the CPU time per image
    (inference wall time x cores + decode) is shared over the cores. GPU: inference and decoding run side by side,
    so the slower of the two bounds it."""
    if device == "cuda":
        return min(1e3 / inference_ms, cores * 1e3 / decode_ms)
    return cores * 1e3 / (inference_ms * cores + decode_ms)


def physical_limits(samples: list[dict], raw_info: list[dict], cores: int) -> list[dict]:
    """The limit of a machine that only decoded and inferred (see `_limit`), and how close vitserve comes to it,
    paired by round."""
    rows = []
    for info in raw_info:
        if info.get("contender", "raw") != "raw":
            continue
        model, variant, device = info["model"], info["variant"], info.get("device", "cpu")
        raw = [s for s in samples if (s["model"], s["variant"], s["contender"]) == (model, variant, "raw")]
        if not raw:
            continue
        inference_ms = _median([s["inference_ms_per_image"] for s in raw])
        decode_ms = info["decode_cpu_ms_per_image"]
        inference_cpu_ms = inference_ms * cores if device == "cpu" else 0.0
        row = {"model": model, "variant": variant, "device": device, "cores": cores, "best_batch": info["best_batch"],
               "best_runners": info.get("best_runners", 1),
               "inference_ms_per_image": inference_ms, "inference_cpu_ms_per_image": inference_cpu_ms,
               "decode_cpu_ms_per_image": decode_ms, "cpu_ms_per_image": inference_cpu_ms + decode_ms,
               "limit_images_per_s": _limit(inference_ms, decode_ms, cores, device), "vitserve_fraction_of_limit": {}}
        for concurrency in sorted({s["concurrency"] for s in raw}):
            served = _by_round(samples, model, variant, "vitserve", concurrency)
            limits = _by_round(samples, model, variant, "raw", concurrency)
            fractions = [served[r]["images_per_s"] / _limit(limits[r]["inference_ms_per_image"], decode_ms, cores, device)
                         for r in sorted(set(served) & set(limits))]
            if fractions:
                row["vitserve_fraction_of_limit"][concurrency] = statistics.median(fractions)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ printing

def fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_summary(results: dict) -> None:
    print(f"\n{'model':<10} {'variant':<7} {'contender':<17} {'c':>3} {'img/s':>10} {'p50 ms':>9} {'p99 ms':>9} "
          f"{'rounds':>6} {'client cpu':>10}  errors")
    for row in results["summary"]:
        errors = ", ".join(f"{k}: {v}" for k, v in row["errors"].items()) or ""
        coarse = "*" if row["completed"] < FEW_IMAGES else " "
        print(f"{row['model']:<10} {row['variant']:<7} {row['contender']:<17} {row['concurrency']:>3} "
              f"{fmt(row['images_per_s']):>9}{coarse} {fmt(row['p50_ms'], 2):>9} {fmt(row['p99_ms'], 2):>9} "
              f"{row['rounds']:>6} {fmt(row['client_cpu_cores'], 2):>10}  {errors}")
    if any(row["completed"] < FEW_IMAGES for row in results["summary"]):
        print(f"* fewer than {FEW_IMAGES} images in a run: counted in bursts of up to a batch, so coarse; "
              f"use a longer --duration or --min-images")
    print("\nratios (median of per-round paired values):")
    for r in results["ratios"]:
        spread = ", ".join(fmt(v, 2) for v in r["per_round"])
        print(f"  {r['model']:<10} c={r['concurrency']:<3} {r['name']:<36} {r['a']:>18} vs {r['b']:<18} "
              f"{fmt(r['value'], 2):>7} {r['unit']}  [{spread}]")
    table = speed_and_agreement(results)
    if table:
        print("\nruntimes and variants (c=16 img/s and x raw ORT fp32, service / its raw runtime on the same graph, "
              "p50 at c=1 and its excess over that raw runtime's batch-1 latency, top-1 agreement with ORT fp32):")
        print(f"  {'model':<9} {'contender':<28} {'variant':<12} {'prec':<5} {'img/s':>7} {'x fp32':>7} {'/ raw':>6} "
              f"{'p50 c=1':>8} {'- raw':>6} {'agree':>6}")
        for row in table:
            print(f"  {row['model']:<9} {row['contender']:<28} {row['variant']:<12} {row['precision'] or '-':<5} "
                  f"{fmt(row['images_per_s_c16']):>7} {fmt(row['x_raw_ort_fp32'], 2):>7} {fmt(row['over_own_raw_c16'], 2):>6} "
                  f"{fmt(row['p50_c1_ms'], 2):>8} {fmt(row['p50_c1_minus_raw_batch1_ms'], 2):>6} "
                  f"{fmt(row['top1_agreement'], 3):>6}")
    breakdown = lone_request_breakdown(results["samples"])
    if breakdown:
        print("\nwhere a lone request's time goes (c=1, ms, medians over rounds of each run's medians; the server's parts "
              "from its Server-Timing header):")
        print(f"  {'model':<9} {'contender':<28} {'variant':<12} {'p50':>7} {'raw b1':>7} {'excess':>7} {'decode':>7} "
              f"{'queue':>6} {'infer':>7} {'-raw':>6} {'server':>7} {'outside':>7}")
        for row in breakdown:
            print(f"  {row['model']:<9} {row['contender']:<28} {row['variant']:<12} {fmt(row['p50_ms'], 2):>7} "
                  f"{fmt(row['raw_batch1_ms'], 2):>7} {fmt(row['excess_ms'], 2):>7} {fmt(row['decode_ms'], 2):>7} "
                  f"{fmt(row['queue_ms'], 2):>6} {fmt(row['inference_ms'], 2):>7} {fmt(row['inference_over_raw_ms'], 2):>6} "
                  f"{fmt(row['server_rest_ms'], 2):>7} {fmt(row['outside_server_ms'], 2):>7}")
        print("  excess = p50 - raw b1 (the raw runtime's batch-1 latency around the run) = decode + queue + (infer - raw) "
              "+ server (the rest of the server's total: HTTP, parsing, answer, thread hand-overs) + outside (p50 - the "
              "server's total: the client, the socket and what runs before the request's clock starts); medians, so "
              "the parts add up only about")
    print("\nphysical limit (CPU per image = inference at the best runners x batch, x cores + decode/resize; shared over the cores):")
    for row in results["physical_limits"]:
        fractions = ", ".join(f"c={c}: {f:.2f}" for c, f in row["vitserve_fraction_of_limit"].items())
        cost = (f"inference {row['inference_cpu_ms_per_image']:.2f} + decode {row['decode_cpu_ms_per_image']:.2f} CPU-ms/image"
                if row.get("device", "cpu") == "cpu" else
                f"GPU {row['inference_ms_per_image']:.2f} ms/image, decode {row['decode_cpu_ms_per_image']:.2f} CPU-ms/image")
        print(f"  {row['model']:<10} {row['variant']:<5} {row['best_runners']} runner(s) x batch {row['best_batch']:>2}: "
              f"{cost} -> {row['limit_images_per_s']:.1f} img/s on {row['cores']} cores; vitserve / limit: {fractions}")
    ceiling = results["generator"]["ceiling"]
    print(f"\nload generator: {results['generator']['processes']} processes; against a trivial endpoint at "
          f"c={ceiling['concurrency']}: {ceiling['requests_per_s']:.0f} req/s, {fmt(ceiling['client_cpu_us_per_request'])} "
          f"CPU-us per request")
    for kind, reason in results["skipped"].items():
        print(f"skipped {kind}: {reason}")


def speed_and_agreement(results: dict) -> list[dict]:
    """Per model, one row per (contender, variant): images/s at c=16 and its paired ratio to raw onnxruntime fp32,
    service / its own raw runtime on the same graph at c=16, p50 at c=1 and its paired excess over that raw runtime's
    batch-1 latency, and top-1 agreement with onnxruntime fp32 (measured by the raw runtime on the same graph)."""
    samples, rows = results["samples"], []
    agreement = {(e["model"], e["contender"], e["variant"]): e.get("top1_agreement_vs_ort_fp32") for e in results["raw"]}
    precision = {(e["model"], e["contender"], e["variant"]): e.get("precision") for e in results["raw"]}
    pairs = sorted({(s["model"], s["contender"], s["variant"]) for s in samples},
                   key=lambda k: (k[0], k[1] not in RAW, k[1], k[2]))
    summary = {(r["model"], r["contender"], r["variant"], r["concurrency"]): r for r in results["summary"]}
    for model, contender, variant in pairs:
        raw = raw_of(contender)

        def value(ratio):
            return ratio["value"] if ratio else None

        rows.append({
            "model": model, "contender": contender, "variant": variant, "precision": precision.get((model, raw, variant)),
            "images_per_s_c16": (summary.get((model, contender, variant, 16)) or {}).get("images_per_s"),
            "x_raw_ort_fp32": 1.0 if (contender, variant) == ("raw", "fp32") else
            value(paired(samples, "", model, 16, (contender, variant), ("raw", "fp32"))),
            "over_own_raw_c16": None if contender in RAW else value(paired(samples, "", model, 16, (contender, variant), (raw, variant))),
            "p50_c1_ms": (summary.get((model, contender, variant, 1)) or {}).get("p50_ms"),
            "p50_c1_minus_raw_batch1_ms": None if contender in RAW else
            value(paired(samples, "", model, 1, (contender, variant), (raw, variant), "p50_ms", difference=True)),
            "top1_agreement": agreement.get((model, raw, variant)),
        })
    return rows


def lone_request_breakdown(samples: list[dict]) -> list[dict]:
    """Per server (model, contender, variant) measured at c=1 with Server-Timing answers: its p50's excess over its raw
    runtime's batch-1 latency (measured around its run), split into the server's decode, queue wait, inference over
    raw, the rest of the server's time, and what lies outside the server's clock."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for sample in samples:
        if sample["concurrency"] == 1 and sample.get("server_timing_p50_ms"):
            groups[(sample["model"], sample["contender"], sample["variant"])].append(sample)
    rows = []
    for (model, contender, variant), group in sorted(groups.items()):
        def part(name: str) -> float | None:
            return _median([s["server_timing_p50_ms"].get(name) for s in group])

        p50, raw = _median([s.get("p50_ms") for s in group]), _median([s.get(BRACKETED_RAW_P50) for s in group])
        decode, queue, inference, total = part("decode"), part("queue"), part("inference"), part("total")
        rest = None if None in (decode, queue, inference, total) else total - decode - queue - inference
        rows.append({
            "model": model, "contender": contender, "variant": variant, "p50_ms": p50, "raw_batch1_ms": raw,
            "excess_ms": None if None in (p50, raw) else p50 - raw, "decode_ms": decode, "queue_ms": queue,
            "inference_ms": inference, "inference_over_raw_ms": None if None in (inference, raw) else inference - raw,
            "server_rest_ms": rest, "outside_server_ms": None if None in (p50, total) else p50 - total,
        })
    return rows


# ------------------------------------------------------------------------------------------------ plotting

def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    args = results["meta"]["args"]
    panels = [(m, v) for m in args["models"] for v in args["variants"]
              if any((r["model"], r["variant"]) == (m, v) for r in results["summary"])]
    if not panels:
        return
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    sparse = FuncFormatter(lambda value, _: f"{value:g}" if f"{value:e}"[0] in "25" else "")  # minor ticks: 2, 5, 20, 50...
    limits = {(r["model"], r["variant"]): r["limit_images_per_s"] for r in results["physical_limits"]}
    contenders = [c for c in args["contenders"] if any(r["contender"] == c for r in results["summary"])]
    colours = {name: f"C{i}" for i, name in enumerate(contenders)}
    figure, axes = plt.subplots(len(panels), 3, figsize=(15, 3.6 * len(panels)), squeeze=False)
    for row_axes, (model, variant) in zip(axes, panels):
        for contender in contenders:
            rows = sorted((r for r in results["summary"]
                           if (r["model"], r["variant"], r["contender"]) == (model, variant, contender)),
                          key=lambda r: r["concurrency"])
            if not rows:
                continue
            xs = [r["concurrency"] for r in rows]
            style = dict(color=colours[contender], marker="o", label=contender)
            if contender in RAW:
                style.update(linestyle="--", marker="s")
            row_axes[0].plot(xs, [r["images_per_s"] for r in rows], **style)
            row_axes[1].plot(xs, [r["p50_ms"] for r in rows], **style)
            row_axes[2].plot(xs, [r["p99_ms"] for r in rows], **style)
        if (model, variant) in limits:
            row_axes[0].axhline(limits[(model, variant)], color="black", linestyle=":", label="physical limit")
        concurrencies = sorted({r["concurrency"] for r in results["summary"]})
        for axis, title in zip(row_axes, ("images/s", "p50 latency (ms)", "p99 latency (ms)")):
            axis.set_title(f"{model} {variant}: {title}")
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")  # raw ORT and the naive server can be orders of magnitude apart
            axis.yaxis.set_major_formatter(plain)
            axis.yaxis.set_minor_formatter(sparse)
            axis.tick_params(axis="y", which="minor", labelsize=7)
            axis.set_xticks(concurrencies, [str(c) for c in concurrencies])
            axis.set_xlabel("concurrency (requests in flight)")
            axis.grid(True, which="both", alpha=0.3)
        row_axes[0].legend(fontsize=8)
    meta = results["meta"]
    figure.suptitle(f"{meta['created']}  {meta['cpu']} ({meta['cores']} cores); medians of {args['rounds']} paired "
                    f"rounds of >= {args['duration']} s; raw ORT: best layout and batch (img/s), batch 1 on all cores (latency)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------ markdown

def markdown(results: dict) -> str:
    """README tables from a results file: per model and variant, images/s and p50/p99 per contender and concurrency;
    then the runtimes and variants side by side with their agreement."""
    lines = []
    concurrencies = sorted({r["concurrency"] for r in results["summary"]})
    for model in results["meta"]["args"]["models"]:
        for variant in results["meta"]["args"]["variants"]:
            rows = [r for r in results["summary"] if (r["model"], r["variant"]) == (model, variant)]
            if not rows:
                continue
            lines += [f"**{model} {variant}**: images/s (p50 / p99 ms)", "",
                      "| contender | " + " | ".join(f"c={c}" for c in concurrencies) + " |",
                      "|---|" + "---|" * len(concurrencies)]
            for contender in results["meta"]["args"]["contenders"]:
                cells = {r["concurrency"]: r for r in rows if r["contender"] == contender}
                if cells:
                    lines.append(f"| {contender} | " + " | ".join(
                        f"{fmt(cells[c]['images_per_s'])} ({fmt(cells[c]['p50_ms'], 0)} / {fmt(cells[c]['p99_ms'], 0)})"
                        if c in cells else "–" for c in concurrencies) + " |")
            lines.append("")
    table = speed_and_agreement(results)
    if table:
        lines += ["| model | contender | variant | precision | img/s c=16 | x raw ORT fp32 | / own raw | p50 c=1 ms | "
                  "p50 - raw batch-1 ms | top-1 agreement |", "|---|---|---|---|---|---|---|---|---|---|"]
        for row in table:
            lines.append(f"| {row['model']} | {row['contender']} | {row['variant']} | {row['precision'] or '-'} | "
                         f"{fmt(row['images_per_s_c16'])} | {fmt(row['x_raw_ort_fp32'], 2)} | {fmt(row['over_own_raw_c16'], 2)} | "
                         f"{fmt(row['p50_c1_ms'], 1)} | {fmt(row['p50_c1_minus_raw_batch1_ms'], 1)} | "
                         f"{fmt(row['top1_agreement'], 3)} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    import json
    import sys

    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
