"""The model as it is trained: which parts learn (freezing, LoRA), both objectives behind one ``forward``,
and the optimiser with its learning-rate schedule (the original's recipe)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import InputError
from ..models.harmon import Harmon
from ..rng import TrainingRNG
from .config import TrainConfig
from .losses import image_to_text_token_losses, latent_readout_loss, text_to_image_loss


def part_parameters(model: Harmon, part: str) -> list[nn.Parameter]:
    """The parameters of one trainable part: llm, mar_encoder, mar_decoder (with the diffusion head), projections."""
    mar = model.mar
    groups = {
        "llm": [model.llm],
        "mar_encoder": [mar.z_proj, mar.z_proj_ln, mar.encoder_blocks, mar.encoder_norm, mar.class_emb],
        "mar_decoder": [mar.decoder_embed, mar.decoder_blocks, mar.decoder_norm, mar.diffloss],
        "projections": [model.proj_in, model.proj_out],
    }
    loose = {"mar_encoder": [mar.fake_latent, mar.encoder_pos_embed_learned],
             "mar_decoder": [mar.mask_token, mar.decoder_pos_embed_learned, mar.diffusion_pos_embed_learned]}
    params = [p for m in groups[part] for p in m.parameters()]
    return params + loose.get(part, [])


def prepare_model(model: Harmon, cfg: TrainConfig) -> Harmon:
    """Freeze what the config says (the VAE always), add LoRA, switch on gradient checkpointing, compile."""
    model.requires_grad_(True)
    model.vae.requires_grad_(False)
    for part in cfg.freeze:
        for p in part_parameters(model, part):
            p.requires_grad_(False)
    if cfg.lora.r > 0:
        from peft import LoraConfig as PeftLoraConfig, get_peft_model

        # on the decoder stack (llm.model), so code that calls llm.model(...) runs the adapted layers
        model.llm.model = get_peft_model(model.llm.model, PeftLoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules)))
    if cfg.gradient_checkpointing:
        model.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.mar.grad_checkpointing = True
        model.mar.diffloss.net.grad_checkpointing = True
    if cfg.compile:
        model.compile_for_training()
    return model


def build_optimizer(model: Harmon, cfg: TrainConfig, extra: nn.Module | None = None) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters and those of ``extra`` (the trainer's own modules);
    no weight decay on 1-D parameters, biases and the diffusion head (as the original)."""
    decay, no_decay = [], []
    named = list(model.named_parameters()) + (list(extra.named_parameters(prefix="extra")) if extra else [])
    for name, p in named:
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(".bias") or name.startswith("mar.diffloss."):
            no_decay.append(p)
        else:
            decay.append(p)
    if not decay and not no_decay:
        raise InputError("nothing to train: every part is frozen")
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_ratio`` of the steps, then cosine decay to ``min_lr_ratio``."""
    warmup = max(1, round(cfg.optim.warmup_ratio * cfg.max_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.max_steps - warmup)
    return cfg.optim.min_lr_ratio + (1 - cfg.optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class HarmonForTraining(nn.Module):
    """Both objectives behind one ``forward`` (so DistributedDataParallel sees the call).

    With ``latent_readout`` it also owns the linear readout of that auxiliary loss
    (:func:`~harmon.train.losses.latent_readout_loss`), started at zero; it is trained and
    checkpointed with the model but not exported.
    """

    def __init__(self, model: Harmon, latent_readout: bool = False):
        super().__init__()
        self.model = model
        self.readout = None
        if latent_readout:
            mar = model.config.mar
            self.readout = nn.Linear(mar.decoder_embed_dim, mar.vae_embed_dim, device=model.device)
            nn.init.zeros_(self.readout.weight)
            nn.init.zeros_(self.readout.bias)

    def forward(self, t2i: dict | None, i2t: dict | None, rng: TrainingRNG | None) -> dict[str, torch.Tensor]:
        """The step's losses: ``t2i`` (and ``t2i_readout``) for a caption batch, the image-to-text token losses'
        sum, count and null term (``i2t_sum``, ``i2t_count``, ``i2t_null``) for a conversation batch."""
        if t2i is None and i2t is None:
            # every image of this step was unreadable: a zero loss over all trainable weights keeps the
            # step (and, with several processes, the gradient all-reduce) going
            return {"empty": sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0}
        out = {}
        if t2i is not None:
            t2i_loss = text_to_image_loss(self.model, t2i["pixel_values"], t2i["input_ids"],
                                          t2i["attention_mask"], rng)
            out["t2i"] = t2i_loss.loss
            if self.readout is not None:
                out["t2i_readout"] = latent_readout_loss(self.readout, t2i_loss)
        if i2t is not None:
            losses, null = image_to_text_token_losses(self.model, i2t["input_ids"], i2t["attention_mask"],
                                                      i2t["labels"], i2t["pixel_values"])
            out["i2t_sum"], out["i2t_count"], out["i2t_null"] = losses.sum(), losses.numel(), null
        return out
