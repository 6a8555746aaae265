"""MAR: the masked-autoregressive encoder and decoder over VAE latent tokens.

The ViT block keeps timm's parameter names (``norm1``, ``attn.qkv``,
``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``) so released checkpoints
load as an identity map; timm itself cannot be installed beside the CPU torch.

Token conventions: tokens are (B, L, C) in row-major order over the (h, w)
latent grid; masks are float (B, L) with 1 = masked (unknown, dropped from the
encoder). Every encoder/decoder sequence starts with ``buffer_size`` buffer
slots, all filled with ``fake_latent`` (Harmon never uses the class table).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import MARConfig
from ..errors import InputError
from .diffusion_head import DiffLoss


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # (3, B, heads, N, head_dim)
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block (timm ``Block`` with qkv bias, exact-erf GELU)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float, attn_drop: float, proj_drop: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _resize_grid_embed(embed: torch.Tensor, native: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(1, h0*w0, D) learned grid embedding -> (1, h*w, D), bilinear, align_corners=False."""
    if tuple(size) == tuple(native):
        return embed
    d = embed.shape[-1]
    grid = embed.reshape(1, native[0], native[1], d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, size[0] * size[1], d)


class MAR(nn.Module):
    """MAR encoder + decoder + diffusion head (``diffloss``), as used by Harmon."""

    def __init__(self, cfg: MARConfig):
        super().__init__()
        self.cfg = cfg
        self.buffer_size = cfg.buffer_size
        self.seq_h, self.seq_w = cfg.seq_h, cfg.seq_w
        enc, dec, eps = cfg.encoder_embed_dim, cfg.decoder_embed_dim, cfg.norm_layer_eps
        self.grad_checkpointing = cfg.grad_checkpointing

        self.class_emb = nn.Embedding(cfg.class_num, enc)  # present in checkpoints, unused by Harmon
        self.fake_latent = nn.Parameter(torch.zeros(1, enc))
        self.z_proj = nn.Linear(cfg.token_embed_dim, enc)
        self.z_proj_ln = nn.LayerNorm(enc, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, cfg.seq_len + cfg.buffer_size, enc))
        self.encoder_blocks = nn.ModuleList(
            Block(enc, cfg.encoder_num_heads, cfg.mlp_ratio, eps, cfg.attn_dropout, cfg.proj_dropout)
            for _ in range(cfg.encoder_depth))
        self.encoder_norm = nn.LayerNorm(enc, eps=eps)

        self.decoder_embed = nn.Linear(enc, dec)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, cfg.seq_len + cfg.buffer_size, dec))
        self.decoder_blocks = nn.ModuleList(
            Block(dec, cfg.decoder_num_heads, cfg.mlp_ratio, eps, cfg.attn_dropout, cfg.proj_dropout)
            for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dec, eps=eps)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, cfg.seq_len, dec))

        self.diffloss = DiffLoss(
            target_channels=cfg.token_embed_dim, z_channels=dec, width=cfg.diffloss_w, depth=cfg.diffloss_d,
            num_sampling_steps=cfg.num_sampling_steps, grad_checkpointing=cfg.grad_checkpointing)

    # -- position embeddings -------------------------------------------------------------
    def _pos_embed(self, learned: torch.Tensor, image_shape: tuple[int, int], with_buffer: bool) -> torch.Tensor:
        native = (self.seq_h, self.seq_w)
        if not with_buffer:
            return _resize_grid_embed(learned, native, image_shape)
        buffer, grid = learned[:, : self.buffer_size], learned[:, self.buffer_size:]
        if tuple(image_shape) == native:
            return learned
        return torch.cat([buffer, _resize_grid_embed(grid, native, image_shape)], dim=1)

    def get_encoder_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """(1, buffer + h*w, D_enc): image part interpolated for non-native grids."""
        return self._pos_embed(self.encoder_pos_embed_learned, (h, w), with_buffer=True)

    def get_decoder_pos_embed(self, h: int, w: int) -> torch.Tensor:
        return self._pos_embed(self.decoder_pos_embed_learned, (h, w), with_buffer=True)

    def get_diffusion_pos_embed(self, h: int, w: int) -> torch.Tensor:
        return self._pos_embed(self.diffusion_pos_embed_learned, (h, w), with_buffer=False)

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    # -- encoder / decoder -----------------------------------------------------------------
    def forward_mae_encoder(self, tokens: torch.Tensor, mask: torch.Tensor, buffer_embed: torch.Tensor,
                            image_shape: tuple[int, int], num_masked: int | None = None) -> torch.Tensor:
        """Encode the visible tokens.

        tokens (B, L, C), mask (B, L) with the same number of masked entries per row,
        buffer_embed (B, D_enc) -> (B, buffer + visible, D_enc), buffer first,
        visible tokens in ascending position order. ``num_masked`` (that number, when the
        caller knows it) spares reading the mask back from the device.
        """
        x = self.z_proj(tokens)  # (B, L, D)
        b, _, d = x.shape
        x = torch.cat([buffer_embed.unsqueeze(1).expand(b, self.buffer_size, d).to(x.dtype), x], dim=1)
        x = x + self.get_encoder_pos_embed(*image_shape)
        x = self.z_proj_ln(x)
        if num_masked is None:
            num_masked = masked_per_row(mask)
        keep = self._kept_positions(mask, x.shape[1] - num_masked)  # (B, buffer + visible)
        x = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, d))
        return self.encoder_norm(self._run_blocks(self.encoder_blocks, x))

    def forward_mae_decoder(self, x: torch.Tensor, mask: torch.Tensor, image_shape: tuple[int, int]) -> torch.Tensor:
        """x (B, buffer + visible, D_enc), mask (B, L) -> diffusion conditions z (B, L, D_dec)."""
        x = self.decoder_embed(x)
        b, kept, d = x.shape
        keep = self._kept_positions(mask, kept)  # (B, buffer + visible)
        full = self.mask_token.to(x.dtype).expand(b, self.buffer_size + mask.shape[1], d)
        full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, d), x)  # (B, buffer + L, D_dec)
        full = full + self.get_decoder_pos_embed(*image_shape)
        full = self.decoder_norm(self._run_blocks(self.decoder_blocks, full))
        return full[:, self.buffer_size:] + self.get_diffusion_pos_embed(*image_shape)

    def _kept_positions(self, mask: torch.Tensor, kept: int) -> torch.Tensor:
        """mask (B, L), 1 = masked -> (B, kept) long: the buffer slots and the visible positions of the
        buffer + L sequence, ascending (what a boolean index selects, without asking the device its count)."""
        dropped = torch.cat([mask.new_zeros(mask.shape[0], self.buffer_size), mask], dim=1)  # (B, buffer + L)
        return torch.argsort(dropped, dim=1, stable=True)[:, :kept]


def masked_per_row(mask: torch.Tensor) -> int:
    """The number of masked entries of every row of ``mask`` (B, L); a ValueError if the rows differ.

    Reads the mask back from its device: callers that know the count pass it on instead.
    """
    counts = (mask != 0).sum(dim=1).tolist()
    if len(set(counts)) > 1:
        raise InputError(f"every row of the mask must hide the same number of tokens, got {counts}")
    return counts[0] if counts else 0
