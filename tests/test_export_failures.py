"""Every failure `vit-export` knows ends as `vit-export: error: ...` with exit status 2, never a traceback, and leaves
no half-written version. Each case runs the real command in its own process; where a failure cannot be produced by
input alone (a 2 GB model, a converter crash), one limit or function is replaced before the CLI's own main runs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.checkpoints import save_checkpoint
from model.presets import vit_preset
from model.vit import VisionTransformer
from modelrepo import versions

VIT_EXPORT = str(Path(sys.executable).with_name("vit-export"))

# Run export.cli.main in a fresh interpreter after one replacement (the prelude), exactly as the script would.
PATCHED_CLI = "import sys\n{prelude}\nfrom export.cli import main\nsys.exit(main(sys.argv[1:]))"

TIGHTEN_INT8 = "import export.variants as v; v.TOLERANCES['int8'].update(relative_max_abs_diff=1e-9)"
CRASH_FP16 = ("import export.pipeline as p\n"
              "def crash(src, dst): raise RuntimeError('converter bug: unsupported node')\n"
              "p.VARIANT_BUILDERS['fp16'] = (crash, p.VARIANT_BUILDERS['fp16'][1])")
# A small model, written with its weights in a sidecar file as torch.onnx does for big ones, against a 1000-byte limit.
TINY_FILE_LIMIT = ("import onnx, export.onnx_export as o\n"
                   "fold = o.fold_external_data\n"
                   "def with_sidecar(path):\n"
                   "    onnx.save(onnx.load(str(path)), str(path), save_as_external_data=True, location='weights.data', size_threshold=0)\n"
                   "    fold(path)\n"
                   "o.fold_external_data, o.MAX_SINGLE_FILE_BYTES = with_sidecar, 1000")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("failures") / "cls" / "checkpoint.pt"
    save_checkpoint(path, VisionTransformer(vit_preset("vit-test", num_classes=6)))
    return path


def run_export(args: list[str], prelude: str | None = None) -> subprocess.CompletedProcess:
    command = [VIT_EXPORT, *args] if prelude is None else [sys.executable, "-c", PATCHED_CLI.format(prelude=prelude), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("prelude, flags, message", [
    (TIGHTEN_INT8, ["--int8"], "vit-export: error: int8 variant: max abs diff"),
    (CRASH_FP16, ["--fp16"], "vit-export: error: fp16 variant could not be built: RuntimeError: converter bug"),
    (TINY_FILE_LIMIT, [], "too big for one .onnx file"),
    (None, ["--opset", "7"], "vit-export: error: opset 7 is not supported: this exporter writes opsets 18 to"),
], ids=["int8-outside-tolerance", "fp16-converter-crash", "model-too-large", "unsupported-opset"])
def test_a_known_export_failure_is_one_error_line_and_exit_2(tmp_path, checkpoint, prelude, flags, message):
    repo = tmp_path / "repo"
    result = run_export(["--checkpoint", str(checkpoint), "--repo", str(repo), "--name", "m", *flags], prelude)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert versions(repo, "m") == [] and not [p for p in repo.glob(".staging*")]
