"""`vit-train` as a user meets it: the installed command, its help, and its refusals."""
import subprocess
from pathlib import Path

import pytest

from model.train import parse_args

REPO = Path(__file__).resolve().parents[1]
VIT_TRAIN = REPO / ".venv" / "bin" / "vit-train"

pytestmark = pytest.mark.skipif(not VIT_TRAIN.exists(), reason="needs the installed command (make install)")


def vit_train(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "100", "HOME": str(cwd)}
    return subprocess.run([str(VIT_TRAIN), *argv], capture_output=True, text=True, timeout=180, cwd=cwd, env=env)


def flat(text: str) -> str:
    """Help text with its line wrapping undone, so assertions do not depend on the terminal width."""
    return " ".join(text.split())


def test_help_names_both_modes_and_the_default_one():
    result = vit_train("--help")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("usage: vit-train [-h] {classifier,mae} ...")
    assert "classifier" in out.split("modes:")[1] and "masked autoencoder" in out.split("modes:")[1]
    assert "'vit-train --out DIR ...' means 'vit-train classifier --out DIR ...'" in flat(out)
    assert "vit-train mae --out runs/demo-mae" in out  # an example per mode


def test_mae_help_lists_its_own_options_in_groups_with_defaults():
    result = vit_train("mae", "--help")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("usage: vit-train mae ")
    for heading in ("output and checkpoints:", "data:", "model:", "mae options:", "optimisation:", "device:"):
        assert f"\n{heading}\n" in out, heading
    mae_options = flat(out.split("mae options:")[1].split("optimisation:")[0])
    assert "--mask-ratio F share of patches hidden from the encoder (default: 0.75)" in mae_options
    assert "--norm-pix-loss" in mae_options
    assert "(default: mae-demo on the built-in images; for a folder, a small model chosen from the data)" in flat(out)
    assert "--label-smoothing" not in out


def test_classifier_help_shows_the_demo_defaults():
    out = flat(vit_train("classifier", "--help").stdout)
    assert "(default: vit-demo on the built-in images" in out and "--label-smoothing" in out and "--mask-ratio" not in out
    assert "(default: on the built-in images 0.002; for a folder, from the data)" in out  # --lr
    assert "(default: synthetic)" in out


def test_a_missing_data_folder_is_one_error_line_and_exit_2(tmp_path):
    result = vit_train("--out", str(tmp_path / "run"), "--data", str(tmp_path / "no-such-images"), "--preset", "vit-test", "--quiet")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"vit-train: error: dataset path {tmp_path / 'no-such-images'} does not exist"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--out", "x", "--epochs", "0"], "vit-train: error: argument --epochs: must be > 0, got 0"),
        (["mae", "--out", "x", "--mask-ratio", "1"], "vit-train: error: argument --mask-ratio: must be >= 0 and < 1, got 1"),
        (["mae", "--out", "x", "--label-smoothing", "0.1"], "vit-train: error: unrecognized arguments: --label-smoothing 0.1"),
        (["--out", "x", "--lr", "fast"], "vit-train: error: argument --lr: expected a number, got 'fast'"),
        (["classify", "--out", "x"], "vit-train: error: argument task: invalid choice: 'classify'"),
        (["mae"], "vit-train: error: the following arguments are required: --out"),
    ],
)
def test_a_bad_flag_is_a_usage_error_not_a_traceback(tmp_path, argv, message):
    result = vit_train(*argv, cwd=tmp_path)
    assert result.returncode == 2
    assert message in flat(result.stderr) and result.stderr.startswith("usage: vit-train")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_no_mode_means_classifier():
    assert parse_args(["--out", "d"]).task == "classifier"
    assert parse_args(["mae", "--out", "d"]).task == "mae"
    assert parse_args(["--out", "d"]).preset is None  # the recipe decides: vit-demo on the built-in images


def test_progress_lines_name_the_run_and_report_each_validation(tmp_path):
    result = vit_train("mae", "--out", str(tmp_path / "mae"), "--preset", "mae-test", "--image-size", "16", "--num-synthetic", "240",
                       "--batch-size", "32", "--epochs", "2", "--progress", "lines", "--threads", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("mae: ") for line in lines), lines  # runs side by side stay apart
    assert "1 thread;" in lines[0] and "12 steps of 32" in lines[0]
    validations = [line for line in lines if "val loss" in line]
    assert len(validations) == 2 and "val baseline_loss" in validations[-1] and "step 12/12" in validations[-1]
    assert '"task": "mae"' in result.stdout
