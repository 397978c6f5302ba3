import pytest
import torch

from model.presets import ConfigError, ViTConfig, vit_preset
from model.vit import InputShapeError, VisionTransformer, resize_pos_embed


def tiny(**overrides) -> VisionTransformer:
    return VisionTransformer(vit_preset("vit-test", num_classes=5, **overrides)).eval()


@pytest.mark.parametrize("stem", ["linear", "conv"])
@pytest.mark.parametrize("pooling", ["cls", "gap", "map"])
def test_every_pooling_and_stem_gives_logits_and_features(pooling, stem):
    model = tiny(pooling=pooling, stem=stem)
    images = torch.randn(3, 3, 16, 16)
    tokens = model.forward_features(images)
    assert tokens.shape == (3, 1 + 16, 32)
    pooled = model.pool(tokens)
    assert pooled.shape == (3, 32)
    assert model.forward_head(pooled).shape == (3, 5)
    torch.testing.assert_close(model(images), model.forward_head(pooled))


def test_without_head_the_model_returns_pooled_features():
    model = VisionTransformer(vit_preset("vit-test", num_classes=0)).eval()
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 32)


def test_gap_pooling_averages_patch_tokens_only():
    model = tiny(pooling="gap")
    tokens = torch.randn(2, 17, 32)
    tokens[:, 0] = 1000.0  # the class token must not leak into the average
    torch.testing.assert_close(model.pool(tokens), tokens[:, 1:].mean(dim=1))


def test_map_pooling_depends_on_all_tokens_and_not_on_their_order_of_batch():
    model = tiny(pooling="map")
    tokens = torch.randn(2, 17, 32)
    changed = tokens.clone()
    changed[:, 9] += 1.0
    assert not torch.allclose(model.pool(tokens), model.pool(changed))
    # no mask and no position inside the pool: permuting tokens gives the same vector
    perm = torch.randperm(17)
    torch.testing.assert_close(model.pool(tokens), model.pool(tokens[:, perm]), atol=1e-5, rtol=1e-5)


def test_position_embeddings_make_the_output_depend_on_where_patches_are():
    model = tiny(pooling="gap")
    images = torch.randn(1, 3, 16, 16)
    swapped = images.clone()
    swapped[..., :4, :4], swapped[..., 12:, 12:] = images[..., 12:, 12:], images[..., :4, :4]
    assert not torch.allclose(model(images), model(swapped), atol=1e-4)


def test_non_square_images_work_when_the_patch_divides_both_sides():
    model = VisionTransformer(ViTConfig(image_size=(16, 24), patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=3))
    assert model.config.grid_size == (4, 6)
    assert model(torch.randn(2, 3, 16, 24)).shape == (2, 3)


def test_set_image_size_resizes_position_embeddings_and_keeps_the_class_slot():
    model = tiny()
    cls_slot = model.pos_embed[:, :1].clone()
    model.set_image_size(24)
    assert model.pos_embed.shape == (1, 1 + 36, 32)
    torch.testing.assert_close(model.pos_embed[:, :1], cls_slot)
    assert model(torch.randn(2, 3, 24, 24)).shape == (2, 5)
    assert model.config.image_size == (24, 24)


def test_resize_to_the_same_grid_is_identity_and_smooth_embeddings_survive_resizing():
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    linear = (rows + 2 * cols).reshape(1, 16, 1).repeat(1, 1, 8)
    pos = torch.cat([torch.zeros(1, 1, 8), linear], dim=1)
    assert resize_pos_embed(pos, (4, 4), (4, 4), 1) is pos
    bigger = resize_pos_embed(pos, (4, 4), (8, 8), 1)
    assert bigger.shape == (1, 65, 8)
    grid = bigger[0, 1:, 0].reshape(8, 8)
    # a ramp stays a ramp: increasing along both axes
    assert (grid[:, 1:] > grid[:, :-1]).all() and (grid[1:, :] > grid[:-1, :]).all()


def test_wrong_image_size_is_a_clear_error():
    model = tiny()
    with pytest.raises(InputShapeError, match=r"expected images of shape \(B, 3, 16, 16\), got \(2, 3, 32, 32\)"):
        model(torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(image_size=18), "patch size 4 does not divide image size 18x18"),
        (dict(num_heads=3), "not divisible by num_heads"),
        (dict(pooling="max"), "unknown pooling 'max'"),
        (dict(stem="conv", patch_size=6, image_size=18), "power of two"),
    ],
)
def test_impossible_configs_name_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=message):
        vit_preset("vit-test", **overrides)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown preset 'vit-gigantic'.*vit-base"):
        vit_preset("vit-gigantic")


@pytest.mark.parametrize(
    "name, dim, depth, heads, patch",
    [("vit-tiny", 192, 12, 3, 16), ("vit-small", 384, 12, 6, 16), ("vit-base", 768, 12, 12, 16),
     ("vit-large", 1024, 24, 16, 16), ("vit-huge", 1280, 32, 16, 14)],
)
def test_standard_presets_have_the_paper_sizes(name, dim, depth, heads, patch):
    config = vit_preset(name)
    assert (config.embed_dim, config.depth, config.num_heads, config.patch_size) == (dim, depth, heads, patch)
    assert config.mlp_ratio == 4.0 and config.norm_eps == 1e-6


def test_vit_base_has_the_expected_parameter_count():
    model = VisionTransformer(vit_preset("vit-base", num_classes=1000))
    assert sum(p.numel() for p in model.parameters()) == 86_567_656


def test_config_round_trips_through_a_dict():
    config = vit_preset("vit-test", pooling="map", stem="conv", num_classes=7, image_size=(16, 32))
    assert ViTConfig.from_dict(config.to_dict()) == config
