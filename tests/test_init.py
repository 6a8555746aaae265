"""Fresh initialisation for training from nothing: deterministic, generator-only, identity-start head."""
from __future__ import annotations

import torch

from harmon.checkpoint import load_state_dict
from harmon.config import shapes, tiny
from harmon.models.harmon import Harmon
from harmon.models.init import init_local_decoder_attention, init_weights


def test_init_is_deterministic_and_local():
    models = [Harmon(tiny()) for _ in range(3)]
    state = torch.random.get_rng_state()
    a, b, c = (init_weights(m, torch.Generator().manual_seed(s)).state_dict() for m, s in zip(models, (1, 1, 2)))
    assert torch.equal(torch.random.get_rng_state(), state)  # only the given generator was used
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["mar.z_proj.weight"], c["mar.z_proj.weight"])
    assert float(a["mar.diffloss.net.final_layer.linear.weight"].abs().sum()) == 0.0
    assert float(a["mar.diffloss.net.res_blocks.0.adaLN_modulation.1.weight"].abs().sum()) == 0.0
    assert torch.allclose(a["mar.encoder_pos_embed_learned"].std(), torch.tensor(0.02), rtol=0.2)


def test_fresh_model_runs_and_its_head_starts_at_zero():
    model = load_state_dict(tiny(), init_weights(Harmon(tiny()), torch.Generator().manual_seed(0)).state_dict())
    x, t, c = torch.randn(5, 16), torch.randint(0, 1000, (5,)), torch.randn(5, 64)
    assert torch.equal(model.mar.diffloss.net(x, t, c), torch.zeros(5, 32))
    images = model.decode(torch.zeros(1, 4, 4, 16))
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


def _decoder_attention(model: Harmon, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention weights (B, heads, N, N) of the first decoder block, buffer first."""
    seen = []

    def hook(module, args, out):
        x = args[0]
        b, n, c = x.shape
        q, k, _ = module.qkv(x).reshape(b, n, 3, module.num_heads, -1).permute(2, 0, 3, 1, 4)
        seen.append((q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1))

    model.mar.decoder_blocks[0].attn.register_forward_hook(hook)
    h = w = model.config.mar.seq_h
    with torch.no_grad():
        x = model.mar.forward_mae_encoder(tokens, mask, model.mar.fake_latent.expand(len(tokens), -1), (h, w))
        model.mar.forward_mae_decoder(x, mask, (h, w))
    return seen[0]


def test_local_decoder_init_starts_half_the_heads_on_the_neighbours_and_half_on_the_buffer():
    generator = torch.Generator().manual_seed(0)
    plain, local = Harmon(shapes()), Harmon(shapes())
    init_weights(plain, torch.Generator().manual_seed(0))
    init_weights(local, generator)
    state = torch.random.get_rng_state()
    init_local_decoder_attention(local.mar, generator)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert float(local.mar.decoder_embed.weight[:4].detach().abs().sum()) == 0.0  # the position channels hold no content
    assert float(local.mar.mask_token[..., :4].detach().abs().sum()) == 0.0

    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(8, 64, 8, generator=g)
    mask = (torch.rand(8, 64, generator=g).argsort(dim=1) < 32).float()  # half of the 8 x 8 grid masked
    k = local.buffer_size
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    neighbours = ((rows[:, None] - rows).abs() + (cols[:, None] - cols).abs()) == 1  # (64, 64)
    shares = {}
    for name, model in (("plain", plain), ("local", local)):
        attention = _decoder_attention(model, tokens, mask)  # (B, heads, buffer + 64, buffer + 64)
        masked_rows = attention[:, :, k:].permute(0, 2, 1, 3)[mask.bool()]  # (masked queries, heads, buffer + 64)
        shares[name] = ((masked_rows[..., k:] * neighbours[mask.bool().nonzero()[:, 1]][:, None]).sum(-1).mean(0),
                        masked_rows[..., :k].sum(-1).mean(0))  # (heads,) on the 4 neighbours, (heads,) on the buffer
    heads = local.mar.decoder_blocks[0].attn.num_heads
    on_neighbours, on_buffer = shares["local"]
    assert bool((shares["plain"][0] < 0.15).all()), shares["plain"]
    assert bool((on_neighbours[: heads // 2] > 0.4).all()) and bool((on_buffer[: heads // 2] < 1e-3).all()), shares
    # the other heads read the buffer (the prompt's path) as much as a fresh MAR does
    assert bool((on_neighbours[heads // 2:] < 0.15).all()), shares
    assert bool((on_buffer[heads // 2:] > 0.5 * shares["plain"][1].min()).all()), shares
