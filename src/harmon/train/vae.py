"""Training the KL autoencoder from nothing (the first stage of the shapes recipe).

The objective is LDM's without its perceptual and adversarial terms: per-pixel
L1 + squared error of the reconstruction from a posterior sample, plus
``kl_weight`` times the KL divergence to N(0, I). Flat-coloured synthetic scenes
need no perceptual loss; natural images would. All randomness (batch order,
posterior samples) comes from one ``torch.Generator`` seeded by the caller.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..models.vae import AutoencoderKL


@dataclass
class VAETrainConfig:
    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    kl_weight: float = 1e-6
    log_every: int = 100
    bfloat16: bool = True  # autocast (about 2x faster on CPUs with bf16 matrix units); weights stay float32
    # train the decoder alone (and post_quant_conv), the encoder frozen: the latent space, and so a Harmon
    # trained on it, stays as it is while the decoder learns more images
    decoder_only: bool = False


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, kl_weight: float,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """images (B, 3, H, W) in [-1, 1] -> {"loss", "l1", "mse", "kl"} (scalars; kl per image)."""
    posterior = vae.encode(images)
    recon = vae.decode(posterior.sample(generator))
    l1 = (recon - images).abs().mean()
    mse = (recon - images).pow(2).mean()
    kl = posterior.kl().mean()
    return {"loss": l1 + mse + kl_weight * kl / images[0].numel(), "l1": l1, "mse": mse, "kl": kl}


def train_vae(vae: AutoencoderKL, images: torch.Tensor, cfg: VAETrainConfig, generator: torch.Generator, *,
              progress: bool = True, log=None) -> list[dict[str, float]]:
    """Fit ``vae`` in place to ``images`` (N, 3, H, W) uint8; returns one record per logged step.

    AdamW (betas 0.9/0.95, no weight decay), linear warm-up then cosine decay,
    gradient clipping at 1.0. ``log`` (a callable taking a record) sees every logged record.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"images must be (N, 3, H, W) uint8, got {tuple(images.shape)} {images.dtype}")
    vae.train().requires_grad_(True)
    if cfg.decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    trained = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    history, order, tick = [], torch.empty(0, dtype=torch.long), time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="vae", disable=not progress)
    for step in bar:
        if len(order) < cfg.batch_size:
            order = torch.cat([order, torch.randperm(len(images), generator=generator)])
        idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
        batch = images[idx].float() / 127.5 - 1.0
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=cfg.bfloat16):
            losses = vae_loss(vae, batch, cfg.kl_weight, generator)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            record = {"step": step + 1, "lr": lr, **{k: float(v.detach()) for k, v in losses.items()},
                      "images_per_s": cfg.batch_size * cfg.log_every / (time.perf_counter() - tick)}
            tick = time.perf_counter()
            history.append(record)
            bar.set_postfix({k: f"{record[k]:.4g}" for k in ("l1", "mse", "kl")})
            if log is not None:
                log(record)
    vae.eval().requires_grad_(False)
    return history


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 64) -> float:
    """1 / std of the posterior means over ``images`` (N, 3, H, W) uint8: the ``vae_scale`` giving unit-variance
    latents (MAR's 0.2325 for KL-16 was chosen the same way)."""
    means = [vae.encode(images[i:i + batch_size].float() / 127.5 - 1.0).mode()
             for i in range(0, len(images), batch_size)]
    return float(1.0 / torch.cat(means).std())
