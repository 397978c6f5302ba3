"""`vit-train`: supervised classification, MAE pre-training, and fine-tuning from an MAE.

    vit-train [classifier|mae] --out DIR [--data synthetic|DIR] [--preset NAME] ...

Single process by default; under `torchrun --nproc-per-node N` it trains with
DistributedDataParallel (gloo on CPU, nccl on GPU) and only rank 0 writes files.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import distributed
from .checkpoints import CheckpointError, LoadedCheckpoint, load_checkpoint, save_checkpoint
from .data import DataSplits, load_dataset
from .mae import MaskedAutoencoder
from .optim import build_optimizer, build_scheduler
from .plots import plot_curves, plot_reconstructions
from .presets import ConfigError, mae_preset, vit_preset
from .vit import VisionTransformer

TASKS = ("classifier", "mae")
CHECKPOINT_NAME = "checkpoint.pt"

# Defaults per task, tuned on the built-in dataset so that `vit-train --out DIR` is the demo.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "classifier": dict(preset="vit-demo", epochs=6, lr=1e-3, weight_decay=0.05, batch_size=128),
    "mae": dict(preset="mae-demo", epochs=12, lr=1.5e-3, weight_decay=0.05, batch_size=128),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    task = argv[0] if argv and argv[0] in TASKS else "classifier"
    rest = argv[1:] if argv and argv[0] in TASKS else argv
    parser = argparse.ArgumentParser(
        prog=f"vit-train {task}",
        description="Train a ViT classifier (default) or pre-train an MAE ('vit-train mae ...'); "
        "fine-tune a classifier from an MAE with --init-from.",
    )
    parser.add_argument("--out", required=True, type=Path, help=f"output directory; the checkpoint is DIR/{CHECKPOINT_NAME}")
    parser.add_argument("--data", default="synthetic", help="'synthetic' (built-in, no download) or an image folder root/<class>/*")
    parser.add_argument("--preset", help="model size, e.g. vit-demo, vit-tiny, vit-base (see model/presets.py)")
    parser.add_argument("--image-size", type=int, help="input resolution (defaults to the preset's)")
    parser.add_argument("--pooling", choices=("cls", "gap", "map"), help="classifier pooling (defaults to the preset's)")
    parser.add_argument("--stem", choices=("linear", "conv"), help="patch embedding: linear projection or convolutional stem")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs when smaller)")
    parser.add_argument("--batch-size", type=int, help="images per step and process")
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--warmup-steps", type=int, help="linear warm-up length (default: 5%% of the steps)")
    parser.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0 disables)")
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="MAE: share of patches hidden from the encoder")
    parser.add_argument("--norm-pix-loss", action="store_true", help="MAE: per-patch normalised targets")
    parser.add_argument("--init-from", type=Path, help="start from a checkpoint (an MAE checkpoint fine-tunes its encoder)")
    parser.add_argument("--resume", action="store_true", help=f"continue from DIR/{CHECKPOINT_NAME} if it exists")
    parser.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (default: each epoch)")
    parser.add_argument("--eval-every", type=int, default=0, help="validate every N steps (default: each epoch)")
    parser.add_argument("--num-synthetic", type=int, default=12000, help="size of the built-in dataset")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto", help="mixed precision (auto: bf16/fp16 on CUDA, off on CPU)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(rest)
    args.task = task
    for name, value in TASK_DEFAULTS[task].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.init_from is None and args.preset is None:
        args.preset = TASK_DEFAULTS[task]["preset"]
    for name in ("epochs", "batch_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.max_steps is not None and args.max_steps <= 0:
        parser.error("--max-steps must be positive")
    if not 0.0 <= args.mask_ratio < 1.0:
        parser.error("--mask-ratio must be in [0, 1)")
    return args


def preset_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in (("image_size", args.image_size), ("pooling", args.pooling), ("stem", args.stem)) if v is not None}


def build_model(args: argparse.Namespace, data: DataSplits, loaded: LoadedCheckpoint | None) -> nn.Module:
    """A fresh model from the preset, or one initialised from the --init-from checkpoint."""
    num_classes = len(data.classes)
    if loaded is None:
        if args.task == "classifier":
            return VisionTransformer(vit_preset(args.preset, num_classes=num_classes, **preset_overrides(args)))
        return MaskedAutoencoder(mae_preset(args.preset, norm_pix_loss=args.norm_pix_loss, mask_ratio=args.mask_ratio, **preset_overrides(args)))
    model = loaded.model
    if args.task == "classifier":
        if loaded.kind == "mae":
            model = model.classifier(num_classes, pooling=args.pooling)
        elif model.config.num_classes != num_classes:
            model.reset_head(num_classes)
        if args.image_size and model.config.image_size != (args.image_size, args.image_size):
            model.set_image_size(args.image_size)
    elif loaded.kind != "mae":
        raise ConfigError(f"--init-from {args.init_from} holds a {loaded.kind} model; MAE pre-training needs an MAE checkpoint")
    return model.train()


def autocast_for(amp: str, device: torch.device):
    """Mixed precision where the device supports it; a no-op context otherwise."""
    if amp == "off" or device.type != "cuda":
        if amp in ("bf16", "fp16") and device.type != "cuda":
            print(f"warning: --amp {amp} ignored on {device.type}", file=sys.stderr)
        return contextlib.nullcontext, None
    dtype = torch.float16 if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()) else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


@torch.no_grad()
def evaluate_classifier(model: VisionTransformer, loader, device) -> dict[str, float]:
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(dim=1) == labels).sum().item()
        total += labels.numel()
    model.train()
    return {"loss": loss_sum / total, "accuracy": correct / total}


@torch.no_grad()
def evaluate_mae(model: MaskedAutoencoder, loader, device, seed: int) -> dict[str, float]:
    """Validation loss with fixed noise, and the loss of predicting the mean patch for comparison."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    loss_sum, baseline_sum, count = 0.0, 0.0, 0
    batches = [(images.to(device), torch.rand(images.shape[0], model.num_patches, generator=generator).to(device)) for images, _ in loader]
    mean_patch = torch.stack([model.target_patches(images).mean(dim=(0, 1)) for images, _ in batches]).mean(dim=0)
    for images, noise in batches:
        _, pred, mask = model(images, noise=noise)
        loss_sum += model.per_image_loss(images, pred, mask).sum().item()
        baseline_sum += model.per_image_loss(images, mean_patch.expand_as(pred), mask).sum().item()
        count += images.shape[0]
    model.train()
    return {"loss": loss_sum / count, "baseline_loss": baseline_sum / count}


@torch.no_grad()
def save_reconstruction_grid(model: MaskedAutoencoder, data: DataSplits, path: Path, device, count: int = 8) -> None:
    model.eval()
    images = torch.stack([data.val[i][0] for i in range(min(count, len(data.val)))]).to(device)
    noise = torch.rand(images.shape[0], model.num_patches, generator=torch.Generator().manual_seed(0)).to(device)
    _, pred, mask = model(images, noise=noise)
    if model.config.norm_pix_loss:  # predictions are per-patch normalised: undo with the true patch statistics
        target = model.patchify(images)
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    patch_mask = mask[..., None].expand_as(pred)
    masked = model.unpatchify(model.patchify(images) * (1 - patch_mask))
    composite = model.unpatchify(model.patchify(images) * (1 - patch_mask) + pred * patch_mask)
    mean = torch.tensor(data.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, 3, 1, 1)

    def to_numpy(batch: torch.Tensor) -> np.ndarray:
        return (batch * std + mean).permute(0, 2, 3, 1).cpu().numpy()

    plot_reconstructions(to_numpy(images), to_numpy(masked), to_numpy(composite), path)
    model.train()


class MetricsLog:
    """Append-only JSON-lines log; only the main process writes.

    On resume it keeps the records up to the checkpoint's step: what was logged after the
    last checkpoint of a crashed run will be logged again."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        self.records: list[dict] = []
        if not enabled:
            return
        if resume_step is not None and path.exists():
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self.records = [r for r in records if r["step"] <= resume_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def add(self, record: dict) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def run(args: argparse.Namespace) -> dict[str, Any]:
    ctx = distributed.setup(args.device)
    torch.manual_seed(args.seed + ctx.rank)
    try:
        return _train(args, ctx)
    finally:
        distributed.teardown()


def _train(args: argparse.Namespace, ctx: distributed.DistContext) -> dict[str, Any]:
    out: Path = args.out
    checkpoint_path = out / CHECKPOINT_NAME
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    resumed = args.resume and checkpoint_path.exists()
    start_from = checkpoint_path if resumed else args.init_from
    loaded = load_checkpoint(start_from) if start_from else None
    image_size = _image_size_of(loaded.model) if resumed else args.image_size or _initial_image_size(args, loaded)
    data = load_dataset(args.data, image_size, seed=args.seed, val_fraction=args.val_fraction, num_synthetic=args.num_synthetic)
    if resumed:
        model, training_state, start_step = loaded.model.train(), loaded.training or {}, loaded.step
    else:
        model, training_state, start_step = build_model(args, data, loaded), {}, 0
    model.to(ctx.device)

    sampler = distributed.ShardedEpochSampler(len(data.train), ctx, seed=args.seed)
    steps_per_epoch = len(sampler) // args.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"batch size {args.batch_size} x {ctx.world_size} processes is larger than the training set ({len(data.train)} images)")
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps) if args.epochs else args.max_steps
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, total_steps // 20)

    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    scheduler = build_scheduler(optimizer, warmup, total_steps)
    if training_state:
        optimizer.load_state_dict(training_state["optimizer"])
        scheduler.load_state_dict(training_state["scheduler"])
        if ctx.is_main:  # augmentation and masking continue exactly where they stopped
            torch.set_rng_state(training_state["rng"])
    wrapped = DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None) if ctx.distributed else model
    autocast, scaler = autocast_for(args.amp, ctx.device)

    # A private generator keeps the loader from drawing on the global RNG, which augmentation and masking use.
    loader_kwargs = dict(batch_size=args.batch_size, num_workers=args.workers, drop_last=True, generator=torch.Generator())
    val_loader = torch.utils.data.DataLoader(data.val, batch_size=256, num_workers=args.workers, generator=torch.Generator())
    log = MetricsLog(out / "metrics.jsonl", ctx.is_main, start_step if resumed else None)
    save_every = args.save_every or steps_per_epoch
    eval_every = args.eval_every or steps_per_epoch

    def checkpoint(step: int) -> None:
        if ctx.is_main:
            save_checkpoint(
                checkpoint_path, model, labels=data.classes if args.task == "classifier" else None, mean=data.mean, std=data.std, step=step,
                training={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "task": args.task,
                          "rng": torch.get_rng_state()},
            )

    def validate(step: int, elapsed: float) -> dict[str, float]:
        result: dict[str, float] = {}
        if ctx.is_main:
            result = evaluate_classifier(model, val_loader, ctx.device) if args.task == "classifier" else evaluate_mae(model, val_loader, ctx.device, args.seed)
            log.add({"split": "val", "step": step, "elapsed_s": round(elapsed, 2), **result})
        distributed.barrier(ctx)
        return result

    step, started = start_step, time.perf_counter()
    progress = tqdm(total=total_steps, initial=step, disable=not ctx.is_main or args.quiet, desc=f"{args.task}", dynamic_ncols=True)
    last_val: dict[str, float] = {}
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, skip_samples=done_in_epoch * args.batch_size)
        loader = torch.utils.data.DataLoader(data.train, sampler=sampler, **loader_kwargs)
        for images, labels in loader:
            images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
            with autocast():
                if args.task == "classifier":
                    loss = F.cross_entropy(wrapped(images), labels, label_smoothing=args.label_smoothing)
                else:
                    loss = wrapped(images, mask_ratio=args.mask_ratio)[0]
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower --lr or check the data")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if args.clip_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            step += 1
            progress.update(1)
            if step % 10 == 0 or step == total_steps:
                train_loss = distributed.mean_across_ranks(loss.item(), ctx)
                log.add({"split": "train", "step": step, "epoch": epoch, "loss": train_loss, "lr": scheduler.get_last_lr()[0]})
                progress.set_postfix(loss=f"{train_loss:.4f}", **{f"val_{k}": f"{v:.4f}" for k, v in last_val.items()})
            if step % eval_every == 0 or step == total_steps:
                last_val = validate(step, time.perf_counter() - started)
            if step % save_every == 0 or step == total_steps:
                checkpoint(step)
            if step >= total_steps:
                break
    progress.close()

    summary: dict[str, Any] = {"task": args.task, "steps": step, "train_seconds": round(time.perf_counter() - started, 1)}
    if ctx.is_main:
        summary.update({f"val_{k}": v for k, v in (last_val or validate(step, 0.0)).items()})
        summary["checkpoint"] = str(checkpoint_path)
        plot_curves(log.records, out / "curves.png")
        if args.task == "mae":
            save_reconstruction_grid(model, data, out / "reconstructions.png", ctx.device)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    distributed.barrier(ctx)
    return summary


def _image_size_of(model: nn.Module) -> tuple[int, int]:
    return getattr(model.config, "encoder", model.config).image_size


def _initial_image_size(args: argparse.Namespace, loaded: LoadedCheckpoint | None) -> tuple[int, int]:
    """The input size the model will see: the checkpoint's when starting from one, else the preset's."""
    if loaded is not None:
        return _image_size_of(loaded.model)
    preset = vit_preset(args.preset) if args.task == "classifier" else mae_preset(args.preset).encoder
    return preset.image_size


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        summary = run(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as error:
        print(f"vit-train: error: {error}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
