"""Image editing with Harmon's MAR loop: inpainting, outpainting and variations.

MAR fills masked latent tokens, so a partly known image is completed by giving
the known tokens and generating only the others, in the same loop and order
logic as text-to-image (the original exposes no way to do it). Each edit is a
:class:`KnownRegion` (a canvas in pixels and which of its tokens are known),
built by :func:`inpaint_region`, :func:`outpaint_region` or
:func:`variation_region`, and run by :class:`EditPipeline`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image

from ..hub import load_pretrained
from ..models.harmon import Harmon
from ..processing import (GENERATION_PREFIX, UNCONDITIONAL_PROMPT, chat_prompt, check_image_size, check_vae_tile,
                          image_to_tensor, load_image, tensor_to_pil, tokenize_prompts)
from ..rng import SeededRNG
from ..sampling import generate_latents
from ..validation import check_prompt
from .text_to_image import TextToImageOutput, check_positions, check_sampling, describe_steps, iteration_schedule

STRIDE = 16  # the released models' VAE stride (KL-16); pass the model's own as ``stride``


@dataclass
class KnownRegion:
    """A canvas (RGB image whose sides are multiples of ``stride``, the model's VAE stride) and its known
    tokens (h, w) bool, True = keep."""

    canvas: Image.Image
    known: torch.Tensor
    stride: int = STRIDE

    def __post_init__(self):
        h, w = check_image_size(self.canvas.height, self.canvas.width, self.stride)
        if tuple(self.known.shape) != (h, w):
            raise ValueError(f"known-token mask {tuple(self.known.shape)} does not match the {h}x{w} token grid")
        if bool(self.known.all()):
            raise ValueError("nothing to generate: every token is known")


def _fit(image: Image.Image, size: tuple[int, int] | None, stride: int) -> Image.Image:
    """Resize to (width, height), or to the image's own size rounded down to multiples of ``stride``."""
    if size is None:
        size = (max(stride, image.width // stride * stride), max(stride, image.height // stride * stride))
    return image if image.size == tuple(size) else image.resize(tuple(size), Image.Resampling.BICUBIC)


def inpaint_region(image, mask: Image.Image | str | tuple[int, int, int, int], size: tuple[int, int] | None = None,
                   *, stride: int = STRIDE) -> KnownRegion:
    """Regenerate where ``mask`` is set: a mask image (white = regenerate) or a (left, top, right, bottom) box.

    The mask is taken at the image's size; a token is regenerated when any of its
    ``stride`` x ``stride`` pixels is masked. ``size`` (width, height) resizes image and mask first.
    """
    image = load_image(image)
    if isinstance(mask, tuple):
        left, top, right, bottom = mask
        if not (0 <= left < right <= image.width and 0 <= top < bottom <= image.height):
            raise ValueError(f"box {mask} is not inside the {image.width}x{image.height} image")
        pixels = np.zeros((image.height, image.width), dtype=bool)
        pixels[top:bottom, left:right] = True
        mask_image = Image.fromarray(pixels.astype(np.uint8) * 255, "L")
    else:
        mask_image = load_image(mask).convert("L")
        if mask_image.size != image.size:
            raise ValueError(f"mask is {mask_image.size[0]}x{mask_image.size[1]}, image is {image.width}x{image.height}")
    canvas = _fit(image, size, stride)
    mask_image = mask_image.resize(canvas.size, Image.Resampling.NEAREST)
    masked = torch.from_numpy(np.asarray(mask_image) > 127)  # (H, W)
    h, w = canvas.height // stride, canvas.width // stride
    regenerate = masked.reshape(h, stride, w, stride).any(dim=3).any(dim=1)
    if not bool(regenerate.any()):
        raise ValueError("the mask selects nothing to regenerate")
    return KnownRegion(canvas, ~regenerate, stride)


def outpaint_region(image, left: int = 0, top: int = 0, right: int = 0, bottom: int = 0,
                    size: tuple[int, int] | None = None, *, stride: int = STRIDE) -> KnownRegion:
    """Extend the image by the given margins (pixels, multiples of ``stride``); only the new area is generated."""
    for name, value in (("left", left), ("top", top), ("right", right), ("bottom", bottom)):
        if value < 0 or value % stride:
            raise ValueError(f"{name} margin must be a non-negative multiple of {stride}, got {value}")
    if not (left or top or right or bottom):
        raise ValueError("give at least one margin to extend the image by")
    image = _fit(load_image(image), size, stride)
    canvas = Image.new("RGB", (image.width + left + right, image.height + top + bottom), (127, 127, 127))
    canvas.paste(image, (left, top))
    h, w = canvas.height // stride, canvas.width // stride
    known = torch.zeros(h, w, dtype=torch.bool)
    known[top // stride: (top + image.height) // stride, left // stride: (left + image.width) // stride] = True
    return KnownRegion(canvas, known, stride)


def variation_region(image, strength: float, generator: torch.Generator,
                     size: tuple[int, int] | None = None, *, stride: int = STRIDE) -> KnownRegion:
    """Regenerate a random ``strength`` fraction of the tokens (0 < strength <= 1), chosen by ``generator``."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    canvas = _fit(load_image(image), size, stride)
    h, w = canvas.height // stride, canvas.width // stride
    count = max(1, round(strength * h * w))
    chosen = torch.randperm(h * w, generator=generator, device=generator.device)[:count].cpu()
    known = torch.ones(h * w, dtype=torch.bool)
    known[chosen] = False
    return KnownRegion(canvas, known.view(h, w), stride)


class EditPipeline:
    """``pipe(region, prompt, seed=0)``: complete a :class:`KnownRegion` under a text prompt.

    Settings and defaults are those of :class:`TextToImagePipeline`; the known
    tokens are the VAE encoding of the canvas and are never changed.
    """

    def __init__(self, model: Harmon, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.eos_token_id

    @classmethod
    def from_pretrained(cls, name_or_path=None, *, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype = torch.float32) -> "EditPipeline":
        """The pipeline of a model folder in any supported layout (ours, the official Hugging Face release, a
        reference fixture), a Hugging Face repo id, or None (the shipped shapes model); see
        :func:`harmon.hub.load_pretrained`."""
        return cls(*load_pretrained(name_or_path, device=device, dtype=dtype))

    @torch.no_grad()
    def __call__(self, region: KnownRegion, prompt: str, *, seed: int = 0, guidance_scale: float = 3.0,
                 cfg_schedule: Literal["constant", "linear"] = "constant", temperature: float = 1.0,
                 num_iter: int | None = None, num_steps: int | str | Sequence[int] | None = None, fast: bool = False,
                 vae_tile: int | None = None, output_type: Literal["pil", "pt"] = "pil") -> TextToImageOutput:
        """Fill the region's unknown tokens under ``prompt``; ``num_iter`` defaults to the model's.

        ``fast`` and ``vae_tile`` mean what they mean to :class:`TextToImagePipeline` (the fast mode's
        iterations run over the unknown tokens only).
        """
        num_iter, num_steps = iteration_schedule(self.model.config.num_iter, num_iter, num_steps, fast)
        check_prompt(prompt)
        check_sampling(self.model, guidance_scale, cfg_schedule, temperature, num_iter, num_steps)
        check_vae_tile(vae_tile)
        if region.stride != self.model.config.mar.vae_stride:
            raise ValueError(f"the region was built for VAE stride {region.stride}, the model's is "
                             f"{self.model.config.mar.vae_stride}: pass stride= to the region builder")
        h, w = region.known.shape
        texts = [chat_prompt(GENERATION_PREFIX + prompt.strip())]
        if guidance_scale != 1.0:
            texts.append(chat_prompt(UNCONDITIONAL_PROMPT))
        input_ids, attention_mask = tokenize_prompts(self.tokenizer, texts, self.pad_id)
        check_positions(self.model.config, input_ids.shape[1], (h, w))  # before the VAE sees an image of any size
        pixels = image_to_tensor(region.canvas, (region.canvas.height, region.canvas.width))
        known_tokens = self.model.encode(pixels.to(device=self.model.device, dtype=self.model.dtype))  # (1, h, w, C)
        tokens = generate_latents(self.model, input_ids, attention_mask, SeededRNG.from_seeds([seed]),
                                  image_shape=(h, w), num_iter=num_iter, cfg=guidance_scale,
                                  cfg_schedule=cfg_schedule, temperature=temperature, num_steps=num_steps,
                                  known_tokens=known_tokens, known_mask=region.known.reshape(1, -1))
        images = self.model.decode(tokens, tile=vae_tile)
        settings = {"guidance_scale": guidance_scale, "cfg_schedule": cfg_schedule, "temperature": temperature,
                    "num_iter": num_iter, "fast": fast, "num_steps": describe_steps(self.model, num_steps),
                    "height": region.canvas.height, "width": region.canvas.width, "vae_tile": vae_tile,
                    "model": self.model.config.name,
                    "known_tokens": int(region.known.sum()), "generated_tokens": int((~region.known).sum())}
        return TextToImageOutput(tensor_to_pil(images) if output_type == "pil" else images, [seed], [prompt],
                                 settings)
