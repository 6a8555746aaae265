"""The server's settings and what every request shares: its JSON body, the server-only limits, images as
``data:`` URLs.

What a setting may be (a guidance scale of at least 1, a positive temperature, ...) is the settings
types' rule (:mod:`harmon.settings`); the checks here are only the server's own limits (how large, how
many, how long), each an :class:`ApiError` with status 400 (413 for oversized uploads) and a message
naming the field, so a client learns what to change.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, ValidationError

from ..processing import load_image
from ..settings import GenerationSettings
from ..validation import check_prompt
from .errors import ApiError, validation_error

MiB = 1024 * 1024
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class ServerSettings:
    """Defaults for what a request leaves out, the limits every request must keep, and access.

    ``generation``: the image settings a request starts from (its ``None`` fields: the model's own);
    ``image_size``: the side images are resized to for understanding (the :class:`Engine`'s);
    ``max_batch``: images that waiting text-to-image requests of equal settings may draw in one sampling
    loop (1: each request alone), ``batch_wait``: seconds the worker waits for such requests to arrive.
    """

    api_key: str | None = None
    queue_size: int = 8
    max_batch: int = 16
    batch_wait: float = 0.02
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    # text to image and edit limits
    max_size: int = 1024
    max_images: int = 4
    max_num_iter: int = 256
    max_num_steps: int = 1000
    max_guidance_scale: float = 20.0
    max_temperature: float = 10.0
    max_prompt_chars: int = 2000
    max_self_check: int = 8  # candidates drawn per image when a request asks for self-check
    # image understanding
    image_size: int = 512
    max_new_tokens: int = 1024
    max_messages: int = 64
    max_upload_bytes: int = 10 * MiB
    max_image_pixels: int = 4096 * 4096

    @property
    def max_body_bytes(self) -> int:
        """Largest request body: one base64 image of the largest upload plus room for the text."""
        return self.max_upload_bytes * 4 // 3 + 4 + 2 * MiB


class Body(BaseModel):
    """A JSON request body; OpenAI clients send fields we have no use for (user, ...), which are ignored."""

    model_config = ConfigDict(extra="ignore")


def parse_body(model: type[BaseModel], raw: bytes) -> Any:
    """JSON bytes -> a request model, or a 400 naming the first bad field."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        raise validation_error(err.errors(include_url=False)) from None


def check_limit(name: str, value: float | None, high: float, low: float | None = None) -> None:
    """``value`` (None: not given) is within the server's limit ``high`` (and ``low``); else a 400 naming it."""
    if value is None:
        return
    if value > high or (low is not None and value < low):
        bound = f"in [{low}, {high}]" if low is not None else f"at most {high}"
        raise ApiError.invalid(f"{name} must be {bound}, got {value}", param=name)


def check_seed(seed: int | None) -> None:
    """A seed, when given, is a non-negative 63-bit integer (what ``torch.Generator.manual_seed`` takes)."""
    check_limit("seed", seed, MAX_SEED, low=0)


def check_text(text: str, s: ServerSettings, name: str) -> str:
    """A prompt or question: the library's rule (UTF-8, not blank) and the server's length limit; stripped."""
    check_prompt(text, name)
    if len(text) > s.max_prompt_chars:
        raise ApiError.invalid(f"{name} is {len(text)} characters, at most {s.max_prompt_chars} are allowed",
                               param=name, code="prompt_too_long")
    return text.strip()


def check_b64_json(response_format: str | None) -> None:
    """Images come back inline only: ``response_format`` left out or ``b64_json``."""
    if response_format not in (None, "b64_json"):
        raise ApiError.invalid("response_format must be 'b64_json' (this server keeps no image URLs)",
                               param="response_format")


def decode_image_url(url: str, s: ServerSettings, param: str = "messages") -> Image.Image:
    """A ``data:image/...;base64,...`` URL -> RGB image, within the upload and pixel limits (call it off the
    event loop: decoding takes time)."""
    match = re.match(r"data:([\w/+.-]*)((?:;[\w=.-]+)*);base64,", url[:200])
    if not match:
        if url.startswith(("http://", "https://")):
            raise ApiError.invalid("image URLs are not fetched: send the image inline as a data: URL "
                                   "(data:image/png;base64,...)", param=param, code="unsupported_image_url")
        raise ApiError.invalid("the image must be a base64 data: URL (data:image/png;base64,...)", param=param,
                               code="invalid_image")
    encoded = url[match.end():]
    if len(encoded) * 3 // 4 > s.max_upload_bytes:
        raise ApiError(413, f"the image is larger than the {s.max_upload_bytes} bytes allowed", param=param,
                       code="image_too_large")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError.invalid("the image's base64 data is malformed", param=param, code="invalid_image") from None
    return _open_image(raw, s, param)


def _open_image(raw: bytes, s: ServerSettings, param: str) -> Image.Image:
    """Encoded image bytes -> RGB image, refusing more than ``s.max_image_pixels`` before decoding them."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as opened:
                if opened.width * opened.height > s.max_image_pixels:
                    raise ApiError.invalid(f"the image is {opened.width}x{opened.height} pixels, more than the "
                                           f"{s.max_image_pixels} allowed", param=param, code="image_too_large")
                opened.load()
                image = opened.copy()
        return load_image(image)
    except ApiError:
        raise
    except UnidentifiedImageError:
        raise ApiError.invalid("the data is not an image in a known format (PNG, JPEG, WebP, ...)", param=param,
                               code="invalid_image") from None
    except Exception as err:  # PIL raises many kinds of errors for bad files
        raise ApiError.invalid(f"cannot read the image: {err}", param=param, code="invalid_image") from None
