"""`vit-train`: the command line of training. One subcommand per task (model/tasks.py); the loop is model/loop.py.

    vit-train classifier --out DIR [--data synthetic|DIR] [--preset NAME] ...   (also plain `vit-train --out DIR`)
    vit-train mae --out DIR ...

Single process by default; under `torchrun --nproc-per-node N` it trains with
DistributedDataParallel (gloo on CPU, nccl on GPU) and only rank 0 writes files.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

from torch import nn

from . import loop, progress
from .argtypes import fraction, repository_name, non_negative_float, non_negative_int, positive_float, positive_int
from .checkpoints import CheckpointError, LoadedCheckpoint
from .data import DataSplits
from .presets import MAE_PRESETS, VIT_PRESETS, ConfigError
from .tasks import TASKS, Task

PROG = "vit-train"
DEFAULT_TASK = "classifier"  # `vit-train --out DIR` (README, Makefile) means `vit-train classifier --out DIR`
KNOWN_PRESETS = {"classifier": VIT_PRESETS, "mae": MAE_PRESETS}

EXAMPLES = f"""\
examples:
  the demo classifier on the built-in images, and the demo MAE:
    {PROG} --out runs/demo-classifier
    {PROG} mae --out runs/demo-mae
  fine-tune a classifier from the MAE's encoder:
    {PROG} classifier --init-from runs/demo-mae/checkpoint.pt --out runs/finetuned
  your own images, a bigger model:
    {PROG} --data path/to/images --preset vit-small --image-size 224 --epochs 30 --out runs/mine
  continue where DIR/{loop.CHECKPOINT_NAME} stopped:
    {PROG} --out runs/mine --resume
  two processes with DistributedDataParallel:
    torchrun --nproc-per-node 2 -m model.train classifier --out runs/ddp

'{PROG} MODE --help' lists the options of a mode, with their defaults."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written, names never split at a hyphen; each option's default shown unless unset or a plain off switch."""

    def __init__(self, prog: str, **kwargs) -> None:
        super().__init__(prog, max_help_position=32, **kwargs)

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)  # keep "--init-from", "mae-demo" whole

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        unset = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if "%(default)" in help_text or unset or not action.option_strings:
            return help_text
        return f"{help_text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """Usage errors name the command, not the subcommand: `vit-train: error: ...`, exit status 2."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROG}: error: {message}\n")


def build_parser() -> Parser:
    parser = Parser(
        prog=PROG, formatter_class=HelpFormatter, epilog=EXAMPLES,
        description="Train Vision Transformers on the built-in synthetic images (no download) or on an image folder.\n"
        f"Without a mode, '{PROG} --out DIR ...' means '{PROG} {DEFAULT_TASK} --out DIR ...'.",
    )
    modes = parser.add_subparsers(title="modes", dest="task", parser_class=Parser, required=True)
    for name, task in TASKS.items():
        sub = modes.add_parser(name, help=task.summary, description=f"{PROG} {name}: {task.summary}.", formatter_class=HelpFormatter)
        _add_options(sub, task)
    return parser


def _add_options(parser: Parser, task: type[Task]) -> None:
    defaults = task.defaults
    known = ", ".join(KNOWN_PRESETS[task.name])

    run = parser.add_argument_group("output and checkpoints")
    run.add_argument("--out", required=True, type=Path, metavar="DIR", help=f"output directory; the checkpoint is DIR/{loop.CHECKPOINT_NAME}")
    run.add_argument("--name", type=repository_name, metavar="NAME",
                     help="the model's name in a model repository, stored in the checkpoint for vit-export "
                     "(default: the data folder's name; none for the built-in images)")
    run.add_argument("--resume", action="store_true", help=f"continue from DIR/{loop.CHECKPOINT_NAME} if it exists")
    run.add_argument("--save-every", type=non_negative_int, default=0, metavar="N", help="also checkpoint every N steps; 0: at the end of each epoch")
    run.add_argument("--eval-every", type=non_negative_int, default=0, metavar="N", help="validate every N steps; 0: at the end of each epoch")
    run.add_argument("--progress", choices=progress.MODES, default="auto",
                     help="what to show while training: a live bar, plain lines (logs, runs side by side), nothing; auto: a bar on a terminal, else lines")
    run.add_argument("--quiet", action="store_true", help="the same as --progress off")

    data = parser.add_argument_group("data")
    data.add_argument("--data", default="synthetic", metavar="synthetic|DIR", help="the built-in images, or an image folder DIR/<class>/* (or DIR/train, DIR/val)")
    data.add_argument("--num-synthetic", type=positive_int, default=12000, metavar="N", help="size of the built-in dataset")
    data.add_argument("--val-fraction", type=fraction, default=0.2, metavar="F", help="share held out for validation (when the folder has no val/)")
    data.add_argument("--workers", type=non_negative_int, default=0, metavar="N", help="data-loading worker processes")
    data.add_argument("--hflip", action=argparse.BooleanOptionalAction,
                      help="random horizontal flips: only where a mirror image keeps its class (not digits or text) "
                      "(default: on for the built-in images, off for a folder)")

    model = parser.add_argument_group("model")
    model.add_argument("--preset", metavar="NAME",
                       help=f"model size, one of {known}; ignored with --init-from (default: {defaults['preset']} on the built-in "
                       "images; for a folder, a small model chosen from the data)")
    model.add_argument("--init-from", type=Path, metavar="CKPT",
                       help="start from this checkpoint: ours, timm, official MAE or Hugging Face (an MAE fine-tunes its encoder; "
                       "the head is replaced when the classes differ)")
    model.add_argument("--image-size", type=positive_int, metavar="PX",
                       help="input resolution (default: the preset's or checkpoint's; for a folder, from the images' size)")
    model.add_argument("--pooling", choices=("cls", "gap", "map"), help="pooling of the patch tokens (default: the preset's)")
    model.add_argument("--stem", choices=("linear", "conv"), help="patch embedding: linear projection or convolutional stem (default: the preset's)")

    task.add_options(parser.add_argument_group(f"{task.name} options"))

    demo = f"(default: on the built-in images %s; for a folder, from the data)"
    optimisation = parser.add_argument_group(
        "optimisation", "Unset, each is chosen by the recipe: the demo's values on the built-in images, values that\n"
        "follow the data for a folder (printed at the start, stored in the checkpoint and summary.json).")
    optimisation.add_argument("--epochs", type=positive_int, metavar="N", help="passes over the training set " + demo % defaults["epochs"])
    optimisation.add_argument("--max-steps", type=positive_int, metavar="N", help="stop after N optimizer steps when that comes first")
    optimisation.add_argument("--batch-size", type=positive_int, metavar="N", help="images per step and process, cut to the data " + demo % defaults["batch_size"])
    optimisation.add_argument("--lr", type=positive_float, help="peak learning rate (AdamW, warm-up then cosine) " + demo % defaults["lr"])
    optimisation.add_argument("--weight-decay", type=non_negative_float, metavar="W", help="AdamW decay of the weight matrices " + demo % defaults["weight_decay"])
    optimisation.add_argument("--warmup-steps", type=non_negative_int, metavar="N", help="linear warm-up length (default: 5%% of the steps)")
    optimisation.add_argument("--clip-grad", type=non_negative_float, default=1.0, metavar="NORM", help="max gradient norm (0 disables)")

    device = parser.add_argument_group("device")
    device.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    device.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto", help="mixed precision (auto: bf16/fp16 on CUDA, off on CPU)")
    device.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads for PyTorch (default: PyTorch's, one per core)")
    device.add_argument("--seed", type=int, default=0, metavar="N", help="data split, initialisation, augmentation and masking")


def parse_args(argv: list[str]) -> argparse.Namespace:
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = [DEFAULT_TASK, *argv]
    args = build_parser().parse_args(argv)
    if args.quiet:
        args.progress = "off"
    return args


def task_of(args: argparse.Namespace) -> Task:
    return TASKS[args.task](args)


def build_model(args: argparse.Namespace, data: DataSplits, loaded: LoadedCheckpoint | None) -> nn.Module:
    """The model `vit-train` would start training (fresh, or from --init-from), under the recipe it would choose."""
    task = task_of(args)
    task.recipe = loop.fresh_recipe(args, task, loaded)
    return task.build_model(data, loaded)


def run(args: argparse.Namespace) -> dict[str, Any]:
    return loop.run(args, task_of(args))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        summary = run(args)
    except (ConfigError, CheckpointError, OSError, ValueError) as error:  # DataError is a ValueError
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; '{PROG} {args.task} --out {args.out} --resume' continues from the last checkpoint", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
