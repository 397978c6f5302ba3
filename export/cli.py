"""`vit-export`: a checkpoint (ours, timm, official MAE or Hugging Face) -> ONNX graphs in a model repository."""
from __future__ import annotations

import argparse
import json
import logging
import warnings
import sys
from pathlib import Path

from model.checkpoints import CheckpointError
from model.presets import ConfigError

from modelrepo import RepositoryError

from .errors import ExportError
from .onnx_export import DEFAULT_OPSET
from .pipeline import ExportRequest, export_checkpoint

# Every failure the export knows: its own, and those of the checkpoint and repository layers below it.
EXPORT_ERRORS = (CheckpointError, ConfigError, RepositoryError, ExportError)
INT8_METHODS = ("dynamic", "static")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vit-export",
        description="Export a checkpoint to ONNX, check it against PyTorch and write it into a model repository. "
        "A classifier gives one graph; an MAE gives an embedder and a reconstructor.",
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint file, or a Hugging Face model directory")
    parser.add_argument("--repo", required=True, type=Path, help="model repository directory (created if absent)")
    parser.add_argument("--source", default="auto", choices=("auto", "vitserve", "timm", "mae", "hf"))
    parser.add_argument("--preset", help="fills in what foreign weights do not reveal (heads, pooling)")
    parser.add_argument("--name", help="model name in the repository (default: the name vit-train stored in the checkpoint, "
                        "its data folder's; else from the checkpoint's path)")
    parser.add_argument("--image-size", type=int, help="export for another input size (position embeddings resized)")
    parser.add_argument("--int8", action="append", nargs="?", const="dynamic", choices=INT8_METHODS, default=[],
                        metavar="{dynamic,static}",
                        help="also write an int8 CPU variant: dynamic (the default; model.int8.onnx) quantises activations "
                        "at run time; static (model.int8-static.onnx) calibrates them at export on real images: the "
                        "checkpoint's own training images when vit-train recorded them, else --images. Repeat for both")
    parser.add_argument("--fp16", action="store_true", help="also write a half-precision variant for CUDA")
    parser.add_argument("--images", type=Path, help="folder of real images for the checks (default: the checkpoint's own "
                        "validation images when vit-train recorded them, else built-in synthetic images) and, when the "
                        "checkpoint does not record its training images, for static int8 calibration")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--max-batch-size", type=int, default=64, help="max_batch_size written to Triton's config.pbtxt")
    parser.add_argument("--num-heads", type=int, help="attention heads, for foreign weights of a non-standard width")
    parser.add_argument("--pooling", choices=("cls", "gap", "map"), help="pooling, for foreign weights")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # torch.onnx warns about every torchvision op it cannot register; we use none of them.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's own deprecation notices, not the user's
    overrides = {k: v for k, v in (("num_heads", args.num_heads), ("pooling", args.pooling)) if v is not None}
    request = ExportRequest(
        checkpoint=args.checkpoint, repo=args.repo, source=args.source, preset=args.preset, name=args.name,
        image_size=args.image_size, int8="dynamic" in args.int8, int8_static="static" in args.int8, fp16=args.fp16,
        images=args.images, opset=args.opset,
        max_batch_size=args.max_batch_size, overrides=overrides,
    )
    try:
        written = export_checkpoint(request)
    except EXPORT_ERRORS as error:
        print(f"vit-export: error: {error}", file=sys.stderr)
        return 2
    summary = [
        {"name": w.name, "version": w.version, "task": w.metadata.task, "path": str(w.path),
         "variants": {kind: dict(v.max_abs_diff_vs_torch or v.agreement_vs_fp32 or {}) for kind, v in w.metadata.variants.items()}}
        for w in written
    ]
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
