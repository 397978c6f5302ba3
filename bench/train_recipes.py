"""Does `vit-train`'s default recipe hold up on real small datasets? The accuracy targets, measured, as one table.

    python -m bench.train_recipes --out /tmp/train-recipes                 # everything (about 10 min on 2 shared cores)
    python -m bench.train_recipes --datasets lfw --no-mae --out /tmp/t     # one dataset, no MAE study

Real data that ships in packages (bench/real_datasets.py: scikit-learn's digits, scikit-image's lfw_subset), split
as vit-train splits it (seed 0, 20% validation). For each dataset:
1. the classical baseline: logistic regression and a linear SVM on the raw pixels of the same split, at the input
   size the recipe picks (`model.baseline`); the better one is the figure to reach;
2. `vit-train --data DIR --out RUN` and nothing else: the final validation accuracy, the wall time and the CPU time
   of training, and when validation first reached the baseline (target: by 300 s of training);
3. with --mae (digits only by default): labels for 10% of the training images. From scratch on those labels
   (the default recipe), against `vit-train mae` on all the training images followed by fine-tuning its
   encoder on the same labelled 10% (target: +5 points), on the same validation split.
Each run is a separate `vit-train` process; the machine's load average is printed with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from model.baseline import fit_baseline
from model.data import load_dataset, stratified_split, survey_dataset
from model.recipe import input_size_for

from .real_datasets import BUILDERS

TIME_TARGET_S = 300.0
MAE_GAIN_TARGET = 0.05
SEED, VAL_FRACTION = 0, 0.2
VIT_TRAIN = [sys.executable, "-m", "model.train"]


def load() -> str:
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def vit_train(argv: list[str], log: Path) -> dict:
    """Run vit-train in its own process; its summary, wall time and CPU time (user + system of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with log.open("w") as handle:
        result = subprocess.run([*VIT_TRAIN, *argv, "--progress", "lines"], stdout=subprocess.PIPE, stderr=handle, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"vit-train {' '.join(argv)} failed ({result.returncode}); see {log}")
    summary = json.loads(result.stdout)
    summary["wall_s"] = round(wall, 1)
    summary["cpu_s"] = round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1)
    return summary


def first_reaching(run_dir: Path, accuracy: float) -> float | None:
    """Seconds of training at the first validation at or above `accuracy`; None if none reached it."""
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["split"] == "val" and record.get("accuracy", -1) >= accuracy:
            return record["elapsed_s"]
    return None


def baseline_of(folder: Path) -> dict:
    survey = survey_dataset(str(folder), seed=SEED, val_fraction=VAL_FRACTION)
    size, _ = input_size_for(survey)
    result = fit_baseline(load_dataset(str(folder), size, seed=SEED, val_fraction=VAL_FRACTION, augment=False))
    result["image_size"] = size
    result["best"] = max(result["val_accuracy"].values())
    return result


def default_recipe(name: str, folder: Path, work: Path, extra: list[str]) -> dict:
    baseline = baseline_of(folder)
    print(f"{name}: baseline {baseline['val_accuracy']} at {baseline['image_size']}px ({load()})", flush=True)
    run_dir = work / f"{name}-default"
    summary = vit_train(["--data", str(folder), "--out", str(run_dir), *extra], work / f"{name}-default.log")
    reached = first_reaching(run_dir, baseline["best"])
    row = {"dataset": name, "train_images": baseline["train_images"], "val_images": baseline["val_images"],
           "baseline": baseline["best"], "baseline_models": baseline["val_accuracy"],
           "val_accuracy": summary["val_accuracy"], "best_val_accuracy": summary["best_val_accuracy"],
           "train_s": summary["train_seconds"], "wall_s": summary["wall_s"], "cpu_s": summary["cpu_s"],
           "reached_baseline_s": reached, "steps": summary["steps"], "load_after": load()}
    row["target_met"] = summary["val_accuracy"] >= baseline["best"] and reached is not None and reached <= TIME_TARGET_S
    print(f"{name}: default recipe {json.dumps(row)}", flush=True)
    return row


def labelled_share(folder: Path, work: Path, share: float) -> tuple[Path, Path]:
    """Two folders with vit-train's own split of `folder`: all/{train,val} and few/{train,val}, where few/train keeps
    `share` of each class's training images (the same validation split in both)."""
    everything = load_dataset(str(folder), 8, seed=SEED, val_fraction=VAL_FRACTION, augment=False)
    train_files = [everything.train.samples[i] for i in range(len(everything.train))]
    val_files = [everything.val.samples[i] for i in range(len(everything.val))]
    classes = everything.classes
    rng = np.random.default_rng(SEED)
    labels = np.array([label for _, label in train_files])
    keep = set()
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        keep.update(members[:max(1, round(share * len(members)))].tolist())
    roots = work / "all", work / "few"
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)
    for split, files in (("train", train_files), ("val", val_files)):
        for index, (path, label) in enumerate(files):
            for root in roots:
                if root == roots[1] and split == "train" and index not in keep:
                    continue
                target = root / split / classes[label] / Path(path).name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
    return roots


def mae_study(name: str, folder: Path, work: Path, share: float, extra: list[str]) -> dict:
    all_dir, few_dir = labelled_share(folder, work / f"{name}-split", share)
    labelled = sum(1 for _ in (few_dir / "train").rglob("*.png"))
    baseline = baseline_of(few_dir)["best"]
    print(f"{name}: {labelled} labelled training images ({share:.0%}), raw-pixel baseline {baseline:.4f}, {load()}", flush=True)
    scratch = vit_train(["--data", str(few_dir), "--out", str(work / f"{name}-scratch"), *extra], work / f"{name}-scratch.log")
    print(f"{name}: scratch on {share:.0%} {scratch['val_accuracy']:.4f} ({scratch['train_seconds']} s)", flush=True)
    mae = vit_train(["mae", "--data", str(all_dir), "--out", str(work / f"{name}-mae"), *extra], work / f"{name}-mae.log")
    print(f"{name}: MAE on all {mae['steps']} steps, val loss {mae['val_loss']:.4f} vs mean patch "
          f"{mae['val_baseline_loss']:.4f} ({mae['train_seconds']} s)", flush=True)
    finetuned = vit_train(["--data", str(few_dir), "--init-from", str(work / f"{name}-mae" / "checkpoint.pt"),
                           "--out", str(work / f"{name}-finetuned"), *extra], work / f"{name}-finetuned.log")
    row = {"dataset": name, "labelled": labelled, "share": share, "baseline": baseline, "scratch": scratch["val_accuracy"],
           "scratch_s": scratch["train_seconds"], "scratch_cpu_s": scratch["cpu_s"],
           "mae_s": mae["train_seconds"], "mae_cpu_s": mae["cpu_s"], "mae_val_loss": mae["val_loss"],
           "mae_baseline_loss": mae["val_baseline_loss"], "finetuned": finetuned["val_accuracy"],
           "finetuned_s": finetuned["train_seconds"], "finetuned_cpu_s": finetuned["cpu_s"], "load_after": load()}
    row["gain"] = round(row["finetuned"] - row["scratch"], 4)
    row["target_met"] = row["gain"] >= MAE_GAIN_TARGET
    print(f"{name}: MAE study {json.dumps(row)}", flush=True)
    return row


def table(defaults: list[dict], studies: list[dict]) -> str:
    lines = ["| dataset | train / val images | baseline (raw pixels) | default recipe: final val acc | reached baseline at | "
             "training wall / CPU s | target |", "|---|---|---|---|---|---|---|"]
    for r in defaults:
        reached = f"{r['reached_baseline_s']:.0f} s" if r["reached_baseline_s"] is not None else "never"
        lines.append(f"| {r['dataset']} | {r['train_images']} / {r['val_images']} | {r['baseline']:.2%} | {r['val_accuracy']:.2%} "
                     f"(best {r['best_val_accuracy']:.2%}, {r['steps']} steps) | {reached} | {r['train_s']:.0f} / {r['cpu_s']:.0f} | "
                     f"{'met' if r['target_met'] else 'MISSED'} |")
    if studies:
        lines += ["", "| dataset | labelled | raw-pixel baseline | scratch | MAE pre-training then fine-tuning | gain | "
                  "wall s (scratch, MAE, fine-tune) | target |", "|---|---|---|---|---|---|---|---|"]
        for r in studies:
            lines.append(f"| {r['dataset']} | {r['labelled']} ({r['share']:.0%}) | {r['baseline']:.2%} | {r['scratch']:.2%} | {r['finetuned']:.2%} | "
                         f"{100 * r['gain']:+.1f} points | {r['scratch_s']:.0f}, {r['mae_s']:.0f}, {r['finetuned_s']:.0f} | "
                         f"{'met' if r['target_met'] else 'MISSED'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_recipes", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--out", type=Path, default=Path("bench/results/train-recipes"), help="work folder (data, runs, logs)")
    parser.add_argument("--datasets", default="digits,lfw", help=f"comma-separated, of {', '.join(BUILDERS)}")
    parser.add_argument("--mae", default="digits", help="datasets for the 10%%-labels MAE study (empty: none)")
    parser.add_argument("--no-mae", action="store_true", help="skip the MAE study")
    parser.add_argument("--share", type=float, default=0.1, help="labelled share of the training images in the MAE study")
    parser.add_argument("--no-default", action="store_true", help="skip the default-recipe runs")
    parser.add_argument("--threads", type=int, help="passed to every vit-train (default: PyTorch's)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    extra = ["--threads", str(args.threads)] if args.threads else []
    print(f"start: {load()}, {os.cpu_count()} cores", flush=True)
    folders = {}
    for name in {*args.datasets.split(","), *([] if args.no_mae else args.mae.split(","))} - {""}:
        folders[name] = BUILDERS[name](args.out / "data" / name) if not (args.out / "data" / name).is_dir() else args.out / "data" / name
    defaults = [] if args.no_default else [default_recipe(n, folders[n], args.out, extra) for n in args.datasets.split(",") if n]
    studies = [] if args.no_mae else [mae_study(n, folders[n], args.out, args.share, extra) for n in args.mae.split(",") if n]
    report = table(defaults, studies)
    print(f"\nend: {load()}\n\n{report}")
    (args.out / "results.json").write_text(json.dumps({"default_recipe": defaults, "mae_study": studies}, indent=2))
    return 0 if all(r["target_met"] for r in defaults + studies) else 1


if __name__ == "__main__":
    sys.exit(main())
