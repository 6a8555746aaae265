"""The MAR encoder and decoder (``harmon.models.mar``) on their own: which tokens the encoder keeps and in
what order, the buffer slots before the image tokens, the decoder's scatter back onto the grid, position
embeddings on the native grid and on others, output shapes, and how a share of each image is masked."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from harmon.config import MARConfig
from harmon.errors import InputError
from harmon.models.mar import MAR, masked_per_row
from harmon.rng import ReferenceRNG, SeededRNG, TrainingRNG
from harmon.train.losses import text_to_image_loss

# a 4 x 4 native grid, 3 buffer slots, encoder and decoder of different widths (so a mix-up shows)
CFG = MARConfig(img_size=64, vae_stride=16, vae_embed_dim=4, encoder_embed_dim=8, encoder_depth=1,
                encoder_num_heads=2, decoder_embed_dim=12, decoder_depth=1, decoder_num_heads=2, buffer_size=3,
                class_num=2, diffloss_d=1, diffloss_w=8, num_sampling_steps="5")
K, L = CFG.buffer_size, CFG.seq_len
# masked positions of two images, four each, in no particular order
MASKED = [[15, 0, 6, 5], [3, 9, 4, 7]]


def random_mar(seed: int = 0) -> MAR:
    """A MAR of CFG in eval mode with every parameter drawn from N(0, 1) (the constructor leaves the
    position embeddings, the mask token and the buffer's latent at zero)."""
    mar = MAR(CFG).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mar.parameters():
            p.normal_(generator=g)
    return mar


def without_blocks(mar: MAR) -> MAR:
    """``mar`` with no transformer blocks: each output row then comes from one input row, so which rows
    were kept, and where they went, can be read off the output."""
    mar.encoder_blocks, mar.decoder_blocks = nn.ModuleList(), nn.ModuleList()
    return mar


def mask_of(rows: list[list[int]], length: int = L) -> torch.Tensor:
    """(B, length) float mask with 1 at each row's given positions."""
    mask = torch.zeros(len(rows), length)
    for i, positions in enumerate(rows):
        mask[i, positions] = 1.0
    return mask


def randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- masks ----------------------------------------------------------------------------------------------
def test_masked_per_row_counts_and_refuses_rows_that_differ():
    assert masked_per_row(mask_of(MASKED)) == 4
    assert masked_per_row(mask_of(MASKED).bool()) == 4
    assert masked_per_row(torch.zeros(3, L)) == 0 and masked_per_row(torch.zeros(0, L)) == 0
    with pytest.raises(InputError, match=r"same number of tokens, got \[4, 3\]"):
        masked_per_row(mask_of([MASKED[0], MASKED[1][:3]]))


def test_generation_orders_are_permutations_drawn_per_image():
    together = SeededRNG.from_seeds([4, 5, 6]).orders(3, L, guided=True)  # (3, L)
    assert together.shape == (3, L) and together.dtype == torch.int64
    assert all(torch.equal(row.sort().values, torch.arange(L)) for row in together)
    assert torch.equal(together[1:2], SeededRNG.from_seeds([5]).orders(1, L, guided=True))  # alone = in a batch
    assert not torch.equal(together[0], together[1])


def test_training_masks_the_first_tokens_of_each_order_at_the_drawn_ratio(reference_model):
    """text_to_image_loss masks ceil(L * ratio) tokens per image: the first of each image's order, with one
    ratio (a truncated normal of at least mask_ratio_min) drawn from the stream after the orders."""
    b = 2
    pixels = randn(b, 3, 64, 64).clamp(-1, 1)
    ids = torch.tensor([[991, 5, 17, 300, 42, 992, 10, 991, 7, 10]] * b)
    with torch.no_grad():
        res = text_to_image_loss(reference_model, pixels, ids, torch.ones_like(ids), ReferenceRNG(3, 4))
    seq = reference_model.config.mar.seq_len
    replay = ReferenceRNG(3, 4)
    assert torch.equal(res.orders, replay.train_orders(b, seq))
    ratio = replay.mask_ratio(reference_model.config.mar.mask_ratio_min)
    n = math.ceil(seq * ratio)
    assert n >= math.ceil(seq * reference_model.config.mar.mask_ratio_min)
    assert masked_per_row(res.mask) == n
    assert torch.equal(res.mask, torch.zeros(b, seq).scatter_(1, res.orders[:, :n], 1.0))


def test_mask_ratios_stay_within_their_bounds():
    high = [TrainingRNG(7, step, [0]).mask_ratio(0.7) for step in range(200)]
    assert all(0.7 <= r <= 1.0 for r in high) and len(set(high)) == len(high)
    assert 0.84 < sum(high) / len(high) < 0.89  # mean of N(1, 0.25) cut to [0.7, 1]: 0.867
    low = [TrainingRNG(7, step, [0]).mask_ratio(0.0) for step in range(200)]
    assert all(0.0 <= r <= 1.0 for r in low) and min(low) < 0.7
    assert TrainingRNG(7, 3, [0, 1]).mask_ratio(0.7) == TrainingRNG(7, 3, [5]).mask_ratio(0.7)  # one per step


# -- the encoder ----------------------------------------------------------------------------------------------
def test_encoder_keeps_the_buffer_then_the_visible_tokens_in_ascending_order():
    mar = without_blocks(random_mar())
    tokens, buffer_embed, mask = randn(2, L, 4), randn(2, 8, seed=2), mask_of(MASKED)
    with torch.no_grad():
        out = mar.forward_mae_encoder(tokens, mask, buffer_embed, (4, 4))
        assert out.shape == (2, K + L - 4, 8)
        # every slot before the image tokens holds the buffer's embedding
        seq = torch.cat([buffer_embed.unsqueeze(1).expand(-1, K, -1), mar.z_proj(tokens)], dim=1)
        seq = mar.z_proj_ln(seq + mar.encoder_pos_embed_learned)  # (2, K + L, 8)
        for i, masked in enumerate(MASKED):
            kept = list(range(K)) + [K + p for p in range(L) if p not in masked]
            torch.testing.assert_close(out[i], mar.encoder_norm(seq[i, kept]))
        # given the count, the same rows without reading the mask
        torch.testing.assert_close(mar.forward_mae_encoder(tokens, mask, buffer_embed, (4, 4), num_masked=4), out)


def test_encoder_never_sees_the_masked_tokens(reference_model):
    mar = reference_model.mar
    b, (h, w) = 2, (mar.seq_h, mar.seq_w)
    tokens, mask = randn(b, h * w, reference_model.token_dim), mask_of(MASKED, h * w)
    buffer_embed = mar.fake_latent.expand(b, -1)
    with torch.no_grad():
        out = mar.forward_mae_encoder(tokens, mask, buffer_embed, (h, w))
        changed_masked = tokens + 100.0 * mask.unsqueeze(-1)
        assert torch.equal(mar.forward_mae_encoder(changed_masked, mask, buffer_embed, (h, w)), out)
        changed_visible = tokens.clone()
        changed_visible[0, 1] += 1.0  # position 1 is visible in both images
        moved = mar.forward_mae_encoder(changed_visible, mask, buffer_embed, (h, w))
    assert not torch.allclose(moved[0], out[0]) and torch.equal(moved[1], out[1])  # images do not mix


def test_buffer_slots_hold_the_buffer_embedding_whatever_the_tokens():
    mar = without_blocks(random_mar())
    mask, buffer_embed = mask_of(MASKED), randn(2, 8, seed=2)
    with torch.no_grad():
        a = mar.forward_mae_encoder(randn(2, L, 4, seed=3), mask, buffer_embed, (4, 4))
        b = mar.forward_mae_encoder(randn(2, L, 4, seed=4), mask, buffer_embed, (4, 4))
        c = mar.forward_mae_encoder(randn(2, L, 4, seed=3), mask, randn(2, 8, seed=5), (4, 4))
    assert torch.equal(a[:, :K], b[:, :K]) and not torch.allclose(a[:, K:], b[:, K:])
    assert not torch.allclose(a[:, :K], c[:, :K]) and torch.equal(a[:, K:], c[:, K:])


def test_harmon_moves_the_buffer_behind_the_image_tokens_for_the_llm(reference_model):
    k = reference_model.buffer_size
    tokens = randn(1, 4, 4, reference_model.token_dim)
    with torch.no_grad():
        x_enc, z_enc = reference_model.extract_visual_feature(tokens)
        projected = reference_model.proj_in(x_enc)  # (1, K + L, H): buffer first, as the MAR encodes it
    assert x_enc.shape == (1, k + 16, reference_model.mar.cfg.encoder_embed_dim)
    torch.testing.assert_close(z_enc, torch.cat([projected[:, k:], projected[:, :k]], dim=1))


# -- the decoder -----------------------------------------------------------------------------------------------
def test_decoder_puts_the_visible_rows_back_and_mask_tokens_elsewhere():
    mar = without_blocks(random_mar())
    mask, x_enc = mask_of(MASKED), randn(2, K + L - 4, 8)
    with torch.no_grad():
        z = mar.forward_mae_decoder(x_enc, mask, (4, 4))
        assert z.shape == (2, L, 12)  # the buffer slots are dropped
        pos, diffusion = mar.decoder_pos_embed_learned[0], mar.diffusion_pos_embed_learned[0]
        embedded = mar.decoder_embed(x_enc)  # (2, K + visible, 12)
        for i, masked in enumerate(MASKED):
            visible = [p for p in range(L) if p not in masked]
            for p in range(L):
                row = mar.mask_token[0, 0] if p in masked else embedded[i, K + visible.index(p)]
                torch.testing.assert_close(z[i, p], mar.decoder_norm(row + pos[K + p]) + diffusion[p])


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_encoder_and_decoder_shapes_on_the_tiny_model(reference_model, grid):
    mar = reference_model.mar
    h, w = grid
    b, n = 3, 5
    tokens = randn(b, h * w, reference_model.token_dim)
    mask = torch.zeros(b, h * w).scatter_(1, SeededRNG.from_seeds([1, 2, 3]).orders(b, h * w, False)[:, :n], 1.0)
    with torch.no_grad():
        x_enc = mar.forward_mae_encoder(tokens, mask, mar.fake_latent.expand(b, -1), grid)
        z = mar.forward_mae_decoder(x_enc, mask, grid)
    assert x_enc.shape == (b, mar.buffer_size + h * w - n, mar.cfg.encoder_embed_dim)
    assert z.shape == (b, h * w, mar.cfg.decoder_embed_dim)
    assert torch.isfinite(x_enc).all() and torch.isfinite(z).all()


# -- position embeddings -----------------------------------------------------------------------------------------
def test_native_grid_uses_the_learned_embeddings_as_they_are():
    mar = random_mar()
    assert mar.get_encoder_pos_embed(4, 4) is mar.encoder_pos_embed_learned
    assert mar.get_decoder_pos_embed(4, 4) is mar.decoder_pos_embed_learned
    assert mar.get_diffusion_pos_embed(4, 4) is mar.diffusion_pos_embed_learned


def test_other_grids_resize_the_image_part_and_keep_the_buffer():
    mar = random_mar()
    learned = mar.encoder_pos_embed_learned  # (1, K + 16, 8)
    grid = learned[0, K:].reshape(4, 4, -1)  # row-major (h, w, D)
    with torch.no_grad():
        for h, w in ((2, 2), (2, 4), (4, 2), (6, 5)):
            embed = mar.get_encoder_pos_embed(h, w)
            assert embed.shape == (1, K + h * w, 8)
            assert torch.equal(embed[:, :K], learned[:, :K])
        # halving a side (bilinear, corners not aligned) averages neighbouring pairs along that side only
        rows = grid.reshape(2, 2, 4, -1).mean(dim=1)          # (2, 4, D): pairs of rows
        cols = grid.reshape(4, 2, 2, -1).mean(dim=2)          # (4, 2, D): pairs of columns
        torch.testing.assert_close(mar.get_encoder_pos_embed(2, 4)[0, K:], rows.reshape(8, -1))
        torch.testing.assert_close(mar.get_encoder_pos_embed(4, 2)[0, K:], cols.reshape(8, -1))
        quarters = grid.reshape(2, 2, 2, 2, -1).mean(dim=(1, 3))
        torch.testing.assert_close(mar.get_encoder_pos_embed(2, 2)[0, K:], quarters.reshape(4, -1))
        # the diffusion embedding has no buffer: the same resizing over its whole length
        diffusion = mar.diffusion_pos_embed_learned[0].reshape(2, 2, 4, -1).mean(dim=1)
        torch.testing.assert_close(mar.get_diffusion_pos_embed(2, 4)[0], diffusion.reshape(8, -1))


def test_a_constant_embedding_stays_constant_on_any_grid():
    mar = random_mar()
    with torch.no_grad():
        mar.decoder_pos_embed_learned[:, K:] = torch.arange(12.0)  # the same vector at every grid cell
        embed = mar.get_decoder_pos_embed(7, 3)
    assert embed.shape == (1, K + 21, 12)
    torch.testing.assert_close(embed[0, K:], torch.arange(12.0).expand(21, -1))
