"""The per-token diffusion head ("DiffLoss"): an MLP with adaLN conditioning.

``net`` predicts, for a noisy 16-d token ``x`` at timestep ``t`` given the MAR
decoder's condition vector ``c``, the noise and a variance interpolation value
(2 * 16 outputs). :class:`DiffLoss` pairs it with the training process (1000
steps) and the respaced sampling process.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..batch_invariance import MIN_ROWS, pad_rows
from ..diffusion import GaussianDiffusion, ReverseStep, gaussian_log_prob, sampling_spec


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (N,) -> (N, dim) as [cos, sin] halves."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """x + gate * MLP(LN(x) * (1 + scale) + shift), (shift, scale, gate) from SiLU -> Linear(y)."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 2 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """The denoiser: x (N, C), original timesteps t (N,), condition c (N, Dz) -> (N, 2C)."""

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, z_channels: int,
                 num_res_blocks: int, grad_checkpointing: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.grad_checkpointing = grad_checkpointing
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList(ResBlock(model_channels) for _ in range(num_res_blocks))
        self.final_layer = FinalLayer(model_channels, out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # Runs in the weights' dtype, outside any autocast region: the first reverse step multiplies
        # the error of the predicted noise by about 300 (sqrt(1 / alpha_bar - 1) at t = 999 times the
        # posterior coefficient), so the head is kept at full precision while training under bf16
        # autocast. The diffusion state may be float32 while the weights are bfloat16. Fewer than MIN_ROWS
        # rows run padded with zero rows, so that each row is computed as in a product of many rows, alone
        # or in a batch (:mod:`harmon.batch_invariance`).
        dtype, rows = self.input_proj.weight.dtype, x.shape[0]
        x, t, c = (pad_rows(a, MIN_ROWS) for a in (x, t, c))  # (max(N, MIN_ROWS), ...)
        with torch.autocast(x.device.type, enabled=False):
            x = self.input_proj(x.to(dtype))
            y = self.time_embed(t) + self.cond_embed(c.to(dtype))
            for block in self.res_blocks:
                if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                    x = checkpoint(block, x, y, use_reentrant=False)
                else:
                    x = block(x, y)
            return self.final_layer(x, y)[:rows]

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Guided output for a [cond; uncond] batch.

        Only the first half of ``x`` is used (fed twice with both halves of ``c``);
        eps = uncond + cfg * (cond - uncond) for both halves, variance values stay per half.
        """
        half = x[: len(x) // 2]
        out = self(torch.cat([half, half]), t, c)  # through __call__, so that Module.compile applies
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels:]
        cond_eps, uncond_eps = eps.chunk(2)
        guided = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


class DiffLoss(nn.Module):
    """The diffusion head with its training process (1000 steps) and respaced sampling process."""

    def __init__(self, target_channels: int, z_channels: int, width: int, depth: int,
                 num_sampling_steps: str, grad_checkpointing: bool = False):
        super().__init__()
        self.in_channels = target_channels
        self.net = SimpleMLPAdaLN(target_channels, width, target_channels * 2, z_channels, depth, grad_checkpointing)
        self.num_sampling_steps = str(num_sampling_steps)
        self.train_diffusion = GaussianDiffusion()
        self.gen_diffusion = GaussianDiffusion.respaced(self.num_sampling_steps)
        self._sampling_processes = {self.num_sampling_steps: self.gen_diffusion}

    def sampling_spec(self, num_steps: str | int | None = None) -> str:
        """The respacing string for ``num_steps`` under this head's configured one (:func:`sampling_spec`)."""
        return sampling_spec(self.num_sampling_steps, num_steps)

    def sampling_process(self, num_steps: str | int | None = None) -> GaussianDiffusion:
        """The respaced process for ``num_steps`` (see :meth:`sampling_spec`), built once per value."""
        key = self.sampling_spec(num_steps)
        if key not in self._sampling_processes:
            self._sampling_processes[key] = GaussianDiffusion.respaced(key)
        return self._sampling_processes[key]

    def loss(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None,
             t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Masked mean of the per-row loss; t (N,) in 0..999 and noise (N, C) are given by the caller."""
        terms = self.train_diffusion.training_losses(lambda x, tt: self.net(x, tt, z), target, t, noise)
        loss = terms["loss"]
        if mask is not None:
            return (loss * mask).sum() / mask.sum()
        return loss.mean()

    def sample(self, z: torch.Tensor, x_T: torch.Tensor, step_noise: Callable[[], torch.Tensor],
               temperature: float = 1.0, cfg: float = 1.0, num_steps: str | int | None = None,
               trace: list[ReverseStep] | None = None) -> torch.Tensor:
        """Sample tokens (N, C) for conditions z.

        With ``cfg != 1``, z is [cond; uncond] (2N rows) and x_T (N, C) is shared by
        both halves; only the conditional half is computed and returned (the
        original computes the unconditional half too and discards it).
        ``step_noise()`` returns (N, C) noise per reverse step. ``num_steps``
        overrides the configured respacing (e.g. ``"50"``). ``trace`` receives the noisy reverse steps
        (:meth:`GaussianDiffusion.p_sample_loop`).
        """
        diffusion = self.sampling_process(num_steps)
        if cfg == 1.0:
            def model(x, t):
                return self.net(x, t, z)
        else:
            def model(x, t):
                return self.net.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), z, cfg)[: len(x)]
        return diffusion.p_sample_loop(model, x_T, step_noise, temperature, trace)

    def step_log_prob(self, z: torch.Tensor, step: ReverseStep, temperature: float = 1.0, cfg: float = 1.0,
                      num_steps: str | int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(x_prev | x_t) per row (N,) of a sampled reverse ``step`` under the current weights and
        conditions ``z`` (as :meth:`sample` takes them: [cond; uncond] with guidance), differentiable in both,
        and the step's mean (N, C)."""
        diffusion = self.sampling_process(num_steps)
        x_t = step.x_t
        t = torch.full((x_t.shape[0],), step.t, dtype=torch.long, device=x_t.device)
        original = diffusion.original_timesteps(t)
        if cfg == 1.0:
            output = self.net(x_t, original, z)
        else:
            output = self.net.forward_with_cfg(torch.cat([x_t, x_t]), torch.cat([original, original]), z, cfg)
            output = output[: len(x_t)]
        p = diffusion.p_mean_variance_from_output(output, x_t, t)
        return gaussian_log_prob(step.x_prev, p["mean"], p["log_variance"], temperature), p["mean"]
