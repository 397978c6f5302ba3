"""The recipe `vit-train` chooses for a user's own small image folder, and each of its pieces in a few steps.

The accuracy targets (the default recipe against the classical baseline, MAE against scratch on 10% of the
labels) are measured by bench/train_recipes.py (`make bench-train`), not here.
"""
import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from image_folders import digits_folder, lfw_folder
from model.checkpoints import load_checkpoint
from model.data import DataSurvey
from model.ema import WeightAverage
from model.mixing import Mixing, cutmix, soft_targets
from model.optim import build_optimizer
from model.presets import vit_preset
from model.randaugment import OPERATIONS, RandAugment
from model.recipe import STEP_FLOOR, choose_recipe
from model.tasks import ClassifierTask, MAETask
from model.train import main
from model.vit import VisionTransformer

FAST = ["--quiet", "--threads", "1"]


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """The new user's folder: 3 classes x 20 images (digits 0-2, 8x8)."""
    return digits_folder(tmp_path_factory.mktemp("data") / "my-digits", classes=3, per_class=20)


def recipe_for(train_images: int, task=ClassifierTask, typical=(25, 25), init_kind=None, **flags):
    names = ("preset", "image_size", "stem", "batch_size", "lr", "weight_decay", "epochs", "max_steps", "warmup_steps",
             "hflip", "randaugment", "magnitude", "mixup", "cutmix", "mix_prob", "label_smoothing", "drop_path", "ema", "layer_decay",
             "norm_pix_loss")
    args = argparse.Namespace(**{name: flags.get(name) for name in names})
    source = "synthetic" if typical is None else "/data/mine"
    survey = DataSurvey(source, train_images, ["a", "b"], typical)
    return choose_recipe(args, task.name, task.defaults, survey, init_kind, 32 if init_kind else None)


# --- the recipe ----------------------------------------------------------------------------------------------

def test_a_small_folder_gets_a_smaller_batch_a_rate_scaled_with_it_and_the_step_floor():
    small, large = recipe_for(160), recipe_for(50_000, typical=(200, 300))
    assert small.batch_size == 16 and large.batch_size == 64
    assert small.lr == pytest.approx(large.lr * (16 / 64) ** 0.5)
    assert small.steps == STEP_FLOOR  # 10 steps per pass: the floor, not 100 passes of 10
    assert large.steps > small.steps and large.image_size == 128 and small.image_size == 32
    assert small.stem == "conv" and small.ema_decay > 0.9 and small.mixup > 0 and small.drop_path > 0
    assert not small.hflip and recipe_for(160, hflip=True).hflip  # flips only on request
    assert any("typically 25x25" in line for line in small.why)


def test_flags_win_over_the_data_and_the_built_in_images_keep_the_demo_recipe():
    mine = recipe_for(160, batch_size=32, lr=1e-4, epochs=3, mixup=0.0, ema=0.0, preset="vit-test")
    assert (mine.batch_size, mine.lr, mine.steps, mine.mixup, mine.ema_decay, mine.preset) == (32, 1e-4, 15, 0.0, 0.0, "vit-test")
    demo = recipe_for(9600, typical=None)
    assert (demo.preset, demo.batch_size, demo.lr, demo.steps, demo.augment) == ("vit-demo", 64, 2e-3, 300, "shift")
    assert demo.ema_decay == 0 and demo.mixup == 0 and demo.drop_path == 0 and demo.randaugment_ops == 0
    mae = recipe_for(9600, task=MAETask, typical=None)
    assert (mae.preset, mae.batch_size, mae.steps) == ("mae-demo", 16, 1800)


def test_fine_tuning_an_mae_gets_layer_wise_decay_and_keeps_its_input_size():
    recipe = recipe_for(160, init_kind="mae")
    assert recipe.layer_decay < 1 and recipe.preset is None and recipe.image_size == 32 and recipe.stem is None
    assert recipe_for(160, init_kind="vit").layer_decay == 1.0


def test_an_mae_on_a_folder_keeps_the_linear_stem_and_an_8x8_patch_grid():
    recipe = recipe_for(1400, task=MAETask, typical=(64, 64))
    assert recipe.preset == "mae-compact" and recipe.stem is None and recipe.image_size == 64 and recipe.patch_size == 8
    assert recipe.mixup == 0 and recipe.ema_decay == 0 and recipe.label_smoothing == 0
    assert recipe.norm_pix_loss and not recipe_for(1400, task=MAETask, typical=(64, 64), norm_pix_loss=False).norm_pix_loss
    assert not recipe_for(9600, task=MAETask, typical=None).norm_pix_loss  # the demo MAE keeps raw targets


# --- the run a new user tries ----------------------------------------------------------------------------------

def test_a_small_folder_trains_says_what_it_chose_and_writes_the_report(tmp_path, small_folder, capsys):
    out = tmp_path / "run"
    assert main(["--data", str(small_folder), "--out", str(out), "--epochs", "2", "--progress", "lines", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "recipe: input 32x32: the images are typically 8x8" in err
    assert "recipe: model vit-demo with 8px patches (48 training images" in err
    assert "recipe: batch 8 for 48 training images per process" in err and "12 steps of 8" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"]["batch_size"] == 8 and summary["steps"] == 12
    assert summary["best_val_accuracy"] >= summary["val_accuracy"] >= 0
    assert set(summary["val_per_class_accuracy"]) == {"0", "1", "2"}
    assert np.array(summary["confusion_matrix"]).sum() == 12  # every validation image once
    assert (out / "confusion.png").stat().st_size > 1000
    loaded = load_checkpoint(out / "checkpoint.pt")
    assert loaded.training["recipe"] == summary["recipe"] and loaded.training["name"] == "my-digits"
    assert loaded.training["data"]["source"] == str(small_folder.resolve())


def test_a_batch_larger_than_the_data_is_cut_to_it(tmp_path, small_folder, capsys):
    assert main(["--data", str(small_folder), "--out", str(tmp_path / "run"), "--batch-size", "128", "--max-steps", "2",
                 "--progress", "lines", "--threads", "1"]) == 0
    assert "recipe: batch 128 cut to 48: the training images of one process" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--init-from", "/nonexistent/ckpt.pt"], "/nonexistent/ckpt.pt"),
    (["--preset", "vit-gigantic"], "unknown preset"),
    (["--image-size", "18", "--preset", "vit-test"], "does not divide"),
])
def test_a_refused_run_leaves_no_output_directory(tmp_path, small_folder, capsys, argv, message):
    out = tmp_path / "run"
    assert main(["--data", str(small_folder), "--out", str(out), *FAST, *argv]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_the_weight_average_is_what_the_checkpoint_keeps_and_a_resume_continues_from_the_raw_weights(tmp_path, small_folder):
    out = tmp_path / "run"
    assert main(["--data", str(small_folder), "--out", str(out), "--max-steps", "6", *FAST]) == 0
    loaded = load_checkpoint(out / "checkpoint.pt")
    raw = loaded.training["raw_model"]
    saved = loaded.model.state_dict()
    assert loaded.training["average"]["count"] == 6
    assert any(not torch.equal(saved[k], raw[k]) for k in raw if saved[k].is_floating_point())
    assert main(["--data", str(small_folder), "--out", str(out), "--resume", *FAST]) == 0  # nothing left to do: loads and stops
    assert json.loads((out / "summary.json").read_text())["steps"] == 6


def test_the_baseline_reports_linear_models_on_the_raw_pixels_of_the_same_split(tmp_path):
    pytest.importorskip("sklearn")
    data = lfw_folder(tmp_path / "lfw")
    out = tmp_path / "run"
    assert main(["--data", str(data), "--out", str(out), "--max-steps", "2", "--baseline", *FAST]) == 0
    baseline = json.loads((out / "summary.json").read_text())["baseline"]
    assert baseline["train_images"] == 160 and baseline["val_images"] == 40 and baseline["features"] == 32 * 32  # grey: one channel
    assert min(baseline["val_accuracy"].values()) > 0.8  # faces against non-faces are nearly linearly separable


# --- the pieces ------------------------------------------------------------------------------------------------------

def test_every_randaugment_operation_keeps_the_image_size_and_repeats_under_a_seed():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8))
    for name, operation in OPERATIONS.items():
        for level in (-1.0, 0.5):
            result = operation(image, level)
            assert result.size == image.size and result.mode == "RGB", name
    augment = RandAugment(num_ops=2, magnitude=9)
    first = np.asarray(augment(image, torch.Generator().manual_seed(3)))
    assert np.array_equal(first, np.asarray(augment(image, torch.Generator().manual_seed(3))))
    assert not np.array_equal(np.asarray(OPERATIONS["rotate"](image, 1.0)), np.asarray(image))
    with pytest.raises(ValueError):
        RandAugment(2, 11)


def test_mixup_and_cutmix_mix_targets_in_the_proportion_they_mix_pixels():
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 3])
    targets = soft_targets(labels, 4, smoothing=0.1)
    assert torch.allclose(targets.sum(dim=1), torch.ones(4)) and targets[0, 0] == pytest.approx(0.925)
    images = torch.zeros(4, 3, 8, 8)
    images[2:] = 1.0  # the reversed batch pairs a zero image with a one image
    mixed, mixed_targets = Mixing(mixup_alpha=1.0)(images, labels, 4, 0.0)
    lam = 1 - mixed[0].mean().item()
    assert mixed_targets[0, 0] == pytest.approx(lam, abs=1e-5) and mixed_targets[0, 3] == pytest.approx(1 - lam, abs=1e-5)
    pasted, kept = cutmix(images, images.flip(0), lam=0.75)
    assert 1 - pasted[0].mean().item() == pytest.approx(kept)  # the share of pixels kept is the target's weight
    unmixed, _ = Mixing(mixup_alpha=1.0, prob=0.0)(images, labels, 4, 0.0)
    assert torch.equal(unmixed, images)


def test_stochastic_depth_rises_with_depth_drops_whole_samples_in_training_and_never_in_evaluation():
    torch.manual_seed(0)
    model = VisionTransformer(vit_preset("vit-test", num_classes=3).replace(depth=3))
    images = torch.randn(64, 3, 16, 16)
    expected = model.eval()(images)
    model.set_drop_path(0.5)
    assert [block.drop_path.rate for block in model.blocks] == [0.0, 0.25, 0.5]
    assert torch.equal(model.eval()(images), expected)
    branch = torch.ones(64, 5, 4)
    dropped = model.blocks[2].drop_path.train()(branch)
    per_sample = dropped[:, 0, 0]
    assert set(per_sample.unique().tolist()) == {0.0, 2.0} and 10 < (per_sample == 0).sum() < 54


def test_layer_wise_decay_gives_lower_blocks_smaller_rates():
    model = VisionTransformer(vit_preset("vit-test", num_classes=3))  # 2 blocks
    optimizer = build_optimizer(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    rate_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert rate_of[id(model.head.weight)] == 1.0
    assert rate_of[id(model.blocks[1].mlp.fc1.weight)] == 0.5 and rate_of[id(model.blocks[0].mlp.fc1.weight)] == 0.25
    assert rate_of[id(model.pos_embed)] == 0.125
    assert len(build_optimizer(model, 1.0, 0.05).param_groups) == 2  # without decay: decayed and undecayed, as before


def test_the_weight_average_warms_up_then_trails_the_weights():
    model = torch.nn.Linear(2, 1, bias=False)
    average = WeightAverage(model, decay=0.99)
    with torch.no_grad():
        model.weight.fill_(0.0)
        average.update(model)  # the first update copies
        model.weight.fill_(1.0)
        average.update(model)  # warm-up decay (1 + 1) / (10 + 1)
    assert average.model.weight[0, 0].item() == pytest.approx(1 - 2 / 11)


# --- --init-from: every format load_checkpoint reads ------------------------------------------------------------------

def write_timm(path):
    from test_checkpoints import timm_state
    torch.save(timm_state(dim=192, depth=1, num_classes=5), path / "timm.pth")  # width 192: ViT-Tiny's 3 heads
    return path / "timm.pth", "loaded a ViT (timm checkpoint)", "initialised fresh: the head (5 classes in the checkpoint, 3 here)"


def write_official_mae(path):
    from test_checkpoints import mae_state
    torch.save({"model": mae_state(dim=192, depth=1)}, path / "mae_pretrain.pth")
    return path / "mae_pretrain.pth", "loaded the MAE's encoder (mae checkpoint)", "initialised fresh: the head (3 classes)"


def write_hugging_face(path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                    image_size=16, patch_size=4, num_labels=3)
    transformers.ViTForImageClassification(config).save_pretrained(path / "hf")
    return path / "hf", "loaded a ViT (hf checkpoint)", ", head"  # three classes there and here: the head is kept


@pytest.mark.parametrize("write", [write_timm, write_official_mae, write_hugging_face], ids=["timm", "official-mae", "hugging-face"])
def test_init_from_any_importable_checkpoint_says_what_it_loaded_and_what_starts_fresh(tmp_path, small_folder, capsys, write):
    checkpoint, loaded_note, fresh_note = write(tmp_path)
    out = tmp_path / "run"
    assert main(["--data", str(small_folder), "--out", str(out), "--init-from", str(checkpoint), "--image-size", "32",
                 "--max-steps", "2", "--progress", "lines", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert f"init: {loaded_note}" in err and fresh_note in err
    assert "init: position embeddings resized from a 4x4 to a 8x8 patch grid (32x32 input)" in err
    model = load_checkpoint(out / "checkpoint.pt").model
    assert model.config.num_classes == 3 and model.config.image_size == (32, 32)


def test_init_from_keeps_the_checkpoints_input_size_unless_told(tmp_path, small_folder, capsys):
    checkpoint, _, _ = write_timm(tmp_path)
    assert main(["--data", str(small_folder), "--out", str(tmp_path / "run"), "--init-from", str(checkpoint), "--max-steps", "1",
                 "--progress", "lines", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "recipe: input 16x16: the size the --init-from checkpoint was trained at" in err and "position embeddings resized" not in err


# --- vit-export after a folder run ---------------------------------------------------------------------------------------

def test_export_names_the_model_from_the_checkpoint_and_checks_it_on_its_own_validation_images(tmp_path, small_folder):
    from export.cli import main as export_main
    from export.pipeline import load_real_images
    from model.data import load_dataset
    from model.transforms import EvalTransform

    out = tmp_path / "run"
    assert main(["--data", str(small_folder), "--out", str(out), "--max-steps", "2", *FAST]) == 0
    training = load_checkpoint(out / "checkpoint.pt").training
    images = load_real_images(None, (32, 32), training)
    val = load_dataset(str(small_folder), 32, augment=False).val
    transform = EvalTransform(32, val.transform.mean, val.transform.std)
    own = np.stack([transform.pixels(val.raw_item(i, transform.decode_target)[0]) for i in range(len(val))])
    assert len(images) == len(own) == 12 and {im.tobytes() for im in images} == {im.tobytes() for im in own}

    repo = tmp_path / "repo"
    assert export_main(["--checkpoint", str(out / "checkpoint.pt"), "--repo", str(repo)]) == 0
    assert (repo / "my-digits" / "1" / "vitserve.json").is_file()  # the data folder's name, not the output directory's ("run")
    assert export_main(["--checkpoint", str(out / "checkpoint.pt"), "--repo", str(repo), "--name", "mine"]) == 0
    assert (repo / "mine" / "1").is_dir()


def test_an_explicit_training_name_travels_to_the_export_and_a_bad_one_is_refused_at_once(tmp_path, small_folder, capsys):
    from export.cli import main as export_main

    with pytest.raises(SystemExit):
        main(["--data", str(small_folder), "--out", str(tmp_path / "bad"), "--name", "no spaces", *FAST])
    assert "model name 'no spaces'" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    out = tmp_path / "run"
    assert main(["--data", str(small_folder), "--out", str(out), "--max-steps", "1", "--name", "digit-reader", *FAST]) == 0
    assert export_main(["--checkpoint", str(out / "checkpoint.pt"), "--repo", str(tmp_path / "repo")]) == 0
    assert (tmp_path / "repo" / "digit-reader" / "1").is_dir()


def test_the_progress_bar_shows_the_latest_validation_not_the_first():
    from model.progress import Progress

    progress = Progress("bar", "classifier", total_steps=4, start_step=0)
    for step, val in ((2, {"loss": 2.0}), (4, {"loss": 0.5})):
        progress.step(step - 1, 1.0, {})
        progress.step(step, 1.0, {})
        progress.validated(step, val)
    assert "val_loss=0.5000" in progress.bar.postfix
    progress.close()


def test_mae_pre_training_on_a_folder_then_fine_tuning_its_encoder_with_layer_wise_decay(tmp_path, small_folder, capsys):
    mae_out, ft_out = tmp_path / "mae", tmp_path / "ft"
    assert main(["mae", "--data", str(small_folder), "--out", str(mae_out), "--max-steps", "2", *FAST]) == 0
    mae_summary = json.loads((mae_out / "summary.json").read_text())
    assert mae_summary["recipe"]["patch_size"] == 4 and mae_summary["recipe"]["image_size"] == 32
    assert load_checkpoint(mae_out / "checkpoint.pt").training["name"] == "my-digits-mae"
    capsys.readouterr()
    assert main(["--data", str(small_folder), "--init-from", str(mae_out / "checkpoint.pt"), "--out", str(ft_out),
                 "--max-steps", "2", "--progress", "lines", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "init: loaded the MAE's encoder (vitserve checkpoint, step 2)" in err and "layer-wise rate decay 0.75" in err
    assert json.loads((ft_out / "summary.json").read_text())["recipe"]["layer_decay"] == 0.75
