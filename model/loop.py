"""The training loop every task shares: data, optimiser, steps, validation, checkpoints, resume, DDP.

What depends on the task (model, loss, metrics, extra artefacts) is asked of a `model.tasks.Task`;
nothing here branches on which task runs. Only the main process writes files.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
from .baseline import fit_baseline
from .checkpoints import LoadedCheckpoint, load_checkpoint, save_checkpoint
from .data import DataSplits, load_dataset, survey_dataset
from .ema import WeightAverage
from .optim import build_optimizer, build_scheduler
from .plots import plot_curves
from .presets import ConfigError
from .provenance import data_record, model_name, recorded_name
from .progress import Progress
from .mae import image_size_of
from .recipe import Recipe, choose_recipe
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
    def plan(cls, recipe: Recipe, samples_per_rank: int) -> "Schedule":
        # the recipe fits its batch to the data, so a pass over it has at least one step
        return cls(max(1, samples_per_rank // recipe.batch_size), recipe.steps, recipe.warmup_steps)


class Optimisation:
    """One optimiser step: backward (scaled under fp16), gradient clipping, step, schedule."""

    def __init__(self, model: nn.Module, args: argparse.Namespace, recipe: Recipe, schedule: Schedule, device: torch.device) -> None:
        self.model, self.clip_grad = model, args.clip_grad
        self.optimizer = build_optimizer(model, recipe.lr, recipe.weight_decay, layer_decay=recipe.layer_decay)
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
        return max(self.scheduler.get_last_lr())  # the top layers' rate under layer-wise decay

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


@dataclass
class Start:
    """Where a run begins: fresh, from --init-from, or resumed from its own checkpoint."""
    model: nn.Module  # the weights to train (a resumed run's raw weights, not its average)
    data: DataSplits
    recipe: Recipe
    step: int
    resumed: bool
    training_state: dict[str, Any]
    averaged: dict[str, torch.Tensor] | None  # a resumed run's weight average


def fresh_recipe(args: argparse.Namespace, task: Task, init: LoadedCheckpoint | None, world_size: int = 1) -> Recipe:
    """The recipe of a new run on `args.data`, starting from `init` (--init-from) or from scratch."""
    survey = survey_dataset(args.data, seed=args.seed, val_fraction=args.val_fraction, num_synthetic=args.num_synthetic)
    return choose_recipe(args, task.name, task.defaults, survey, init.kind if init else None,
                         image_size_of(init.model)[0] if init else None, world_size)


def start(args: argparse.Namespace, task: Task, checkpoint_path: Path, world_size: int) -> Start:
    """Check everything a run needs (checkpoint, data, recipe, model) before anything is written."""
    resumed = args.resume and checkpoint_path.exists()
    start_from = checkpoint_path if resumed else args.init_from
    loaded = load_checkpoint(start_from) if start_from else None
    training = (loaded.training or {}) if resumed else {}
    if resumed and training.get("task", task.name) != task.name:
        raise ConfigError(f"{checkpoint_path} was written by 'vit-train {training['task']}'; resume it with that mode")
    if resumed and "recipe" in training:
        recipe = Recipe.from_dict(training["recipe"])
    elif resumed:  # a checkpoint older than recipes
        recipe = dataclasses.replace(fresh_recipe(args, task, None, world_size), image_size=image_size_of(loaded.model)[0])
    else:
        recipe = fresh_recipe(args, task, loaded, world_size)
    task.recipe = recipe
    data = load_dataset(args.data, recipe.image_size, seed=args.seed, val_fraction=args.val_fraction,
                        num_synthetic=args.num_synthetic, folder_augmentation=recipe.folder_augmentation)
    if not resumed:
        return Start(task.build_model(data, loaded), data, recipe, 0, False, {}, None)
    model, averaged = loaded.model.train(), None
    if "raw_model" in training:  # the checkpoint holds the weight average; training goes on from the raw weights
        averaged = model.state_dict()
        model.load_state_dict(training["raw_model"])
    if task.name == "classifier":
        model.set_drop_path(recipe.drop_path)
    return Start(model, data, recipe, loaded.step, True, training, averaged)


def train(args: argparse.Namespace, task: Task, ctx: distributed.DistContext) -> dict[str, Any]:
    out: Path = args.out
    checkpoint_path = out / CHECKPOINT_NAME
    begin = start(args, task, checkpoint_path, ctx.world_size)
    model, data, recipe, training_state = begin.model.to(ctx.device), begin.data, begin.recipe, begin.training_state

    sampler = distributed.ShardedEpochSampler(len(data.train), ctx, seed=args.seed)
    schedule = Schedule.plan(recipe, len(sampler))
    optimisation = Optimisation(model, args, recipe, schedule, ctx.device)
    average = WeightAverage(model, recipe.ema_decay) if recipe.ema_decay > 0 else None
    if training_state:
        optimisation.load_state(training_state)
        if average is not None and begin.averaged is not None:
            average.load_state(begin.averaged, training_state["average"])
        if ctx.is_main:  # augmentation and masking continue exactly where they stopped
            torch.set_rng_state(training_state["rng"])
    evaluated = average.model if average is not None else model  # what validation sees and the checkpoint keeps
    wrapped = DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None) if ctx.distributed else model
    baseline = fit_baseline(data) if getattr(args, "baseline", False) and ctx.is_main else None  # fails early without scikit-learn

    # Everything checked: only now does the run leave anything on disk.
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    # A private generator keeps the loader from drawing on the global RNG, which augmentation and masking use.
    loader_kwargs = dict(batch_size=recipe.batch_size, num_workers=args.workers, drop_last=True, generator=torch.Generator())
    val_loader = torch.utils.data.DataLoader(data.val, batch_size=256, num_workers=args.workers, generator=torch.Generator())
    log = MetricsLog(out / "metrics.jsonl", ctx.is_main, begin.step if begin.resumed else None)
    save_every = args.save_every or schedule.steps_per_epoch
    eval_every = args.eval_every or schedule.steps_per_epoch
    record = training_state.get("data") or data_record(args)
    name = recorded_name(training_state) or model_name(task.name, getattr(args, "name", None), record)

    def checkpoint(step: int) -> None:
        if ctx.is_main:
            extra = {"raw_model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                     "average": average.state()} if average is not None else {}
            save_checkpoint(
                checkpoint_path, evaluated, labels=task.checkpoint_labels(data), mean=data.mean, std=data.std, step=step,
                training={**optimisation.state(), "task": task.name, "rng": torch.get_rng_state(),
                          "recipe": recipe.to_dict(), "data": record, "name": name, **extra},
            )

    def validate(step: int, elapsed: float) -> dict[str, float]:
        result: dict[str, float] = {}
        if ctx.is_main:
            result = task.evaluate(evaluated, val_loader, ctx.device)
            log.add({"split": "val", "step": step, "elapsed_s": round(elapsed, 2), **result})
        distributed.barrier(ctx)
        return result

    threads = torch.get_num_threads()
    progress = Progress(args.progress if ctx.is_main else "off", task.name, schedule.total_steps, begin.step)
    progress.say(f"{type(model).__name__} at {recipe.image_size}x{recipe.image_size} on {ctx.device}"
                 + (f" x {ctx.world_size} processes" if ctx.distributed else f", {threads} thread{'s' if threads > 1 else ''}")
                 + f"; {len(data.train)} training images, {schedule.total_steps} steps of {recipe.batch_size} -> {out}")
    for line in [*recipe.describe(), *(f"init: {note}" for note in task.init_notes)]:
        progress.say(line)
    step = begin.step
    last_val: dict[str, float] = {}
    while step < schedule.total_steps:
        epoch, done_in_epoch = divmod(step, schedule.steps_per_epoch)
        sampler.set_epoch(epoch, skip_samples=done_in_epoch * recipe.batch_size)
        loader = torch.utils.data.DataLoader(data.train, sampler=sampler, **loader_kwargs)
        for images, labels in loader:
            images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
            with optimisation.autocast():
                loss = task.loss(wrapped, images, labels)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower --lr or check the data")
            optimisation.step(loss)
            if average is not None:
                average.update(model)
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
        accuracies = [r["accuracy"] for r in log.records if r.get("split") == "val" and "accuracy" in r]
        if accuracies:
            summary["best_val_accuracy"] = max(accuracies)
        summary["checkpoint"] = str(checkpoint_path)
        summary["recipe"] = recipe.to_dict()
        if baseline is not None:
            summary["baseline"] = baseline
            progress.say("baseline on the raw pixels of the same split: "
                         + ", ".join(f"{name} {acc:.4f}" for name, acc in baseline["val_accuracy"].items()))
        plot_curves(log.records, out / "curves.png")
        summary.update(task.write_artefacts(evaluated, data, out, ctx.device))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    distributed.barrier(ctx)
    return summary
