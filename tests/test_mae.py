import pytest
import torch

from model.mae import MaskedAutoencoder, num_visible, patchify, random_masking, sincos_pos_embed_2d, unpatchify
from model.presets import MAEConfig, mae_preset


def small_mae(**overrides) -> MaskedAutoencoder:
    torch.manual_seed(0)
    return MaskedAutoencoder(mae_preset("mae-test", **overrides)).eval()


def test_patchify_and_unpatchify_are_inverse_also_for_non_square_images():
    images = torch.randn(2, 3, 16, 24)
    patches = patchify(images, 4)
    assert patches.shape == (2, 24, 48)
    torch.testing.assert_close(unpatchify(patches, 4, (4, 6)), images)
    # a patch holds the pixels of its own square, row by row
    torch.testing.assert_close(patches[0, 7].reshape(4, 4, 3), images[0, :, 4:8, 4:8].permute(1, 2, 0))


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_masking_keeps_exactly_int_L_times_one_minus_ratio(ratio):
    tokens = torch.randn(3, 16, 8)
    keep = num_visible(16, ratio)
    kept, mask, ids_restore = random_masking(tokens, torch.rand(3, 16), keep)
    assert kept.shape == (3, keep, 8)
    assert (mask.sum(dim=1) == 16 - keep).all()
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_kept_tokens_are_the_lowest_noise_patches_and_ids_restore_inverts_the_shuffle():
    tokens = torch.arange(16.0).reshape(1, 16, 1)
    noise = torch.rand(1, 16)
    kept, mask, ids_restore = random_masking(tokens, noise, 4)
    lowest = noise[0].argsort()[:4]
    assert kept[0, :, 0].long().tolist() == lowest.tolist()
    assert mask[0, lowest].eq(0).all() and mask.sum() == 12
    shuffled = tokens[0, noise[0].argsort(stable=True)]
    torch.testing.assert_close(shuffled[ids_restore[0]], tokens[0])


def test_equal_noise_keeps_patch_order_so_ties_are_deterministic():
    tokens = torch.arange(16.0).reshape(1, 16, 1)
    noise = torch.zeros(1, 16)
    noise[0, 3] = -1.0  # one clear winner, the rest tied
    kept, mask, _ = random_masking(tokens, noise, 5)
    assert kept[0, :, 0].long().tolist() == [3, 0, 1, 2, 4]
    # run again with a permuted-memory copy: same answer
    kept_again, mask_again, _ = random_masking(tokens.clone(), noise.clone().contiguous(), 5)
    torch.testing.assert_close(kept, kept_again)
    torch.testing.assert_close(mask, mask_again)


def test_encoder_sees_only_the_visible_patches_plus_cls():
    mae = small_mae()
    images = torch.randn(2, 3, 16, 16)
    latent, mask, ids_restore = mae.forward_encoder(images, torch.rand(2, 16), keep=4)
    assert latent.shape == (2, 1 + 4, 32)
    assert ids_restore.shape == (2, 16)


def test_encoder_output_does_not_depend_on_masked_pixels():
    mae = small_mae()
    images = torch.randn(1, 3, 16, 16)
    noise = torch.rand(1, 16)
    latent, mask, _ = mae.forward_encoder(images, noise, keep=4)
    masked_pixels = unpatchify(mask[..., None].expand(1, 16, 48), 4, (4, 4)).bool()
    scribbled = images.masked_fill(masked_pixels, 123.0)
    latent_again, _, _ = mae.forward_encoder(scribbled, noise, keep=4)
    torch.testing.assert_close(latent, latent_again)


def test_loss_counts_masked_patches_only():
    mae = small_mae()
    images = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    loss, pred, mask = mae(images, noise=noise)
    perfect_on_masked = torch.where(mask[..., None].bool(), mae.patchify(images), pred + 100.0)
    assert mae.forward_loss(images, perfect_on_masked, mask).item() == 0.0
    manual = (((pred - mae.patchify(images)) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, manual)


def test_norm_pix_loss_normalises_each_target_patch():
    mae = small_mae(norm_pix_loss=True)
    target = mae.target_patches(torch.randn(2, 3, 16, 16) * 5 + 3)
    torch.testing.assert_close(target.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(target.std(-1), torch.ones(2, 16), atol=1e-3, rtol=0)


def test_same_noise_gives_the_same_result_and_outputs_have_official_shapes():
    mae = small_mae()
    images = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    loss_a, pred_a, mask_a = mae(images, noise=noise)
    loss_b, pred_b, mask_b = mae(images, noise=noise, mask_ratio=0.75)
    assert pred_a.shape == (2, 16, 48) and mask_a.shape == (2, 16) and loss_a.ndim == 0
    torch.testing.assert_close(pred_a, pred_b)
    torch.testing.assert_close(loss_a, loss_b)


def test_noise_of_the_wrong_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"noise must have shape \(B, L\) = \(2, 16\)"):
        small_mae()(torch.randn(2, 3, 16, 16), noise=torch.rand(2, 15))


def test_sincos_table_is_fixed_distinct_per_position_and_zero_for_cls():
    table = sincos_pos_embed_2d(32, (4, 6))
    assert table.shape == (1, 25, 32)
    assert table[0, 0].abs().sum() == 0
    assert torch.cdist(table[0, 1:], table[0, 1:]).add(torch.eye(24)).min() > 0.1
    mae = small_mae()
    assert not mae.encoder.pos_embed.requires_grad and not mae.decoder_pos_embed.requires_grad


def test_mae_defaults_follow_the_paper():
    config = mae_preset("mae-base")
    assert (config.decoder_embed_dim, config.decoder_depth, config.decoder_num_heads, config.mask_ratio) == (512, 8, 16, 0.75)
    assert config.encoder.embed_dim == 768
    assert MAEConfig.from_dict(config.to_dict()) == config


def test_classifier_from_mae_encoder_starts_from_the_encoder_weights():
    mae = small_mae()
    vit = mae.classifier(num_classes=4, pooling="gap").eval()
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(vit.forward_features(images), mae.encoder.forward_features(images))
    assert vit.pos_embed.requires_grad
    assert vit(images).shape == (2, 4)


def test_mae_gradients_reach_encoder_and_decoder_but_not_fixed_positions():
    mae = small_mae().train()
    loss, _, _ = mae(torch.randn(2, 3, 16, 16))
    loss.backward()
    assert mae.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert mae.decoder_pred.weight.grad.abs().sum() > 0
    assert mae.mask_token.grad.abs().sum() > 0
    assert mae.encoder.pos_embed.grad is None
