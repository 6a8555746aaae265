"""The KL-16 autoencoder of MAR, in the LDM key layout of ``kl16.ckpt``.

Encoder: ``conv_in`` -> levels of ResNet blocks (+ attention at the listed
resolutions) with stride-2 downsampling between levels -> mid block (res, attn,
res) -> GroupNorm + swish -> ``conv_out`` to 2 * z_channels. ``quant_conv`` gives
the posterior moments (mean, logvar). The decoder mirrors it with nearest x2
upsampling. No file I/O here: weights are loaded by :mod:`harmon.checkpoint`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAEConfig
from ..errors import InputError


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 convolutions."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, 1, HW, C) for SDPA with one head
        q, k, v = (m(y).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: right and bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResNet blocks) and ``attn`` (one per block, or none)."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        in_mult = (1,) + cfg.ch_mult
        res = cfg.resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            c_in, c_out = cfg.ch * in_mult[i], cfg.ch * mult
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, cfg.dropout) for j in range(cfg.num_res_blocks)]
            attns = [AttnBlock(c_out) for _ in blocks] if res in cfg.encoder_attn_resolutions else []
            level = _Level(blocks, attns)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(c_out)
                res //= 2
            self.down.append(level)
        c = cfg.ch * cfg.ch_mult[-1]
        self.mid = _Mid(c, cfg.dropout)
        self.norm_out = _group_norm(c)
        self.conv_out = nn.Conv2d(c, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        c = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // cfg.stride
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _Mid(c, cfg.dropout)
        levels: list[_Level] = []
        for i in reversed(range(len(cfg.ch_mult))):
            c_out = cfg.ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(c if j == 0 else c_out, c_out, cfg.dropout) for j in range(cfg.num_res_blocks + 1)]
            attns = [AttnBlock(c_out) for _ in blocks] if res in cfg.decoder_attn_resolutions else []
            level = _Level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(c_out)
                res *= 2
            levels.insert(0, level)
            c = c_out
        self.up = nn.ModuleList(levels)  # up[0] is the finest level, run last
        self.norm_out = _group_norm(c)
        self.conv_out = nn.Conv2d(c, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The VAE posterior: ``moments`` (B, 2C, h, w) split into mean and log-variance (clamped to [-30, 20])."""

    def __init__(self, moments: torch.Tensor):
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * N(0, 1), the noise drawn from ``generator`` (training)."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def kl(self) -> torch.Tensor:
        """KL divergence to N(0, I), summed over latent dimensions: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(dim=1)


class AutoencoderKL(nn.Module):
    """KL autoencoder: ``encode`` gives a :class:`DiagonalGaussian`, ``decode`` maps latents to pixels in ~[-1, 1]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    # Both directions run channels-last inside (oneDNN's convolutions then skip reordering every activation;
    # measured in docs/performance.md) and hand back contiguous tensors. The values differ from channels-first
    # (the original's) by float rounding only: relative 1e-6 on random pixels, up to 4e-5 on flat images,
    # whose group norms divide by variances near 0.
    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """images (B, 3, H, W) in [-1, 1] -> posterior over (B, embed_dim, H/16, W/16)."""
        moments = self.quant_conv(self.encoder(images.contiguous(memory_format=torch.channels_last)))
        return DiagonalGaussian(moments.contiguous())

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, embed_dim, h, w), unscaled -> images (B, 3, s*h, s*w) with s the stride, not clamped."""
        latents = latents.contiguous(memory_format=torch.channels_last)
        return self.decoder(self.post_quant_conv(latents)).contiguous()

    def decode_tiled(self, latents: torch.Tensor, tile: int, overlap: int | None = None) -> torch.Tensor:
        """:meth:`decode` in overlapping square tiles of ``tile`` latent cells, for images too large to decode whole.

        Activations are those of one tile, whatever the image's size (plus the output). Tiles overlap by
        ``overlap`` cells (default tile // 4) and are blended with linear ramps across
        each overlap. The result is not bit-equal to :meth:`decode` (the decoder's group
        norms and attention see one tile at a time); a grid that fits in one tile is
        decoded whole, exactly.
        """
        b, _, h, w = latents.shape
        overlap = tile // 4 if overlap is None else overlap
        if tile < 2 or not 0 <= overlap < tile:
            raise InputError(f"tiles need tile >= 2 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
        if h <= tile and w <= tile:
            return self.decode(latents)
        rows, cols = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
        out = weight = None
        for top in rows:
            for left in cols:
                part = self.decode(latents[:, :, top:top + tile, left:left + tile])  # (B, 3, th*s, tw*s)
                s = part.shape[-1] // min(tile, w - left)  # pixels per latent cell
                if out is None:  # blended in float32 whatever the model's dtype
                    out = part.new_zeros(b, part.shape[1], h * s, w * s, dtype=torch.float32)
                    weight = part.new_zeros(1, 1, h * s, w * s, dtype=torch.float32)
                ramp_y = _blend_ramp(part.shape[-2], overlap * s, top > 0, top + tile < h, out)
                ramp_x = _blend_ramp(part.shape[-1], overlap * s, left > 0, left + tile < w, out)
                mask = ramp_y[:, None] * ramp_x[None, :]  # (th*s, tw*s)
                y, x = top * s, left * s
                out[:, :, y:y + part.shape[-2], x:x + part.shape[-1]] += part.float() * mask
                weight[:, :, y:y + part.shape[-2], x:x + part.shape[-1]] += mask
        return (out / weight).to(latents.dtype)


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """First cells of tiles of ``tile`` cells stepping by ``tile - overlap``; the last one ends at ``length``."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    return starts + [length - tile]


def _blend_ramp(size: int, ramp: int, before: bool, after: bool, like: torch.Tensor) -> torch.Tensor:
    """(size,) weights: 1 inside, rising linearly over ``ramp`` pixels at an edge shared with another tile."""
    weights = torch.ones(size, dtype=like.dtype, device=like.device)
    if ramp > 0:
        rise = (torch.arange(ramp, dtype=like.dtype, device=like.device) + 0.5) / ramp
        if before:
            weights[:ramp] = torch.minimum(weights[:ramp], rise)
        if after:
            weights[-ramp:] = torch.minimum(weights[-ramp:], rise.flip(0))
    return weights
