"""Fresh weights for training from nothing, drawn only from a caller's ``torch.Generator``.

The schemes of the original parts: MAR (xavier-uniform linears, zero biases,
unit LayerNorms, N(0, 0.02) position embeddings, mask token, buffer latent and
class table), its diffusion head (DiT style: adaLN modulations and the output
layer start at zero, so every block starts as the identity), the Qwen2 LLM
(N(0, initializer_range) linears and embeddings, unit RMSNorms), projections
like MAR's linears, and the VAE with PyTorch's default convolution scheme.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .diffusion_head import FinalLayer, ResBlock, SimpleMLPAdaLN
from .harmon import Harmon


@torch.no_grad()
def init_weights(model: Harmon, generator: torch.Generator) -> Harmon:
    """Re-initialise every parameter of ``model`` in place (deterministic for a given generator)."""
    init_mar(model.mar, generator)
    std = float(model.llm.config.initializer_range)
    for module in model.llm.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std, generator=generator)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif hasattr(module, "variance_epsilon"):  # RMSNorm
            module.weight.fill_(1.0)
    for proj in (model.proj_in, model.proj_out):
        _init_linears(proj, generator)
    init_vae(model.vae, generator)
    return model


@torch.no_grad()
def init_vae(vae: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default convolution scheme (kaiming-uniform weights, uniform biases), unit GroupNorms."""
    for module in vae.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(module.weight[0].numel())
            module.bias.uniform_(-bound, bound, generator=generator)
        elif isinstance(module, nn.GroupNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()


@torch.no_grad()
def init_mar(mar: nn.Module, generator: torch.Generator) -> None:
    """MAR's own initialisation, then the diffusion head's (see :func:`init_diffusion_head`)."""
    _init_linears(mar, generator)
    for name in ("encoder_pos_embed_learned", "decoder_pos_embed_learned", "diffusion_pos_embed_learned",
                 "mask_token", "fake_latent"):
        getattr(mar, name).normal_(0.0, 0.02, generator=generator)
    mar.class_emb.weight.normal_(0.0, 0.02, generator=generator)
    init_diffusion_head(mar.diffloss.net, generator)


@torch.no_grad()
def init_diffusion_head(net: SimpleMLPAdaLN, generator: torch.Generator) -> None:
    """Xavier linears, N(0, 0.02) timestep MLP, zero adaLN modulations and zero output layer."""
    _init_linears(net, generator)
    for layer in net.time_embed.mlp:
        if isinstance(layer, nn.Linear):
            layer.weight.normal_(0.0, 0.02, generator=generator)
    for module in net.modules():
        if isinstance(module, (ResBlock, FinalLayer)):
            module.adaLN_modulation[-1].weight.zero_()
            module.adaLN_modulation[-1].bias.zero_()
    net.final_layer.linear.weight.zero_()
    net.final_layer.linear.bias.zero_()


def _init_linears(root: nn.Module, generator: torch.Generator) -> None:
    for module in root.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight, generator=generator)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            module.weight.fill_(1.0)
            module.bias.zero_()


@torch.no_grad()
def init_local_decoder_attention(mar: nn.Module, generator: torch.Generator, *, token_scale: float = 1.0,
                                 omega: float = math.pi / 8, qk_scale: float = 2.5) -> None:
    """Make the first half of the heads of MAR's decoder attend to the tokens near their own position.

    Applied after :func:`init_mar`, or to a model in training (the recipe does it after a few hundred
    steps). The first four channels of the decoder carry the position, (cos wx, sin wx, cos wy,
    sin wy) * 4 ``token_scale`` over the (y, x) grid, and nothing else: ``decoder_embed`` writes no
    content there and the mask token, redrawn N(0, ``token_scale``^2), is zero there. ``token_scale``
    is the size of a visible token at the decoder's input relative to a fresh model's (norm ~16 for
    width 256), so that layer norm scales masked and visible tokens, and their positions, alike. The
    first four query and key channels of each local head read those four times ``qk_scale``, so that
    its logit between grid positions p and q starts as about 2 qk_scale^2 (cos w(x_p - x_q) +
    cos w(y_p - y_q)) plus the content part: near tokens first. With the defaults, masked queries
    of an 8 x 8 grid put about half of a local head's attention on their four neighbours, and none
    on the buffer. The other heads keep their weights and attend everywhere, buffer included: the
    buffer carries the prompt, the only thing a masked token can learn from while nothing is
    visible (a decoder made local in every head sampled blobs that ignored the prompt). Learned
    positions (with MAR's N(0, 0.02) init, drowned by the content) leave the decoder to discover
    locality itself, which a small model does not within a short run: see docs/shapes.md.
    """
    dim = mar.decoder_embed.out_features
    h, w = mar.seq_h, mar.seq_w
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    grid = torch.stack([torch.cos(omega * x), torch.sin(omega * x), torch.cos(omega * y), torch.sin(omega * y)], -1)
    mar.decoder_pos_embed_learned.zero_()
    mar.decoder_pos_embed_learned[0, mar.buffer_size:, :4] = grid.reshape(h * w, 4) * 4.0 * token_scale  # (h*w, 4)
    mar.decoder_embed.weight[:4] = 0.0
    mar.decoder_embed.bias[:4] = 0.0
    mar.mask_token.normal_(0.0, token_scale, generator=generator)
    mar.mask_token[..., :4] = 0.0
    for block in mar.decoder_blocks:
        qkv = block.attn.qkv.weight  # (3 * dim, dim): query rows, then key rows, then value rows
        head_dim = dim // block.attn.num_heads
        for head in range(block.attn.num_heads // 2):
            for part in (0, 1):  # query, key
                first = part * dim + head * head_dim
                qkv[first:first + 4] = 0.0
                qkv[first:first + 4, :4] = torch.eye(4) * qk_scale
