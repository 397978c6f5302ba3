"""The training loop every task shares: data, optimiser, steps, validation, checkpoints, resume, DDP.

What depends on the task (model, loss, metrics, extra artefacts) is asked of a `model.tasks.Task`;
nothing here branches on which task runs. Only the main process writes files.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import distributed
from .checkpoints import load_checkpoint, save_checkpoint
from .data import DataSplits, load_dataset
from .optim import build_optimizer, build_scheduler
from .plots import plot_curves
from .presets import ConfigError
from .progress import Progress
from .mae import image_size_of
from .tasks import Task

CHECKPOINT_NAME = "checkpoint.pt"
LOG_EVERY = 10  # steps between train-loss records


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


def autocast_for(amp: str, device: torch.device) -> tuple[Callable[[], contextlib.AbstractContextManager], torch.amp.GradScaler | None]:
    """Mixed precision where the device supports it; a no-op context otherwise."""
    if amp == "off" or device.type != "cuda":
        if amp in ("bf16", "fp16") and device.type != "cuda":
            print(f"warning: --amp {amp} ignored on {device.type}", file=sys.stderr)
        return contextlib.nullcontext, None
    dtype = torch.float16 if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()) else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


@dataclass(frozen=True)
class Schedule:
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @classmethod
    def plan(cls, args: argparse.Namespace, samples_per_rank: int, world_size: int, train_size: int) -> "Schedule":
        steps_per_epoch = samples_per_rank // args.batch_size
        if steps_per_epoch == 0:
            raise ConfigError(f"batch size {args.batch_size} x {world_size} processes is larger than the training set ({train_size} images)")
        total = args.epochs * steps_per_epoch
        if args.max_steps:
            total = min(total, args.max_steps)
        warmup = args.warmup_steps if args.warmup_steps is not None else max(1, total // 20)
        return cls(steps_per_epoch, total, warmup)


class Optimisation:
    """One optimiser step: backward (scaled under fp16), gradient clipping, step, schedule."""

    def __init__(self, model: nn.Module, args: argparse.Namespace, schedule: Schedule, device: torch.device) -> None:
        self.model, self.clip_grad = model, args.clip_grad
        self.optimizer = build_optimizer(model, args.lr, args.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, schedule.warmup_steps, schedule.total_steps)
        self.autocast, self.scaler = autocast_for(args.amp, device)

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.clip_grad > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def run(args: argparse.Namespace, task: Task) -> dict[str, Any]:
    """Train `task` as `args` say, in this process (one rank of torchrun or alone); the summary."""
    ctx = distributed.setup(args.device)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed + ctx.rank)
    try:
        return train(args, task, ctx)
    finally:
        torch.set_num_threads(threads_before)  # a caller in the same process (a test, a notebook) keeps its setting
        distributed.teardown()


def dataset_record(args: argparse.Namespace) -> dict[str, Any]:
    """What the checkpoint says about its data, so that vit-export can rebuild the same splits (static int8
    calibrates on the training split and measures accuracy on the validation split)."""
    source = args.data if args.data == "synthetic" else str(Path(args.data).resolve())
    return {"source": source, "seed": args.seed, "val_fraction": args.val_fraction, "num_synthetic": args.num_synthetic}


@dataclass
class Start:
    """Where a run begins: fresh, from --init-from, or resumed from its own checkpoint."""
    model: nn.Module
    data: DataSplits
    image_size: tuple[int, int]
    step: int
    resumed: bool
    training_state: dict[str, Any]


def start(args: argparse.Namespace, task: Task, checkpoint_path: Path) -> Start:
    resumed = args.resume and checkpoint_path.exists()
    start_from = checkpoint_path if resumed else args.init_from
    loaded = load_checkpoint(start_from) if start_from else None
    if resumed and (loaded.training or {}).get("task", task.name) != task.name:
        raise ConfigError(f"{checkpoint_path} was written by 'vit-train {loaded.training['task']}'; resume it with that mode")
    image_size = image_size_of(loaded.model) if resumed else task.initial_image_size(loaded)
    data = load_dataset(args.data, image_size, seed=args.seed, val_fraction=args.val_fraction, num_synthetic=args.num_synthetic)
    if resumed:
        return Start(loaded.model.train(), data, image_size, loaded.step, True, loaded.training or {})
    return Start(task.build_model(data, loaded), data, image_size, 0, False, {})


def train(args: argparse.Namespace, task: Task, ctx: distributed.DistContext) -> dict[str, Any]:
    out: Path = args.out
    checkpoint_path = out / CHECKPOINT_NAME
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    begin = start(args, task, checkpoint_path)
    model, data, training_state = begin.model.to(ctx.device), begin.data, begin.training_state

    sampler = distributed.ShardedEpochSampler(len(data.train), ctx, seed=args.seed)
    schedule = Schedule.plan(args, len(sampler), ctx.world_size, len(data.train))
    optimisation = Optimisation(model, args, schedule, ctx.device)
    if training_state:
        optimisation.load_state(training_state)
        if ctx.is_main:  # augmentation and masking continue exactly where they stopped
            torch.set_rng_state(training_state["rng"])
    wrapped = DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None) if ctx.distributed else model

    # A private generator keeps the loader from drawing on the global RNG, which augmentation and masking use.
    loader_kwargs = dict(batch_size=args.batch_size, num_workers=args.workers, drop_last=True, generator=torch.Generator())
    val_loader = torch.utils.data.DataLoader(data.val, batch_size=256, num_workers=args.workers, generator=torch.Generator())
    log = MetricsLog(out / "metrics.jsonl", ctx.is_main, begin.step if begin.resumed else None)
    save_every = args.save_every or schedule.steps_per_epoch
    eval_every = args.eval_every or schedule.steps_per_epoch

    def checkpoint(step: int) -> None:
        if ctx.is_main:
            save_checkpoint(
                checkpoint_path, model, labels=task.checkpoint_labels(data), mean=data.mean, std=data.std, step=step,
                training={**optimisation.state(), "task": task.name, "rng": torch.get_rng_state(), "data": dataset_record(args)},
            )

    def validate(step: int, elapsed: float) -> dict[str, float]:
        result: dict[str, float] = {}
        if ctx.is_main:
            result = task.evaluate(model, val_loader, ctx.device)
            log.add({"split": "val", "step": step, "elapsed_s": round(elapsed, 2), **result})
        distributed.barrier(ctx)
        return result

    threads = torch.get_num_threads()
    progress = Progress(args.progress if ctx.is_main else "off", task.name, schedule.total_steps, begin.step)
    progress.say(f"{type(model).__name__} at {begin.image_size[0]}x{begin.image_size[1]} on {ctx.device}"
                 + (f" x {ctx.world_size} processes" if ctx.distributed else f", {threads} thread{'s' if threads > 1 else ''}")
                 + f"; {len(data.train)} training images, {schedule.total_steps} steps of {args.batch_size} -> {out}")
    step = begin.step
    last_val: dict[str, float] = {}
    while step < schedule.total_steps:
        epoch, done_in_epoch = divmod(step, schedule.steps_per_epoch)
        sampler.set_epoch(epoch, skip_samples=done_in_epoch * args.batch_size)
        loader = torch.utils.data.DataLoader(data.train, sampler=sampler, **loader_kwargs)
        for images, labels in loader:
            images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
            with optimisation.autocast():
                loss = task.loss(wrapped, images, labels)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower --lr or check the data")
            optimisation.step(loss)
            step += 1
            train_loss = None
            if step % LOG_EVERY == 0 or step == schedule.total_steps:
                train_loss = distributed.mean_across_ranks(loss.item(), ctx)
                log.add({"split": "train", "step": step, "epoch": epoch, "loss": train_loss, "lr": optimisation.lr})
            progress.step(step, train_loss, last_val)
            if step % eval_every == 0 or step == schedule.total_steps:
                last_val = validate(step, progress.elapsed())
                progress.validated(step, last_val)
            if step % save_every == 0 or step == schedule.total_steps:
                checkpoint(step)
            if step >= schedule.total_steps:
                break
    progress.close()

    summary: dict[str, Any] = {"task": task.name, "steps": step, "train_seconds": round(progress.elapsed(), 1)}
    if ctx.is_main:
        summary.update({f"val_{k}": v for k, v in (last_val or validate(step, 0.0)).items()})
        summary["checkpoint"] = str(checkpoint_path)
        plot_curves(log.records, out / "curves.png")
        task.write_artefacts(model, data, out, ctx.device)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    distributed.barrier(ctx)
    return summary
