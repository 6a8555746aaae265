"""The unified Harmon model: KL-16 VAE + MAR (+ diffusion head) + Qwen2 LLM + proj_in / proj_out.

Data flow shared by understanding and generation (shapes for one image of
h x w latent pixels, L = h*w tokens, buffer K):

    latents (B, h, w, 16) --MAR encoder over visible tokens--> x_enc (B, K + visible, D_enc)
    --proj_in, buffer moved to the end--> z_enc (B, visible + K, H_llm) --> LLM after the text
    --last hidden states, buffer back to front, proj_out--> x_enc + residual --MAR decoder--> z (B, L, D_dec)
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import DynamicCache, DynamicLayer, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from ..config import HarmonConfig
from ..errors import InputError
from .mar import MAR
from .vae import AutoencoderKL


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.SiLU(), nn.Linear(d_hidden, d_out))


def qwen2_config(llm: dict) -> Qwen2Config:
    """A fresh ``Qwen2Config`` (SDPA attention) from the keyword dict held by :class:`HarmonConfig`."""
    config = Qwen2Config(**copy.deepcopy(llm))
    config._attn_implementation = "sdpa"
    return config


class Harmon(nn.Module):
    """Harmon with the original's attribute names (``vae``, ``llm``, ``mar``, ``proj_in``, ``proj_out``).

    Build it with :func:`harmon.checkpoint.load_model` to get weights; the
    constructor allocates randomly initialised parameters (or meta tensors
    under ``torch.device("meta")``). The VAE is frozen.
    """

    quantization: str | None = None  # "int8" once harmon.quantize has stored its weights as int8

    def __init__(self, config: HarmonConfig):
        super().__init__()
        self.config = config
        self.vae = AutoencoderKL(config.vae)
        self.llm = Qwen2ForCausalLM(qwen2_config(config.llm))
        self.mar = MAR(config.mar)
        hidden, enc = config.llm_hidden_size, config.mar.encoder_embed_dim
        self.proj_in = _mlp(enc, hidden, hidden)
        self.proj_out = _mlp(hidden, hidden, enc)
        self.vae.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.mar.fake_latent.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mar.fake_latent.dtype

    @property
    def token_dim(self) -> int:
        return self.config.mar.token_embed_dim

    @property
    def buffer_size(self) -> int:
        return self.config.mar.buffer_size

    def compile_for_sampling(self, **options) -> None:
        """Compile, with ``torch.compile`` (in place, state-dict keys unchanged), what generation runs
        most often: the diffusion head's network (every diffusion step) and the MAR encoder and decoder
        blocks (every MAR iteration). ``options`` go to ``torch.compile`` (default ``dynamic=True``: the
        token counts change every iteration). Outputs equal the eager ones up to float rounding; the first
        calls pay the compilation (tens of seconds). The LLM stays eager: its KV cache changes layout
        every iteration, which would recompile it each time.
        """
        options = {"dynamic": True, **options}
        self.mar.diffloss.net.compile(**options)
        for block in (*self.mar.encoder_blocks, *self.mar.decoder_blocks):
            block.compile(**options)

    def compile_for_training(self, **options) -> None:
        """What :meth:`compile_for_sampling` compiles, plus every decoder layer of the LLM (training runs
        it without a KV cache, so only the batch's lengths vary, which ``dynamic=True`` absorbs). Losses
        equal the eager ones up to float rounding; the first steps pay the compilation. Call it after
        LoRA is added, so that the adapted layers are the ones compiled.
        """
        options = {"dynamic": True, **options}
        self.compile_for_sampling(**options)
        for module in self.llm.modules():
            if isinstance(module, Qwen2DecoderLayer):
                module.compile(**options)

    # -- VAE ------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> scaled latent tokens (B, H/s, W/s, C): s the VAE stride, C its channels."""
        latents = self.vae.encode(images).mode() * self.config.vae_scale
        return latents.permute(0, 2, 3, 1)

    def decode(self, tokens: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """scaled latent tokens (B, h, w, C) -> images (B, 3, s*h, s*w), s the VAE stride; roughly in [-1, 1].

        The output is not clamped. ``tile`` (latent cells) decodes in overlapping tiles within bounded memory
        (:meth:`AutoencoderKL.decode_tiled`); None decodes whole, exactly as the original.
        """
        latents = (tokens / self.config.vae_scale).permute(0, 3, 1, 2)
        return self.vae.decode(latents) if tile is None else self.vae.decode_tiled(latents, tile)

    # -- visual features ---------------------------------------------------------------------
    def extract_visual_feature(self, tokens: torch.Tensor, mask: torch.Tensor | None = None, *,
                               num_masked: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, h, w, C), mask (B, h*w) float with 1 = dropped (None: keep all).

        ``num_masked`` (dropped tokens per row, when the caller knows it) spares reading the
        mask back from the device.

        Returns x_enc (B, K + visible, D_enc) with the buffer first, and
        z_enc = proj_in(x_enc) (B, visible + K, H_llm) with the buffer moved to the end.
        """
        b, h, w, c = tokens.shape
        tokens = tokens.reshape(b, h * w, c)
        if mask is None:
            mask, num_masked = tokens.new_zeros(b, h * w), 0
        buffer_embed = self.mar.fake_latent.expand(b, -1)
        x_enc = self.mar.forward_mae_encoder(tokens, mask, buffer_embed, image_shape=(h, w), num_masked=num_masked)
        z_enc = self.proj_in(x_enc)
        k = self.buffer_size
        return x_enc, torch.cat([z_enc[:, k:], z_enc[:, :k]], dim=1)

    def llm_residual(self, x_enc: torch.Tensor, z_enc: torch.Tensor, attention_mask: torch.Tensor, *,
                     cache: DynamicCache | None = None, text_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Run the LLM over the text then z_enc and add proj_out of its image states to x_enc.

        attention_mask (B, T) marks the real (right-padded) text tokens. With ``cache``
        (holding the T text positions) only the image tokens are run, and the cache
        grows by their count (crop it afterwards); otherwise ``text_embeds`` (B, T, H)
        precede them in one pass. Image positions continue from each row's text length.
        """
        l = z_enc.shape[1]
        mask, position_ids = context_mask_and_positions(attention_mask, l)
        if cache is not None:
            out = self.llm.model(inputs_embeds=z_enc, attention_mask=mask, position_ids=position_ids[:, -l:],
                                 cache=cache, use_cache=True)
        else:
            out = self.llm.model(inputs_embeds=torch.cat([text_embeds, z_enc], dim=1), attention_mask=mask,
                                 position_ids=position_ids, use_cache=False)
        z_llm = out.last_hidden_state[:, -l:]
        k = self.buffer_size
        z_llm = torch.cat([z_llm[:, -k:], z_llm[:, :-k]], dim=1)  # buffer back to the front
        return x_enc + self.proj_out(z_llm)

    def forward_mae_encoder(self, tokens: torch.Tensor, mask: torch.Tensor, attention_mask: torch.Tensor, *,
                            input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                            cache: DynamicCache | None = None, num_masked: int | None = None) -> torch.Tensor:
        """MAR encoder + LLM context: tokens (B, h, w, C) -> x_enc (B, K + visible, D_enc)."""
        x_enc, z_enc = self.extract_visual_feature(tokens, mask, num_masked=num_masked)
        if cache is None and inputs_embeds is None:
            inputs_embeds = self.llm.get_input_embeddings()(input_ids)
        return self.llm_residual(x_enc, z_enc, attention_mask, cache=cache, text_embeds=inputs_embeds)

    # -- text --------------------------------------------------------------------------------
    def prefill(self, input_ids: torch.Tensor) -> DynamicCache:
        """One pass over right-padded prompts (B, T) without a mask; returns the KV cache of T positions."""
        cache = DynamicCache(config=self.llm.config)
        self.llm.model(input_ids=input_ids, cache=cache, use_cache=True)
        return cache

    def multimodal_embeds(self, input_ids: torch.Tensor, image_embeds: torch.Tensor, image_token_id: int
                          ) -> torch.Tensor:
        """Token embeddings with the ``image_token_id`` slots filled, in order, by image_embeds (B, n, H)."""
        is_image = input_ids == image_token_id
        if int(is_image.sum()) != image_embeds.shape[0] * image_embeds.shape[1]:
            raise InputError(f"the prompt has {int(is_image.sum())} image placeholder tokens but the image gives "
                             f"{image_embeds.shape[0] * image_embeds.shape[1]} embeddings")
        embed = self.llm.get_input_embeddings()
        out = image_embeds.new_zeros(*input_ids.shape, image_embeds.shape[-1])
        out[is_image] = image_embeds.reshape(-1, image_embeds.shape[-1]).to(out.dtype)
        out[~is_image] = embed(input_ids[~is_image]).to(out.dtype)
        return out


def context_mask_and_positions(text_mask: torch.Tensor, num_image_tokens: int
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask (B, T + l) bool and position ids (B, T + l) for l image tokens after right-padded text.

    Positions are cumsum(mask) - 1 clamped at 0: image tokens continue from each
    row's real text length, pads repeat the last real position (they are masked).
    """
    b = text_mask.shape[0]
    mask = torch.cat([text_mask.to(torch.bool),
                      torch.ones(b, num_image_tokens, dtype=torch.bool, device=text_mask.device)], dim=1)
    return mask, (mask.long().cumsum(dim=1) - 1).clamp(min=0)


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Cut every layer of ``cache`` back to its first ``length`` positions."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def reserve_room(cache: DynamicCache, room: int) -> DynamicCache:
    """Turn every layer of a prefilled ``cache`` into a :class:`RoomyLayer` with ``room`` free positions."""
    cache.layers = [RoomyLayer(layer, room) for layer in cache.layers]
    return cache


class RoomyLayer(DynamicLayer):
    """A KV-cache layer whose keys and values live in one buffer allocated up front, with room after them.

    An update writes its positions right after the current ones and returns views of the buffer, so
    the generation loop, which appends an iteration's image tokens to the prompt's cache and then
    crops them off again (:func:`crop_cache`, a view here too), neither concatenates nor allocates per
    iteration. The values attention sees are the ones :class:`DynamicLayer` would give.
    """

    def __init__(self, layer: DynamicLayer, room: int):
        super().__init__()
        b, heads, length, dim = layer.keys.shape  # (B, kv_heads, T, head_dim)
        self._keys = layer.keys.new_empty(b, heads, length + room, dim)
        self._values = layer.values.new_empty(b, heads, length + room, dim)
        self._keys[:, :, :length], self._values[:, :, :length] = layer.keys, layer.values
        self.keys, self.values = self._keys[:, :, :length], self._values[:, :, :length]
        self.device, self.is_initialized = layer.keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            raise InputError(f"the KV cache has room for {self._keys.shape[-2]} positions, {end} were asked")
        self._keys[:, :, start:end], self._values[:, :, start:end] = key_states, value_states
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values
