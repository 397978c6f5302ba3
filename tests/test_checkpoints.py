"""Checkpoints: our format round-trips exactly; imported timm / official MAE / Hugging Face
weights give the outputs of the original implementation; bad inputs fail with a named problem.

Most timm and official-MAE parity checks compare against a small functional forward written
here directly against their key layout (conv patch embedding, fused qkv attention, ...),
independent of our model code. Real timm models are checked too: `make venv` installs timm
without its dependencies, and a stand-in for the torchvision names it imports
(tests/torchvision_standin.py) lets it import where torchvision cannot.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torchvision_standin import standin_modules

from model.checkpoints import (
    IMAGENET_MEAN,
    CheckpointError,
    LoadedCheckpoint,
    detect_source,
    import_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from model.mae import MaskedAutoencoder
from model.presets import mae_preset, vit_preset
from model.vit import VisionTransformer

TOL = 1e-4


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- random weights in the foreign (timm / official MAE) layout ----------------------------------

def _linear(gen, out_dim, in_dim, bias=True, prefix=""):
    # Default-init scale keeps activations O(1), so a wrong pixel or head order shows clearly.
    state = {f"{prefix}.weight": torch.randn(out_dim, in_dim, generator=gen) / math.sqrt(in_dim)}
    if bias:
        state[f"{prefix}.bias"] = 0.1 * torch.randn(out_dim, generator=gen)
    return state


def _norm(gen, dim, prefix):
    return {f"{prefix}.weight": 1 + 0.1 * torch.randn(dim, generator=gen), f"{prefix}.bias": 0.1 * torch.randn(dim, generator=gen)}


def _block(gen, prefix, dim, hidden, qkv_bias=True):
    return {
        **_norm(gen, dim, f"{prefix}.norm1"),
        **_linear(gen, 3 * dim, dim, qkv_bias, f"{prefix}.attn.qkv"),
        **_linear(gen, dim, dim, True, f"{prefix}.attn.proj"),
        **_norm(gen, dim, f"{prefix}.norm2"),
        **_linear(gen, hidden, dim, True, f"{prefix}.mlp.fc1"),
        **_linear(gen, dim, hidden, True, f"{prefix}.mlp.fc2"),
    }


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights at default-init scale, so every parameter (and its layout) matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen))
            elif param.ndim >= 2 and "embed" not in name.split(".")[-1] and "token" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param[0].numel()))
            else:
                param.copy_(0.5 * torch.randn(param.shape, generator=gen))


def timm_state(dim=32, depth=2, patch=4, grid=(4, 4), in_chans=3, mlp_ratio=2, num_classes=5,
               class_token=True, embed_class=True, fc_norm=False, qkv_bias=True, seed=0):
    """A timm VisionTransformer state dict with random weights."""
    gen = torch.Generator().manual_seed(seed)
    patches = grid[0] * grid[1]
    state = {
        "patch_embed.proj.weight": torch.randn(dim, in_chans, patch, patch, generator=gen) / math.sqrt(in_chans * patch * patch),
        "patch_embed.proj.bias": 0.1 * torch.randn(dim, generator=gen),
        "pos_embed": 0.5 * torch.randn(1, patches + int(class_token and embed_class), dim, generator=gen),
    }
    if class_token:
        state["cls_token"] = torch.randn(1, 1, dim, generator=gen)
    for i in range(depth):
        state.update(_block(gen, f"blocks.{i}", dim, dim * mlp_ratio, qkv_bias))
    state.update(_norm(gen, dim, "fc_norm" if fc_norm else "norm"))
    if num_classes:
        state.update(_linear(gen, num_classes, dim, True, "head"))
    return state


def mae_state(dim=32, depth=2, patch=4, grid=4, decoder_dim=16, decoder_depth=1, mlp_ratio=4, seed=0):
    """An official MAE (models_mae.py) state dict with encoder and decoder, random weights."""
    gen = torch.Generator().manual_seed(seed + 1)
    state = timm_state(dim, depth, patch, (grid, grid), mlp_ratio=mlp_ratio, num_classes=0, seed=seed)
    state.update(_linear(gen, decoder_dim, dim, True, "decoder_embed"))
    state["mask_token"] = torch.randn(1, 1, decoder_dim, generator=gen)
    state["decoder_pos_embed"] = 0.5 * torch.randn(1, grid * grid + 1, decoder_dim, generator=gen)
    for i in range(decoder_depth):
        state.update(_block(gen, f"decoder_blocks.{i}", decoder_dim, decoder_dim * mlp_ratio))
    state.update(_norm(gen, decoder_dim, "decoder_norm"))
    state.update(_linear(gen, patch * patch * 3, decoder_dim, True, "decoder_pred"))
    return state


# --- reference forwards written against the foreign layout ---------------------------------------

def ref_norm(x, sd, prefix, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps)


def ref_block(x, sd, prefix, heads, eps):
    batch, tokens, dim = x.shape
    qkv = F.linear(ref_norm(x, sd, f"{prefix}.norm1", eps), sd[f"{prefix}.attn.qkv.weight"], sd.get(f"{prefix}.attn.qkv.bias"))
    q, k, v = qkv.reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-2, -1) * (dim // heads) ** -0.5).softmax(dim=-1)
    x = x + F.linear((weights @ v).transpose(1, 2).reshape(batch, tokens, dim), sd[f"{prefix}.attn.proj.weight"], sd[f"{prefix}.attn.proj.bias"])
    hidden = F.gelu(F.linear(ref_norm(x, sd, f"{prefix}.norm2", eps), sd[f"{prefix}.mlp.fc1.weight"], sd[f"{prefix}.mlp.fc1.bias"]))
    return x + F.linear(hidden, sd[f"{prefix}.mlp.fc2.weight"], sd[f"{prefix}.mlp.fc2.bias"])


def ref_patch_embed(images, sd):
    weight = sd["patch_embed.proj.weight"]
    return F.conv2d(images, weight, sd["patch_embed.proj.bias"], stride=weight.shape[-1]).flatten(2).transpose(1, 2)


def ref_blocks(x, sd, prefix, heads, eps):
    depth = len({key.split(".")[1] for key in sd if key.startswith(f"{prefix}.")})
    for i in range(depth):
        x = ref_block(x, sd, f"{prefix}.{i}", heads, eps)
    return x


def ref_timm_forward(sd, images, heads, pool="token", eps=1e-6):
    """timm VisionTransformer.forward: embed, blocks, norm, pool, fc_norm, head."""
    x = ref_patch_embed(images, sd)
    batch, prefix = x.shape[0], int("cls_token" in sd)
    pos = sd["pos_embed"]
    if prefix and pos.shape[1] == x.shape[1] + 1:
        x = torch.cat([sd["cls_token"].expand(batch, -1, -1), x], dim=1) + pos
    else:  # no class token, or no_embed_class: positions for the patches only
        x = x + pos
        if prefix:
            x = torch.cat([sd["cls_token"].expand(batch, -1, -1), x], dim=1)
    x = ref_blocks(x, sd, "blocks", heads, eps)
    if "norm.weight" in sd:
        x = ref_norm(x, sd, "norm", eps)
    pooled = x[:, prefix:].mean(dim=1) if pool == "avg" else x[:, 0]
    if "fc_norm.weight" in sd:
        pooled = ref_norm(pooled, sd, "fc_norm", eps)
    return F.linear(pooled, sd["head.weight"], sd["head.bias"]) if "head.weight" in sd else pooled


def ref_mae_forward(sd, images, noise, heads, decoder_heads, mask_ratio=0.75, norm_pix_loss=False, eps=1e-6):
    """The official models_mae.py forward: masking by argsort(noise), encoder, decoder, masked MSE."""
    x = ref_patch_embed(images, sd) + sd["pos_embed"][:, 1:]
    batch, length, dim = x.shape
    keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, dim))
    mask = torch.ones(batch, length)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls = (sd["cls_token"] + sd["pos_embed"][:, :1]).expand(batch, -1, -1)
    x = ref_norm(ref_blocks(torch.cat([cls, x], dim=1), sd, "blocks", heads, eps), sd, "norm", eps)

    x = F.linear(x, sd["decoder_embed.weight"], sd["decoder_embed.bias"])
    mask_tokens = sd["mask_token"].repeat(batch, length + 1 - x.shape[1], 1)
    x_ = torch.gather(torch.cat([x[:, 1:], mask_tokens], dim=1), 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1], x_], dim=1) + sd["decoder_pos_embed"]
    x = ref_norm(ref_blocks(x, sd, "decoder_blocks", decoder_heads, eps), sd, "decoder_norm", eps)
    pred = F.linear(x, sd["decoder_pred.weight"], sd["decoder_pred.bias"])[:, 1:]

    p = sd["patch_embed.proj.weight"].shape[-1]
    c, h, w = images.shape[1], images.shape[2] // p, images.shape[3] // p
    target = torch.einsum("nchpwq->nhwpqc", images.reshape(batch, c, h, p, w, p)).reshape(batch, h * w, p * p * c)
    if norm_pix_loss:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum(), pred, mask


# --- our own format ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "changes",
    [dict(pooling="cls"), dict(pooling="gap", fc_norm=True), dict(pooling="map"), dict(stem="conv", pooling="gap", class_token=False)],
    ids=["cls", "gap", "map", "conv-stem"],
)
def test_vit_round_trip_is_exact(tmp_path, changes):
    torch.manual_seed(0)
    model = VisionTransformer(vit_preset("vit-test", num_classes=3, **changes)).eval()
    labels, mean, std = ["cat", "dog", "fox"], (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    save_checkpoint(tmp_path / "vit.pt", model, labels=labels, mean=mean, std=std, step=42, training={"epoch": 3})

    loaded = load_checkpoint(tmp_path / "vit.pt")
    images = torch.randn(2, 3, 16, 16)
    assert isinstance(loaded.model, VisionTransformer) and not loaded.model.training
    assert loaded.model.config == model.config
    assert torch.equal(loaded.model(images), model(images))
    assert (loaded.kind, loaded.source, loaded.labels, loaded.mean, loaded.std, loaded.step, loaded.training) == (
        "vit", "vitserve", labels, mean, std, 42, {"epoch": 3})


def test_mae_round_trip_is_exact_and_keeps_training_state(tmp_path):
    torch.manual_seed(0)
    model = MaskedAutoencoder(mae_preset("mae-test", norm_pix_loss=True, mask_ratio=0.5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.randn(2, 3, 16, 16))[0].backward()
    optimizer.step()
    scheduler.step()
    training = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()}
    save_checkpoint(tmp_path / "mae.pt", model.eval(), step=7, training=training)

    raw = torch.load(tmp_path / "mae.pt", weights_only=True)  # only primitives, tensors, lists and dicts
    assert raw["format"] == "vitserve" and raw["kind"] == "mae"
    loaded = load_checkpoint(tmp_path / "mae.pt")
    images, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    assert loaded.kind == "mae" and loaded.model.config == model.config and loaded.step == 7
    for ours, theirs in zip(loaded.model(images, noise), model(images, noise)):
        assert torch.equal(ours, theirs)
    assert loaded.labels is None and loaded.mean == IMAGENET_MEAN
    restored = torch.optim.AdamW(loaded.model.parameters(), lr=1e-3)
    restored.load_state_dict(loaded.training["optimizer"])
    assert loaded.training["scheduler"]["last_epoch"] == 1


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    model = VisionTransformer(vit_preset("vit-test"))
    save_checkpoint(tmp_path / "run" / "ckpt.pt", model)
    save_checkpoint(tmp_path / "run" / "ckpt.pt", model, step=2)  # replaces the old one
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["ckpt.pt"]
    assert load_checkpoint(tmp_path / "run" / "ckpt.pt").step == 2


def test_save_refuses_what_safe_loading_would_refuse(tmp_path):
    np = pytest.importorskip("numpy")
    model = VisionTransformer(vit_preset("vit-test"))
    with pytest.raises(CheckpointError, match=r"training\['best'\].*numpy"):
        save_checkpoint(tmp_path / "bad.pt", model, training={"best": np.float64(0.5)})
    assert not any(tmp_path.iterdir())


def test_save_checks_labels_against_the_head(tmp_path):
    model = VisionTransformer(vit_preset("vit-test", num_classes=3))
    with pytest.raises(CheckpointError, match="2 labels for a head with 3 classes"):
        save_checkpoint(tmp_path / "bad.pt", model, labels=["a", "b"])


def test_own_format_takes_metadata_overrides_and_checks_the_preset(tmp_path):
    save_checkpoint(tmp_path / "vit.pt", VisionTransformer(vit_preset("vit-test", num_classes=2)), labels=["a", "b"])
    loaded = load_checkpoint(tmp_path / "vit.pt", preset="vit-test", labels=["x", "y"], mean=(0.5, 0.5, 0.5))
    assert loaded.labels == ["x", "y"] and loaded.mean == (0.5, 0.5, 0.5)
    with pytest.raises(CheckpointError, match="'vit-small' has embed_dim 384, but the weights have embed_dim 32"):
        load_checkpoint(tmp_path / "vit.pt", preset="vit-small")


# --- timm -----------------------------------------------------------------------------------------------

TIMM_CASES = {
    "token-pool": (dict(), dict(), "token"),
    "avg-pool-fc-norm": (dict(fc_norm=True), dict(), "avg"),
    "avg-pool-with-norm": (dict(), dict(pooling="gap"), "avg"),
    "no-embed-class": (dict(embed_class=False), dict(), "token"),
    "no-class-token": (dict(class_token=False, fc_norm=True), dict(), "avg"),
    "no-qkv-bias-no-head": (dict(qkv_bias=False, num_classes=0), dict(), "token"),
    "non-square-grid": (dict(grid=(2, 4)), dict(image_size=(8, 16)), "token"),
}


@pytest.mark.parametrize("case", TIMM_CASES, ids=list(TIMM_CASES))
def test_timm_import_matches_reference(tmp_path, case):
    layout, overrides, pool = TIMM_CASES[case]
    state = timm_state(**layout)
    torch.save(state, tmp_path / "timm.pth")
    loaded = load_checkpoint(tmp_path / "timm.pth", num_heads=2, **overrides)
    grid = layout.get("grid", (4, 4))
    images = torch.randn(3, 3, grid[0] * 4, grid[1] * 4)
    expected = ref_timm_forward(state, images, heads=2, pool=pool)
    assert loaded.source == "timm" and loaded.kind == "vit"
    assert expected.abs().max() > 0.1  # outputs big enough for the comparison to mean something
    assert max_diff(loaded.model(images), expected) < TOL


@pytest.mark.parametrize("wrapper", ["model", "state_dict"])
def test_timm_weights_under_a_wrapper_key_and_with_ddp_prefix(tmp_path, wrapper):
    state = timm_state()
    torch.save({wrapper: {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "ckpt.pth")
    model = import_checkpoint(tmp_path / "ckpt.pth", preset="vit-test")
    images = torch.randn(2, 3, 16, 16)
    assert max_diff(model(images), ref_timm_forward(state, images, heads=2)) < TOL


def test_timm_safetensors_file(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    state = timm_state(fc_norm=True)
    safetensors.save_file(state, tmp_path / "model.safetensors")
    loaded = load_checkpoint(tmp_path / "model.safetensors", num_heads=4)
    images = torch.randn(2, 3, 16, 16)
    assert loaded.model.config.pooling == "gap" and loaded.model.config.fc_norm
    assert max_diff(loaded.model(images), ref_timm_forward(state, images, heads=4, pool="avg")) < TOL


def test_weights_reveal_the_architecture_and_the_width_gives_standard_heads(tmp_path):
    torch.save(timm_state(dim=192, depth=3, patch=8, grid=(2, 2), in_chans=1, mlp_ratio=3, num_classes=7), tmp_path / "t.pth")
    config = import_checkpoint(tmp_path / "t.pth").config
    assert (config.embed_dim, config.depth, config.patch_size, config.in_chans, config.mlp_ratio) == (192, 3, 8, 1, 3.0)
    assert (config.num_heads, config.image_size, config.num_classes, config.norm_eps) == (3, (16, 16), 7, 1e-6)


@pytest.fixture(scope="module")
def timm():
    """Real timm: imported with torchvision where it loads, else with the stand-in in sys.modules for the import only
    (other libraries probe for torchvision, and must not find the stand-in); timm is unloaded after this module."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed; `make venv` installs it (pip install --no-deps, see the Makefile)")
    before = set(sys.modules)
    with pytest.MonkeyPatch.context() as patch:
        try:
            import torchvision  # noqa: F401
        except Exception:  # noqa: BLE001 - absent, or a PyPI build that does not load beside this torch (any error)
            for name, module in standin_modules().items():
                patch.setitem(sys.modules, name, module)
        import timm as real_timm
    yield real_timm
    for name in set(sys.modules) - before:  # nothing imported against the stand-in outlives this module
        if name == "timm" or name.startswith("timm."):
            del sys.modules[name]


def save_safetensors(state, path):
    pytest.importorskip("safetensors.torch").save_file(state, path)


def save_timm_train_checkpoint(state, path):
    """What timm's train.py (CheckpointSaver) writes: the weights under `state_dict`, beside plain metadata."""
    torch.save({"epoch": 3, "arch": "visiontransformer", "state_dict": state, "version": 2, "metric": 0.5}, path)


# name, timm.create_model arguments, how the checkpoint is saved, our overrides
REAL_TIMM_CASES = {
    "tiny-224-token": ("vit_tiny_patch16_224", dict(), "pytorch_model.bin", dict()),
    "small-avg-fc-norm": ("vit_small_patch16_224", dict(global_pool="avg", img_size=64), "model.safetensors", dict()),
    "tiny-no-embed-class": ("vit_tiny_patch16_224", dict(no_embed_class=True, img_size=48), "checkpoint-3.pth.tar", dict()),
    "small-no-class-token-wide": (
        "vit_small_patch16_224", dict(class_token=False, global_pool="avg", img_size=(32, 64)), "pytorch_model.bin",
        dict(image_size=(32, 64))),
    "tiny-features-only": ("vit_tiny_patch16_224", dict(num_classes=0, img_size=32), "model.safetensors", dict()),
}
SAVERS = {"pytorch_model.bin": lambda state, path: torch.save(state, path), "model.safetensors": save_safetensors,
          "checkpoint-3.pth.tar": save_timm_train_checkpoint}


@pytest.mark.parametrize("case", REAL_TIMM_CASES, ids=list(REAL_TIMM_CASES))
def test_real_timm_models_match(tmp_path, timm, case):
    name, kwargs, file_name, overrides = REAL_TIMM_CASES[case]
    reference = timm.create_model(name, pretrained=False, **kwargs).eval()
    _randomize(reference)  # timm's init leaves near-zero heads and tokens: random weights make every one count
    SAVERS[file_name](reference.state_dict(), tmp_path / file_name)

    loaded = load_checkpoint(tmp_path / file_name, **overrides)  # heads from the standard widths
    images = torch.randn(2, 3, *reference.patch_embed.img_size)
    with torch.no_grad():
        expected, ours = reference(images), loaded.model(images)
    assert loaded.source == "timm" and ours.shape == expected.shape
    assert expected.abs().max() > 0.1  # outputs big enough for the comparison to mean something
    assert max_diff(ours, expected) < TOL


# --- official MAE -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_official_mae_import_matches_reference(tmp_path, norm_pix_loss):
    state = mae_state()
    torch.save({"model": state}, tmp_path / "mae_visualize.pth")
    loaded = load_checkpoint(tmp_path / "mae_visualize.pth", num_heads=2, decoder_num_heads=4, norm_pix_loss=norm_pix_loss)
    assert (loaded.source, loaded.kind) == ("mae", "mae") and isinstance(loaded.model, MaskedAutoencoder)
    images, noise = torch.randn(3, 3, 16, 16), torch.rand(3, 16)
    loss, pred, mask = loaded.model(images, noise)
    ref_loss, ref_pred, ref_mask = ref_mae_forward(state, images, noise, 2, 4, norm_pix_loss=norm_pix_loss)
    assert torch.equal(mask, ref_mask)
    assert max_diff(pred, ref_pred) < TOL and abs(loss.item() - ref_loss.item()) < TOL


def test_mae_decoder_heads_default_to_sixteen(tmp_path):
    torch.save({"model": mae_state(decoder_dim=32)}, tmp_path / "mae.pth")
    assert import_checkpoint(tmp_path / "mae.pth", num_heads=2).config.decoder_num_heads == 16


def test_official_mae_encoder_only_file_becomes_a_feature_vit(tmp_path):
    state = timm_state(num_classes=0, mlp_ratio=4)  # what mae_pretrain_vit_*.pth holds
    torch.save({"model": state}, tmp_path / "mae_pretrain.pth")
    loaded = load_checkpoint(tmp_path / "mae_pretrain.pth", preset="vit-test")
    assert (loaded.source, loaded.kind) == ("mae", "vit")
    assert loaded.model.config.pooling == "cls" and loaded.model.config.num_classes == 0
    images = torch.randn(2, 3, 16, 16)
    assert max_diff(loaded.model(images), ref_timm_forward(state, images, heads=2)) < TOL


def test_official_mae_finetuned_file_is_a_timm_classifier(tmp_path):
    state = timm_state(fc_norm=True, num_classes=4)
    torch.save({"model": state}, tmp_path / "mae_finetuned.pth")
    loaded = load_checkpoint(tmp_path / "mae_finetuned.pth", num_heads=2)
    images = torch.randn(2, 3, 16, 16)
    assert loaded.source == "timm" and loaded.model.config.pooling == "gap"
    assert max_diff(loaded.model(images), ref_timm_forward(state, images, heads=2, pool="avg")) < TOL


# --- Hugging Face ----------------------------------------------------------------------------------------

def hf_mae(norm_pix_loss=False, qkv_bias=True):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTMAEConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=16, patch_size=4,
        decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=4, decoder_intermediate_size=64,
        layer_norm_eps=1e-5, mask_ratio=0.5, norm_pix_loss=norm_pix_loss, qkv_bias=qkv_bias,
    )
    model = transformers.ViTMAEForPreTraining(config).eval()
    _randomize(model)
    return model


def assert_mae_matches_hf(ours, hf_model):
    images, noise = torch.randn(3, 3, 16, 16), torch.rand(3, 16)
    with torch.no_grad():
        expected = hf_model(pixel_values=images, noise=noise)
        loss, pred, mask = ours(images, noise)
    assert torch.equal(mask, expected.mask)
    assert max_diff(pred, expected.logits) < TOL and abs(loss.item() - expected.loss.item()) < TOL


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_hf_vitmae_directory_matches_transformers(tmp_path, norm_pix_loss):
    hf_model = hf_mae(norm_pix_loss)
    hf_model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    loaded = load_checkpoint(tmp_path)  # heads, eps, mask ratio and norm_pix_loss from config.json
    assert (loaded.source, loaded.kind, loaded.mean, loaded.std) == ("hf", "mae", (0.5,) * 3, (0.5,) * 3)
    config = loaded.model.config
    assert (config.encoder.norm_eps, config.mask_ratio, config.norm_pix_loss, config.decoder_num_heads) == (1e-5, 0.5, norm_pix_loss, 4)
    assert_mae_matches_hf(loaded.model, hf_model)


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_hf_vitmae_state_dict_with_overrides_matches_transformers(tmp_path, qkv_bias):
    hf_model = hf_mae(norm_pix_loss=True, qkv_bias=qkv_bias)
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")  # transformers 5 module names
    ours = import_checkpoint(tmp_path / "pytorch_model.bin", num_heads=2, decoder_num_heads=4, norm_eps=1e-5,
                             mask_ratio=0.5, norm_pix_loss=True)
    assert_mae_matches_hf(ours, hf_model)


def test_hf_hub_layout_names_are_understood(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    hf_model = hf_mae()
    hf_model.save_pretrained(tmp_path / "saved")
    # Hub files name decoder layers `decoder.decoder_layers.N.attention.attention.query`, ...
    state = {k.replace("decoder.decoder_encoder.layer.", "decoder.decoder_layers."): v
             for k, v in safetensors.load_file(tmp_path / "saved" / "model.safetensors").items()}
    assert any(k.startswith("decoder.decoder_layers.0.attention.attention.query") for k in state)
    safetensors.save_file(state, tmp_path / "hub.safetensors")
    ours = import_checkpoint(tmp_path / "hub.safetensors", preset="mae-test", decoder_num_heads=4, norm_eps=1e-5, mask_ratio=0.5)
    assert_mae_matches_hf(ours, hf_model)


def test_hf_layer_norm_eps_defaults_to_hf_default(tmp_path):
    torch.save(hf_mae().state_dict(), tmp_path / "hf.bin")
    assert import_checkpoint(tmp_path / "hf.bin", num_heads=2, decoder_num_heads=4).config.encoder.norm_eps == 1e-12


def test_hf_vit_classifier_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    labels = ["ant", "bee", "cow", "doe", "eel"]
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=4,
        num_labels=5, id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)},
    )
    hf_model = transformers.ViTForImageClassification(config).eval()
    _randomize(hf_model)
    hf_model.save_pretrained(tmp_path / "dir")
    torch.save(hf_model.state_dict(), tmp_path / "vit.bin")
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = hf_model(pixel_values=images).logits

    loaded = load_checkpoint(tmp_path / "dir")
    assert (loaded.source, loaded.kind, loaded.labels) == ("hf", "vit", labels)
    assert loaded.model.config.num_heads == 4 and loaded.model.config.norm_eps == 1e-12
    assert max_diff(loaded.model(images), expected) < TOL
    assert max_diff(import_checkpoint(tmp_path / "vit.bin", num_heads=4, labels=labels)(images), expected) < TOL


# --- detection and bad inputs --------------------------------------------------------------------------

def test_detect_source_names_each_format():
    assert detect_source({"format": "vitserve", "version": 1}) == "vitserve"
    assert detect_source(timm_state()) == "timm"
    assert detect_source({"model": timm_state(num_classes=0)}) == "mae"
    assert detect_source({"model": mae_state()}) == "mae"
    assert detect_source({"vit.embeddings.cls_token": torch.zeros(1)}) == "hf"
    with pytest.raises(CheckpointError, match="not a checkpoint format we know"):
        detect_source({"encoder.weight": torch.zeros(1)})


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nothing.pt: no such file"):
        load_checkpoint(tmp_path / "nothing.pt")


@pytest.mark.parametrize("name", ["junk.pt", "junk.safetensors"])
def test_corrupt_file_is_named(tmp_path, name):
    if name.endswith(".safetensors"):
        pytest.importorskip("safetensors")
    (tmp_path / name).write_bytes(b"\x80\x02 this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=f"{name}.*not a readable"):
        load_checkpoint(tmp_path / name)


def test_pickled_python_objects_are_refused_with_a_hint(tmp_path):
    import argparse

    torch.save({"model": timm_state(), "args": argparse.Namespace(lr=1)}, tmp_path / "train.pth")
    with pytest.raises(CheckpointError, match=r"argparse.Namespace.*re-save just the weights"):
        load_checkpoint(tmp_path / "train.pth")


def test_unknown_format_dict_lists_its_keys(tmp_path):
    torch.save({"encoder.layer.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other.pt: not a checkpoint format we know.*encoder.layer.weight"):
        load_checkpoint(tmp_path / "other.pt")


def test_preset_contradicting_the_weights_names_both_values(tmp_path):
    torch.save(timm_state(), tmp_path / "timm.pth")
    with pytest.raises(CheckpointError, match="'vit-small' has embed_dim 384, but the weights have embed_dim 32"):
        load_checkpoint(tmp_path / "timm.pth", preset="vit-small")
    torch.save(timm_state(depth=3), tmp_path / "deep.pth")
    with pytest.raises(CheckpointError, match="has depth 2, but the weights have depth 3"):
        load_checkpoint(tmp_path / "deep.pth", preset="vit-test")


def test_override_contradicting_the_weights_names_both_values(tmp_path):
    torch.save(timm_state(), tmp_path / "timm.pth")
    with pytest.raises(CheckpointError, match=r"override embed_dim=64 contradicts the weights, which have embed_dim=32"):
        load_checkpoint(tmp_path / "timm.pth", num_heads=2, embed_dim=64)


def test_unknown_override_is_refused(tmp_path):
    torch.save(timm_state(), tmp_path / "timm.pth")
    with pytest.raises(CheckpointError, match="unknown override.*num_head\\b"):
        load_checkpoint(tmp_path / "timm.pth", num_head=2)


def test_num_heads_that_do_not_divide_the_width(tmp_path):
    torch.save(timm_state(), tmp_path / "timm.pth")
    with pytest.raises(CheckpointError, match="embed_dim 32 is not divisible by num_heads 5"):
        load_checkpoint(tmp_path / "timm.pth", num_heads=5)
    with pytest.raises(CheckpointError, match="width 32 has no standard one; pass num_heads"):
        load_checkpoint(tmp_path / "timm.pth")


def test_timm_map_pooling_is_refused_clearly(tmp_path):
    state = {**timm_state(), "attn_pool.latent": torch.zeros(1, 1, 32), "attn_pool.q.weight": torch.zeros(32, 32)}
    torch.save(state, tmp_path / "map.pth")
    with pytest.raises(CheckpointError, match="attention pooling.*not supported"):
        load_checkpoint(tmp_path / "map.pth", num_heads=2)


def test_leftover_and_missing_keys_are_listed(tmp_path):
    state = timm_state()
    state["blocks.0.extra.weight"] = torch.zeros(3)
    del state["norm.weight"]
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: norm.weight.*unexpected keys: blocks.0.extra.weight"):
        load_checkpoint(tmp_path / "odd.pth", num_heads=2)


def test_non_square_grid_needs_the_image_size(tmp_path):
    torch.save(timm_state(grid=(2, 3)), tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match=r"6 position embeddings.*pass image_size"):
        load_checkpoint(tmp_path / "wide.pth", num_heads=2)


def test_explicit_source_vitserve_refuses_foreign_weights(tmp_path):
    save_checkpoint(tmp_path / "m.pt", VisionTransformer(vit_preset("vit-test")))
    loaded = load_checkpoint(tmp_path / "m.pt", source="vitserve")
    assert isinstance(loaded, LoadedCheckpoint) and loaded.labels is None and loaded.training is None
    torch.save(timm_state(), tmp_path / "timm.pth")
    with pytest.raises(CheckpointError, match="not a vitserve checkpoint"):
        load_checkpoint(tmp_path / "timm.pth", source="vitserve")


def test_model_directory_needs_config_and_weights(tmp_path):
    with pytest.raises(CheckpointError, match="needs a Hugging Face config.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 32}))
    with pytest.raises(CheckpointError, match="no model.safetensors or pytorch_model.bin"):
        load_checkpoint(tmp_path)


def test_config_json_contradicting_the_weights_is_named(tmp_path):
    hf_model = hf_mae()
    hf_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match="config.json depth=3 contradicts the weights, which have depth=2"):
        load_checkpoint(tmp_path)
