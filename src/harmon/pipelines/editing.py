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
from typing import Literal

import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from ..hub import load_pretrained
from ..models.harmon import Harmon
from ..processing import check_image_size, image_to_tensor, load_image, tensor_to_pil
from ..rng import SeededRNG
from ..sampling import generate_latents
from ..settings import GenerationSettings
from ..validation import check_prompt
from .self_check import candidate_seeds, judge_candidates
from .text_to_image import TextToImageOutput, generation_prompts

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
            raise InputError(f"known-token mask {tuple(self.known.shape)} does not match the {h}x{w} token grid")
        if bool(self.known.all()):
            raise InputError("nothing to generate: every token is known")


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
            raise InputError(f"box {mask} is not inside the {image.width}x{image.height} image")
        pixels = np.zeros((image.height, image.width), dtype=bool)
        pixels[top:bottom, left:right] = True
        mask_image = Image.fromarray(pixels.astype(np.uint8) * 255, "L")
    else:
        mask_image = load_image(mask).convert("L")
        if mask_image.size != image.size:
            raise InputError(f"mask is {mask_image.size[0]}x{mask_image.size[1]}, image is {image.width}x{image.height}")
    canvas = _fit(image, size, stride)
    mask_image = mask_image.resize(canvas.size, Image.Resampling.NEAREST)
    masked = torch.from_numpy(np.asarray(mask_image) > 127)  # (H, W)
    h, w = canvas.height // stride, canvas.width // stride
    regenerate = masked.reshape(h, stride, w, stride).any(dim=3).any(dim=1)
    if not bool(regenerate.any()):
        raise InputError("the mask selects nothing to regenerate")
    return KnownRegion(canvas, ~regenerate, stride)


def outpaint_region(image, left: int = 0, top: int = 0, right: int = 0, bottom: int = 0,
                    size: tuple[int, int] | None = None, *, stride: int = STRIDE) -> KnownRegion:
    """Extend the image by the given margins (pixels, multiples of ``stride``); only the new area is generated."""
    for name, value in (("left", left), ("top", top), ("right", right), ("bottom", bottom)):
        if value < 0 or value % stride:
            raise InputError(f"{name} margin must be a non-negative multiple of {stride}, got {value}")
    if not (left or top or right or bottom):
        raise InputError("give at least one margin to extend the image by")
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
        raise InputError(f"strength must be in (0, 1], got {strength}")
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
                        dtype: str | torch.dtype = torch.float32, quantize: str | None = None) -> "EditPipeline":
        """The pipeline of a model folder in any supported layout (ours, the official Hugging Face release, a
        reference fixture), a Hugging Face repo id, or None (the shipped shapes model); ``quantize="int8"``
        for int8 weights; see :func:`harmon.hub.load_pretrained`."""
        return cls(*load_pretrained(name_or_path, device=device, dtype=dtype, quantize=quantize))

    @torch.no_grad()
    def __call__(self, region: KnownRegion, prompt: str, settings: GenerationSettings | None = None, *,
                 seed: int = 0, output_type: Literal["pil", "pt"] = "pil") -> TextToImageOutput:
        """Fill the region's unknown tokens under ``prompt`` with ``settings`` (those of
        :class:`TextToImagePipeline`; the image size is the canvas's, and the fast mode's iterations run over
        the unknown tokens only)."""
        check_prompt(prompt)
        config = self.model.config
        if region.stride != config.mar.vae_stride:
            raise InputError(f"the region was built for VAE stride {region.stride}, the model's is "
                             f"{config.mar.vae_stride}: pass stride= to the region builder")
        settings = settings or GenerationSettings()
        size = (region.canvas.height, region.canvas.width)
        if (settings.height, settings.width) not in ((None, None), size):
            raise InputError(f"an edit is drawn at its canvas's size {size[1]}x{size[0]}; leave height and width "
                             "unset")
        settings = settings.replace(height=size[0], width=size[1]).resolve(config)
        # the prompt's positions are checked before the VAE sees an image of any size
        k = settings.self_check  # candidates, each drawn over the same known tokens
        input_ids, attention_mask = generation_prompts(self.tokenizer, self.pad_id, [prompt] * k, settings, config)
        pixels = image_to_tensor(region.canvas, size)
        known_tokens = self.model.encode(pixels.to(device=self.model.device, dtype=self.model.dtype))  # (1, h, w, C)
        known = (known_tokens.expand(k, -1, -1, -1), region.known.reshape(1, -1).expand(k, -1))
        rng = SeededRNG.from_seeds(candidate_seeds(seed, k))
        tokens = generate_latents(self.model, input_ids, attention_mask, rng, settings, known=known)
        images = self.model.decode(tokens, tile=settings.vae_tile)  # (k, 3, H, W)
        checks = None
        if k > 1:
            checks = judge_candidates(self.model, self.tokenizer, images, [prompt], [seed])
            images = images[checks[0].chosen:checks[0].chosen + 1]
        return TextToImageOutput(tensor_to_pil(images) if output_type == "pil" else images, [seed], [prompt],
                                 settings, checks)
