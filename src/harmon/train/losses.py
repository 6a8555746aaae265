"""The two training objectives of Harmon, exact to the original ``HarmonDev``.

* text-to-image: MAR masking of the image's latent tokens, the LLM reads the
  caption then the visible tokens, the diffusion loss is averaged over the
  masked tokens, each repeated ``diffusion_batch_mul`` times.
* image-to-text: next-token cross-entropy on answer tokens, with the gradient
  flowing into the visual features scaled by ``grad_scale``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.harmon import Harmon

IMAGE_TOKEN_INDEX = -200  # marks image slots in training input_ids
IGNORE_INDEX = -100


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; multiplies the incoming gradient by ``scale``."""
    return _ScaleGradient.apply(x, scale)


@dataclass
class TextToImageLoss:
    """The loss and what went into it (for logging and replay)."""

    loss: torch.Tensor          # scalar
    orders: torch.Tensor        # (B, L) int64
    mask: torch.Tensor          # (B, L) float, 1 = masked (predicted)
    latents: torch.Tensor       # (B, L, C) ground-truth tokens
    z: torch.Tensor             # (B, L, D_dec) decoder conditions
    timesteps: torch.Tensor     # (mul * B * L,) int64
    noise: torch.Tensor         # (mul * B * L, C)
    terms: dict[str, torch.Tensor]  # per-row mse / vb / loss


def text_to_image_loss(model: Harmon, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor, rng) -> TextToImageLoss:
    """Diffusion loss of generating ``pixel_values`` (B, 3, H, W) from right-padded prompts (B, T).

    ``rng`` supplies, in this order, the per-row orders, one mask ratio, the
    timesteps and the noise (:class:`harmon.rng.ReferenceRNG` reproduces the original's draws).
    """
    with torch.no_grad():
        latents = model.encode(pixel_values.to(device=model.device, dtype=model.dtype))  # (B, h, w, C)
    b, h, w, c = latents.shape
    seq_len, mul = h * w, model.config.mar.diffusion_batch_mul
    orders = rng.train_orders(b, seq_len).to(model.device)
    num_masked = int(math.ceil(seq_len * rng.mask_ratio(model.config.mar.mask_ratio_min)))
    mask = torch.zeros(b, seq_len, device=model.device).scatter_(1, orders[:, :num_masked], 1.0)

    x_enc = model.forward_mae_encoder(latents, mask, attention_mask.to(model.device),
                                      input_ids=input_ids.to(model.device), num_masked=num_masked)
    z = model.mar.forward_mae_decoder(x_enc, mask, image_shape=(h, w))  # (B, L, D_dec)

    target = latents.reshape(b * seq_len, c).repeat(mul, 1)  # rows: [all tokens] x mul, not interleaved
    z_rows = z.reshape(b * seq_len, -1).repeat(mul, 1)
    mask_rows = mask.reshape(b * seq_len).repeat(mul)
    diffloss = model.mar.diffloss
    t = rng.train_timesteps(b, seq_len, mul, diffloss.train_diffusion.num_timesteps).to(model.device)
    noise = rng.train_noise(b, seq_len, mul, c).to(device=model.device, dtype=target.dtype)
    terms = diffloss.train_diffusion.training_losses(lambda x, tt: diffloss.net(x, tt, z_rows), target, t, noise)
    loss = (terms["loss"] * mask_rows).sum() / mask_rows.sum()
    return TextToImageLoss(loss, orders, mask, latents.reshape(b, seq_len, c), z, t, noise, terms)


def latent_readout_loss(readout: torch.nn.Linear, t2i: TextToImageLoss) -> torch.Tensor:
    """Mean squared error of a linear readout of the decoder's conditions against the masked tokens' latents.

    An auxiliary loss, not the original's: it rewards conditions z (B, L, D_dec) that hold the content
    of the token they condition, which a masked token can only get from its visible neighbours. A small
    MAR trained on the diffusion loss alone learns to shut the visible tokens out of its masked tokens'
    attention instead (docs/shapes.md). The readout (D_dec -> C) belongs to the trainer and is not exported.
    """
    err = ((readout(t2i.z.float()) - t2i.latents.float()) ** 2).mean(dim=-1)  # (B, L)
    return (err * t2i.mask).sum() / t2i.mask.sum()


def image_to_text_loss(model: Harmon, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       labels: torch.Tensor, pixel_values: torch.Tensor | None, grad_scale: float = 0.1
                       ) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (labels >= 0) given the image and the prompt.

    input_ids (B, T) hold ``IMAGE_TOKEN_INDEX`` at the image slots, as many per
    row as the image has visual tokens (h*w + buffer). Without images, a zero
    multiple of a dummy visual feature keeps every visual parameter in the graph
    (needed by distributed data-parallel), as the original does.
    """
    token_losses, null_loss = image_to_text_token_losses(model, input_ids, attention_mask, labels, pixel_values,
                                                         grad_scale)
    return token_losses.mean() + null_loss


def image_to_text_token_losses(model: Harmon, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                               labels: torch.Tensor, pixel_values: torch.Tensor | None, grad_scale: float = 0.1
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-answer-token cross-entropy (N,) and the zero-valued term keeping unused visual parameters in the graph."""
    device = model.device
    input_ids, attention_mask, labels = input_ids.to(device), attention_mask.to(device), labels.to(device)
    embed = model.llm.get_input_embeddings()
    if pixel_values is None:
        dummy = torch.zeros(1, 16, 16, model.token_dim, device=device, dtype=model.dtype)
        inputs_embeds = embed(input_ids)
        null_loss = model.extract_visual_feature(dummy)[1].mean() * 0.0
    else:
        with torch.no_grad():
            latents = model.encode(pixel_values.to(device=device, dtype=model.dtype))
        _, z_enc = model.extract_visual_feature(latents)
        if grad_scale is not None:
            z_enc = scale_gradient(z_enc, grad_scale)
        inputs_embeds = model.multimodal_embeds(input_ids, z_enc, IMAGE_TOKEN_INDEX)
        null_loss = inputs_embeds.new_zeros(())
    hidden = model.llm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                            use_cache=False).last_hidden_state
    hidden, targets = hidden[:, :-1], labels[:, 1:]
    keep = targets >= 0
    logits = model.llm.get_output_embeddings()(hidden[keep])
    return F.cross_entropy(logits.float(), targets[keep], reduction="none"), null_loss
