"""The training recipe: every choice a run makes, from the user's flags first, else from the data.

On the built-in synthetic images a task keeps its demo recipe (`Task.defaults`, tuned so that the demo models
train in about a minute). On an image folder the recipe follows the data, as small datasets need:
- an input size from the images' own size, and a small ViT with a convolutional stem (locality that a
  transformer lacks and a few thousand images cannot teach it), or the checkpoint's model with --init-from;
- a budget in optimizer steps with a floor, so that a few hundred images still get enough updates;
- a batch that fits the data, and a learning rate scaled with it (square root: AdamW);
- warm-up then cosine decay (`model.optim`);
- random-resized crops, RandAugment, mixup/CutMix, label smoothing, stochastic depth and weight decay,
  with horizontal flips only on request (they change digits and text);
- an exponential moving average of the weights, which is what validation sees and the checkpoint keeps;
- layer-wise rate decay when fine-tuning a pre-trained encoder.
The recipe is printed at the start, stored in the checkpoint (a resumed run continues the same one) and in
summary.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .data import DataSurvey
from .presets import ConfigError, mae_preset, vit_preset
from .randaugment import RandAugment
from .transforms import TrainTransform, train_transform

# --- what the data decides -------------------------------------------------------------------------------
SMALL_DATA_PRESET = "vit-demo"  # d64, 4 blocks: big enough for ten classes of small images, fast on a CPU
SMALL_DATA_MAE_PRESET = "mae-compact"
# Input sizes by the images' typical shorter side; each keeps a 4x4 token grid under the conv stem
# (MAE: 8x8 patches of the linear stem, which must not see across patches).
INPUT_SIZES = ((40, 32), (96, 64), (math.inf, 128))
CLASSIFIER_GRID, MAE_GRID = 4, 8
BASE_BATCH, MIN_BATCH = 64, 8
MIN_STEPS_PER_EPOCH = 8  # a smaller batch rather than fewer than this many steps per pass over the data
BASE_LR = {"classifier": 1.5e-3, "finetune": 1e-3, "mae": 1.5e-3}  # AdamW at BASE_BATCH
# Optimizer steps of a folder run. Measured on scikit-learn's digits (1438 training images, 22 steps of 64 per pass):
# 1000 steps reach 98% (the raw-pixel baseline: 96%) in about 4 minutes of one busy CPU core.
STEP_FLOOR, STEP_CAP = 800, 3000
TARGET_EPOCHS = {"classifier": 50, "finetune": 50, "mae": 100}  # passes over the data, within the floor and the cap
WARMUP_SHARE = 0.05
FINETUNE_LAYER_DECAY = 0.75
EMA_HALF_LIFE_SHARE = 0.05  # the average forgets half of what it holds in this share of the run


@dataclass(frozen=True)
class Recipe:
    task: str
    preset: str | None  # None: the --init-from checkpoint's architecture
    image_size: int
    patch_size: int | None  # None: the preset's or checkpoint's
    stem: str | None
    batch_size: int
    lr: float
    weight_decay: float
    steps: int
    warmup_steps: int
    augment: str  # shift (the built-in set's own) | crop (random-resized crop)
    crop_scale: tuple[float, float]
    hflip: bool
    randaugment_ops: int  # 0: off
    randaugment_magnitude: int
    mixup: float  # Beta alpha; 0: off
    cutmix: float
    mix_prob: float
    label_smoothing: float
    drop_path: float
    ema_decay: float  # 0: off
    layer_decay: float  # 1: off
    norm_pix_loss: bool = False  # MAE: per-patch normalised targets
    why: tuple[str, ...] = field(default=())  # one line for each choice the data made

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["crop_scale"], data["why"] = list(self.crop_scale), list(self.why)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        return cls(**{**known, "crop_scale": tuple(known["crop_scale"]), "why": tuple(known.get("why", ()))})

    def folder_augmentation(self, image_size, mean, std) -> TrainTransform:
        """The training transform of an image folder under this recipe (`load_dataset`'s folder_augmentation)."""
        randaugment = RandAugment(self.randaugment_ops, self.randaugment_magnitude) if self.randaugment_ops else None
        return train_transform(image_size, mean, std, hflip=self.hflip, scale=self.crop_scale, randaugment=randaugment)

    def describe(self) -> list[str]:
        """The recipe as the lines printed at the start of a run."""
        model = (f"{self.preset}" if self.preset else "the checkpoint's model") + f" at {self.image_size}x{self.image_size}"
        if self.stem:
            model += f", {self.stem} stem"
        if self.patch_size:
            model += f", {self.patch_size}px patches"
        regularisers = [f"weight decay {self.weight_decay:g}"]
        if self.label_smoothing:
            regularisers.append(f"label smoothing {self.label_smoothing:g}")
        if self.mix_prob and (self.mixup or self.cutmix):
            regularisers.append(f"mixup {self.mixup:g} / cutmix {self.cutmix:g} on {self.mix_prob:.0%} of batches")
        if self.drop_path:
            regularisers.append(f"stochastic depth {self.drop_path:g}")
        if self.ema_decay:
            regularisers.append(f"weight EMA {self.ema_decay:g} (validated and saved)")
        if self.layer_decay < 1:
            regularisers.append(f"layer-wise rate decay {self.layer_decay:g}")
        if self.norm_pix_loss:
            regularisers.append("per-patch normalised targets")
        if self.augment == "shift":
            augmentation = "small shifts"
        else:
            augmentation = f"random-resized crops {self.crop_scale[0]:g}-{self.crop_scale[1]:g} of the area"
            if self.randaugment_ops:
                augmentation += f", RandAugment {self.randaugment_ops} ops at {self.randaugment_magnitude}/10"
        augmentation += ", horizontal flips" if self.hflip else ", no flips"
        return [
            f"recipe: {model}",
            f"recipe: {self.steps} steps of {self.batch_size}, peak lr {self.lr:.3g} ({self.warmup_steps} warm-up, cosine)",
            f"recipe: {augmentation}",
            f"recipe: {', '.join(regularisers)}",
            *(f"recipe: {line}" for line in self.why),
        ]


def input_size_for(survey: DataSurvey) -> tuple[int, str]:
    """A square input size for the images' typical shorter side, and why."""
    height, width = survey.typical_size
    side = min(height, width)
    size = next(size for limit, size in INPUT_SIZES if side <= limit)
    return size, f"input {size}x{size}: the images are typically {height}x{width}"


def patch_size_for(image_size: int, grid: int) -> int:
    """The largest power of two that divides the image size and leaves at least `grid` patches per side."""
    patch = 2
    while image_size % (patch * 2) == 0 and image_size // (patch * 2) >= grid:
        patch *= 2
    return patch


def preset_image_size(task: str, preset: str) -> int:
    config = vit_preset(preset) if task == "classifier" else mae_preset(preset).encoder
    return config.image_size[0]


def budget(samples_per_rank: int, batch: int, epochs: int) -> int:
    """Steps of a folder run: `epochs` passes over the data, but at least STEP_FLOOR and at most STEP_CAP."""
    return min(max(epochs * max(1, samples_per_rank // batch), STEP_FLOOR), STEP_CAP)


def batch_for(samples_per_rank: int) -> int:
    """The base batch, halved until a pass over the data has MIN_STEPS_PER_EPOCH steps, never below MIN_BATCH."""
    batch = BASE_BATCH
    while batch > MIN_BATCH and samples_per_rank // batch < MIN_STEPS_PER_EPOCH:
        batch //= 2
    return batch


def choose_recipe(args: argparse.Namespace, task: str, defaults: dict[str, Any], survey: DataSurvey,
                  init_kind: str | None, init_image_size: int | None, world_size: int = 1) -> Recipe:
    """The recipe of a fresh run: each flag the user gave, else the demo's value on the built-in set, else the data's.

    `init_kind`: the --init-from checkpoint's kind (vit | mae), None for a fresh model; `init_image_size`: its input size.
    """
    samples_per_rank = survey.train_images // world_size
    given = lambda name: getattr(args, name, None)  # noqa: E731 - None: not given on the command line
    why: list[str] = []
    fine_tuning = task == "classifier" and init_kind is not None
    mode = "finetune" if fine_tuning else task

    # --- model and input size
    preset, patch, stem = None, None, given("stem")
    if init_kind:
        image_size = given("image_size") or init_image_size
        if not given("image_size"):
            why.append(f"input {image_size}x{image_size}: the size the --init-from checkpoint was trained at")
    elif given("preset") or not survey.is_folder:
        preset = given("preset") or defaults["preset"]
        image_size = given("image_size") or preset_image_size(task, preset)
        size_from = "--image-size" if given("image_size") else "the preset's size"
        why.append(f"model {preset} from --preset, input {image_size}x{image_size} from {size_from}" if given("preset") else
                   f"model {preset} at {image_size}x{image_size}: the built-in images train with the demo's recipe, tuned for them")
    else:
        preset = SMALL_DATA_PRESET if task == "classifier" else SMALL_DATA_MAE_PRESET
        if given("image_size"):
            image_size = given("image_size")
        else:
            image_size, reason = input_size_for(survey)
            why.append(reason)
        patch = patch_size_for(image_size, CLASSIFIER_GRID if task == "classifier" else MAE_GRID)
        if task == "classifier" and stem is None:
            stem = "conv"
        why.append(f"model {preset} with {patch}px patches ({survey.train_images} training images: a small model)"
                   + ("; a convolutional stem: the locality a transformer would need far more images to learn" if stem == "conv" else ""))

    # --- batch, rate, budget
    if samples_per_rank < 1:
        raise ConfigError(f"{survey.train_images} training images cannot be shared by {world_size} processes")
    if not survey.is_folder:
        batch = given("batch_size") or defaults["batch_size"]
        lr = given("lr") or defaults["lr"]
    else:
        batch = given("batch_size") or batch_for(samples_per_rank)
        lr = given("lr") or BASE_LR[mode] * math.sqrt(batch / BASE_BATCH)
        if not given("batch_size"):
            why.append(f"batch {batch} for {samples_per_rank} training images per process, peak lr scaled with it")
    if batch > samples_per_rank:
        why.append(f"batch {batch} cut to {samples_per_rank}: the training images of one process")
        batch = samples_per_rank
    steps_per_epoch = samples_per_rank // batch
    if given("epochs"):
        steps = given("epochs") * steps_per_epoch
    elif not survey.is_folder:
        steps = defaults["epochs"] * steps_per_epoch
    else:
        steps = budget(samples_per_rank, batch, TARGET_EPOCHS[mode])
        if not given("max_steps") or given("max_steps") >= steps:
            why.append(f"{steps} steps ({steps / steps_per_epoch:.0f} passes over the data; a folder run gets "
                       f"{TARGET_EPOCHS[mode]} passes, at least {STEP_FLOOR} and at most {STEP_CAP} steps)")
    if given("max_steps"):
        steps = min(steps, given("max_steps"))
    warmup = given("warmup_steps") if given("warmup_steps") is not None else max(1, round(steps * WARMUP_SHARE))

    # --- augmentation and regularisation
    folder = survey.is_folder
    classifier = task == "classifier"
    choose = lambda name, folder_value, demo_value: given(name) if given(name) is not None else (folder_value if folder else demo_value)  # noqa: E731
    hflip = choose("hflip", False, True)
    if folder and given("hflip") is None:
        why.append("no horizontal flips (--hflip adds them when a mirror image keeps its class)")
    ema = choose("ema", ema_decay_for(steps) if classifier else 0.0, 0.0)
    return Recipe(
        task=task, preset=preset, image_size=image_size, patch_size=patch, stem=stem,
        batch_size=batch, lr=lr, weight_decay=choose("weight_decay", 0.05, defaults["weight_decay"]),
        steps=steps, warmup_steps=min(warmup, steps),
        augment="crop" if folder else "shift", crop_scale=(0.35, 1.0) if classifier else (0.5, 1.0), hflip=hflip,
        randaugment_ops=choose("randaugment", 2 if classifier else 0, 0), randaugment_magnitude=choose("magnitude", 6, 6),
        mixup=choose("mixup", 0.8 if classifier else 0.0, 0.0), cutmix=choose("cutmix", 1.0 if classifier else 0.0, 0.0),
        mix_prob=choose("mix_prob", 0.5, 1.0) if classifier else 0.0,
        label_smoothing=choose("label_smoothing", 0.1, 0.1) if classifier else 0.0,
        drop_path=choose("drop_path", 0.1 if classifier else 0.0, 0.0),
        ema_decay=ema,
        layer_decay=choose("layer_decay", FINETUNE_LAYER_DECAY if fine_tuning and init_kind == "mae" else 1.0, 1.0),
        # Normalised targets make the MAE learn shapes and edges rather than brightness: on scikit-learn's digits with
        # 10% of the labels, fine-tuning gained 10 points over scratch with them, lost 5 without (bench/train_recipes.py).
        norm_pix_loss=choose("norm_pix_loss", True, False) if task == "mae" else False,
        why=tuple(why),
    )


def ema_decay_for(steps: int) -> float:
    """The decay whose half-life is EMA_HALF_LIFE_SHARE of the run."""
    half_life = max(1.0, steps * EMA_HALF_LIFE_SHARE)
    return round(0.5 ** (1 / half_life), 5)
