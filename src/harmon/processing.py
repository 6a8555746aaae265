"""Prompts and images in and out of Harmon: chat template, tokenisation, image pre/post-processing."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import InputError

CHAT_TEMPLATE = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
GENERATION_PREFIX = "Generate an image: "
UNCONDITIONAL_PROMPT = "Generate an image."
IMAGE_TOKEN = "<image>"
PAD_COLOR = (127, 127, 127)
MAX_IMAGE_PIXELS = 8192 * 8192  # refuse decompression bombs before decoding


def chat_prompt(text: str) -> str:
    """One user turn in the Qwen chat template, ending where the assistant's answer starts."""
    return CHAT_TEMPLATE.format(input=text)


def tokenize_prompts(tokenizer, texts: Sequence[str], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise already-templated texts and right-pad them: ids (B, T) int64, attention mask (B, T) bool."""
    return pad_right([tokenizer.encode(t, add_special_tokens=False) for t in texts], pad_id)


def pad_right(rows: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer rows right-padded with ``value``: (B, T) int64 and the (B, T) bool mask of real entries."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = True
    return ids, mask


def load_image(source: str | os.PathLike | Image.Image) -> Image.Image:
    """Open an image as 8-bit RGB: EXIF rotation applied, transparency composited on white, any mode converted.

    Raises ``ValueError`` naming the file when it is missing, unreadable or too large.
    """
    if isinstance(source, Image.Image):
        image, name = source, "image"
    else:
        name = os.fspath(source)
        if not os.path.isfile(name):
            raise InputError(f"image not found: {name}")
        try:
            with Image.open(name) as opened:
                if opened.width * opened.height > MAX_IMAGE_PIXELS:
                    raise InputError(f"{name} is {opened.width}x{opened.height} pixels, more than the "
                                     f"{MAX_IMAGE_PIXELS} allowed")
                opened.load()
                image = opened.copy()
        except ValueError:
            raise
        except Exception as err:  # PIL raises many types for corrupt files
            raise InputError(f"cannot read image {name}: {err}") from err
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: rescale to 8 bits
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.width < 1 or image.height < 1:
        raise InputError(f"{name} is empty ({image.width}x{image.height})")
    return image.convert("RGB")


def pad_to_square(image: Image.Image, color: tuple[int, int, int] = PAD_COLOR) -> Image.Image:
    """Centre the image on a square canvas of its longer side, filled with ``color``."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), color)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def image_to_tensor(image: Image.Image, size: int | tuple[int, int]) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) float32 in [-1, 1], resized (bicubic) to ``size`` (side or (height, width))."""
    height, width = (size, size) if isinstance(size, int) else size
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    array = 2.0 * (np.asarray(image, dtype=np.float32) / 255.0) - 1.0  # (H, W, 3), as the original
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def understanding_input(image: Image.Image, size: int) -> torch.Tensor:
    """The original's understanding preprocessing: pad to square with grey 127, resize, scale to [-1, 1]."""
    return image_to_tensor(pad_to_square(image), size)


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in about [-1, 1] -> PIL images, as the original: clamp(127.5 x + 128, 0, 255)."""
    pixels = torch.clamp(127.5 * images.detach().float().cpu() + 128.0, 0, 255).to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).numpy(), "RGB") for p in pixels]


def check_image_size(height: int, width: int, stride: int = 16) -> tuple[int, int]:
    """The latent grid (h, w) of an image size; sizes must be positive multiples of ``stride``."""
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value < stride or value % stride:
            raise InputError(f"image {name} must be a positive multiple of {stride} pixels, got {value!r}")
    return height // stride, width // stride


def check_understanding_size(image_size: int, stride: int, buffer_size: int, max_positions: int) -> None:
    """An understanding image side: a positive multiple of ``stride`` whose tokens (and the buffer) leave
    room for a question in the LLM's positions. Checked before the VAE sees the image (its memory grows
    with the size)."""
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < stride or image_size % stride:
        raise InputError(f"image_size must be a positive multiple of {stride}, got {image_size!r}")
    tokens = (image_size // stride) ** 2 + buffer_size
    if tokens >= max_positions:
        raise InputError(f"image_size {image_size} makes {tokens} image tokens, more than the LLM's {max_positions} "
                         "positions hold with a question")
