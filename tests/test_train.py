import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.checkpoints import load_checkpoint
from model.data import SYNTHETIC_CLASSES
from model.presets import vit_preset
from model.train import build_model, main, parse_args
from model.vit import VisionTransformer

REPO = Path(__file__).resolve().parents[1]
# Small and quick: the test presets on 16x16 synthetic images.
QUICK = ["--image-size", "16", "--num-synthetic", "480", "--batch-size", "32", "--quiet"]
DEMO_AS_MAKE_TRAINS_IT = ["--threads", "1"]  # the Makefile trains the two demo models side by side, one thread each


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = VisionTransformer(vit_preset("vit-test", num_classes=4))
    images, labels = torch.randn(32, 3, 16, 16), torch.randint(0, 4, (32,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = F.cross_entropy(model(images), labels).item()
    for _ in range(30):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


def test_classifier_training_writes_checkpoint_metrics_and_plots(tmp_path):
    out = tmp_path / "run"
    assert main(["classifier", "--out", str(out), "--preset", "vit-test", "--epochs", "2", *QUICK]) == 0
    loaded = load_checkpoint(out / "checkpoint.pt")
    assert loaded.kind == "vit" and loaded.labels == SYNTHETIC_CLASSES
    assert loaded.step == 2 * (384 // 32)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    assert len(val) == 2 and 0.0 <= val[-1]["accuracy"] <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == loaded.step and "val_accuracy" in summary
    assert (out / "curves.png").stat().st_size > 1000


def test_mae_training_lowers_loss_and_saves_a_reconstruction_grid(tmp_path):
    out = tmp_path / "mae"
    assert main(["mae", "--out", str(out), "--preset", "mae-test", "--epochs", "3", "--lr", "3e-3", *QUICK]) == 0
    loaded = load_checkpoint(out / "checkpoint.pt")
    assert loaded.kind == "mae"
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in train if r["split"] == "train"]
    assert losses[-1] < losses[0]
    assert (out / "reconstructions.png").stat().st_size > 1000


class SimulatedCrash(Exception):
    pass


def test_resume_after_a_crash_continues_exactly_where_the_run_stopped(tmp_path, monkeypatch):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    common = ["classifier", "--preset", "vit-test", "--epochs", "2", "--warmup-steps", "3", "--save-every", "8", *QUICK]
    assert main([*common, "--out", str(straight)]) == 0

    clip = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def crash_at_step_22(*args, **kwargs):  # dies during step 22: after logging step 20, checkpoint at 16
        calls["n"] += 1
        if calls["n"] == 22:
            raise SimulatedCrash()
        return clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", crash_at_step_22)
    with pytest.raises(SimulatedCrash):
        main([*common, "--out", str(crashed)])
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    assert load_checkpoint(crashed / "checkpoint.pt").step == 16

    assert main([*common, "--out", str(crashed), "--resume"]) == 0
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(crashed / "checkpoint.pt")
    assert a.step == b.step == 24
    for (name, wa), wb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(wa, wb, msg=f"{name} differs after resuming")
    steps = [json.loads(line)["step"] for line in (crashed / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert steps == sorted(set(steps)) and steps[-1] == 24, "records after the checkpoint must not be duplicated"


def test_fine_tuning_starts_from_the_mae_encoder(tmp_path):
    mae_out = tmp_path / "mae"
    assert main(["mae", "--out", str(mae_out), "--preset", "mae-test", "--max-steps", "3", *QUICK]) == 0
    mae = load_checkpoint(mae_out / "checkpoint.pt")
    args = parse_args(["classifier", "--out", str(tmp_path / "ft"), "--init-from", str(mae_out / "checkpoint.pt"), "--pooling", "gap"])

    class Data:
        classes = SYNTHETIC_CLASSES

    model = build_model(args, Data, mae).eval()
    assert model.config.pooling == "gap" and model.config.num_classes == len(SYNTHETIC_CLASSES)
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model.forward_features(images), mae.model.encoder.forward_features(images))
    assert main(["classifier", "--out", str(tmp_path / "ft"), "--init-from", str(mae_out / "checkpoint.pt"), "--max-steps", "3", *QUICK]) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "vit-gigantic"], "unknown preset 'vit-gigantic'"),
        (["--preset", "vit-test", "--image-size", "18"], "does not divide image size 18x18"),
        (["--preset", "vit-test", "--data", "/nonexistent/images"], "/nonexistent/images"),
        (["--preset", "vit-test", "--init-from", "/nonexistent/ckpt.pt"], "/nonexistent/ckpt.pt"),
    ],
)
def test_bad_training_input_is_a_clear_error_not_a_traceback(tmp_path, capsys, argv, message):
    assert main(["classifier", "--out", str(tmp_path / "x"), "--num-synthetic", "120", "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_each_rank_gets_its_own_equal_shard_and_resume_skips_seen_samples():
    from model.distributed import DistContext, ShardedEpochSampler

    shards = [ShardedEpochSampler(10, DistContext(rank=r, world_size=2), seed=3) for r in range(2)]
    for sampler in shards:
        sampler.set_epoch(1)
    first, second = list(shards[0]), list(shards[1])
    assert len(first) == len(second) == 5 and not set(first) & set(second)
    shards[0].set_epoch(0)
    epoch0 = list(shards[0])
    assert epoch0 != first  # reshuffled per epoch
    shards[0].set_epoch(1, skip_samples=2)
    assert list(shards[0]) == first[2:] and len(shards[0]) == 3


def test_two_process_gloo_ddp_trains_and_only_rank0_writes(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "model.train", "classifier", "--out", str(out), "--preset", "vit-test", "--max-steps", "4", *QUICK]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(out / "checkpoint.pt").step == 4
    # one summary printed (rank 0), and one writer of the metrics log
    assert result.stdout.count('\n  "task": "classifier"') == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["split"], r["step"]) for r in records]
    assert keys and len(keys) == len(set(keys)), "a second process wrote to the metrics log"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "confusion.png", "curves.png", "metrics.jsonl", "summary.json"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_classifier_reaches_95_percent(tmp_path):
    assert main(["--out", str(tmp_path / "demo"), "--quiet", *DEMO_AS_MAKE_TRAINS_IT]) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["val_accuracy"] >= 0.95


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_mae_reconstructs_clearly_better_than_predicting_the_mean(tmp_path):
    assert main(["mae", "--out", str(tmp_path / "mae"), "--quiet", *DEMO_AS_MAKE_TRAINS_IT]) == 0
    summary = json.loads((tmp_path / "mae" / "summary.json").read_text())
    assert summary["val_loss"] < 0.5 * summary["val_baseline_loss"]
