"""Request bodies, server settings and limits: everything a request may ask is checked here, before the queue.

Each violation is an :class:`ApiError` with status 400 (413 for oversized uploads) and a
message naming the field, so a client learns what to change.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, ValidationError

from ..processing import load_image
from .errors import ApiError, validation_error

MiB = 1024 * 1024


@dataclass(frozen=True)
class ServerSettings:
    """Defaults for requests that leave a setting out, the limits every request must keep, and access."""

    api_key: str | None = None
    queue_size: int = 8
    # text to image defaults (the original's) and limits
    size: int = 512
    num_iter: int = 64
    num_steps: int | None = None  # None: the model's configured diffusion steps
    guidance_scale: float = 3.0
    max_size: int = 1024
    max_images: int = 4
    max_num_iter: int = 256
    max_num_steps: int = 1000
    max_guidance_scale: float = 20.0
    max_prompt_chars: int = 2000
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


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we have no use for (user, ...)


class _ImageBody(_Body):
    """OpenAI's image-request fields and Harmon's sampling settings, shared by generations and edits."""

    n: int = 1
    response_format: str | None = "b64_json"
    model: str | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    num_iter: int | None = None
    num_steps: int | None = None
    temperature: float = 1.0
    stream: bool = False


class ImageRequest(_ImageBody):
    """``POST /v1/images/generations``: OpenAI's fields plus Harmon's settings."""

    prompt: str
    size: str | None = None  # "WIDTHxHEIGHT"


class ImageURL(_Body):
    url: str


class ContentPart(_Body):
    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class ChatRequest(_Body):
    """``POST /v1/chat/completions``: messages with one image in the first user message."""

    messages: list[Message]
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False


def parse_body(model: type[BaseModel], raw: bytes) -> Any:
    """JSON bytes -> a request model, or a 400 naming the first bad field."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        raise validation_error(err.errors(include_url=False)) from None


def check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be in [{low}, {high}], got {value}", param=name, code="invalid_value")


@dataclass(frozen=True)
class GenerationParams:
    """A checked text-to-image request."""

    prompt: str
    n: int
    width: int
    height: int
    seed: int | None
    guidance_scale: float
    num_iter: int
    num_steps: int | None
    temperature: float


def _sampling_settings(req: _ImageBody, s: ServerSettings) -> tuple[float, int, int | None]:
    """Check the seed, guidance, iterations, diffusion steps and temperature shared by generations and edits;
    returns (guidance, num_iter, num_steps) with the server's defaults filled in."""
    if req.seed is not None:
        check_range("seed", req.seed, 0, 2**63 - 1)
    guidance = s.guidance_scale if req.guidance_scale is None else req.guidance_scale
    check_range("guidance_scale", guidance, 1.0, s.max_guidance_scale)
    num_iter = s.num_iter if req.num_iter is None else req.num_iter
    check_range("num_iter", num_iter, 1, s.max_num_iter)
    num_steps = s.num_steps if req.num_steps is None else req.num_steps
    if num_steps is not None:
        check_range("num_steps", num_steps, 2, s.max_num_steps)
    check_range("temperature", req.temperature, 0.01, 10.0)
    return float(guidance), num_iter, num_steps


def generation_params(req: ImageRequest, s: ServerSettings, stride: int = 16) -> GenerationParams:
    prompt = req.prompt.strip()
    if not prompt:
        raise ApiError(400, "prompt is empty", param="prompt", code="invalid_value")
    if len(req.prompt) > s.max_prompt_chars:
        raise ApiError(400, f"prompt is {len(req.prompt)} characters, at most {s.max_prompt_chars} are allowed",
                       param="prompt", code="prompt_too_long")
    if req.response_format not in (None, "b64_json"):
        raise ApiError(400, "response_format must be 'b64_json' (this server keeps no image URLs)",
                       param="response_format", code="invalid_value")
    check_range("n", req.n, 1, s.max_images)
    width = height = s.size
    if req.size not in (None, "", "auto"):
        match = re.fullmatch(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*", req.size)
        if not match:
            raise ApiError(400, f"size must look like '512x512', got {req.size!r}", param="size", code="invalid_value")
        width, height = int(match.group(1)), int(match.group(2))
    for name, value in (("width", width), ("height", height)):
        if value < stride or value > s.max_size or value % stride:
            raise ApiError(400, f"image {name} must be a multiple of {stride} in [{stride}, {s.max_size}], "
                           f"got {value}", param="size", code="invalid_value")
    guidance, num_iter, num_steps = _sampling_settings(req, s)
    return GenerationParams(prompt, req.n, width, height, req.seed, float(guidance), num_iter, num_steps,
                            float(req.temperature))


@dataclass
class ChatParams:
    """A checked chat request: the image, earlier (question, answer) turns, the new question, decoding options."""

    image: Image.Image
    history: list[tuple[str, str]]
    question: str
    max_new_tokens: int
    temperature: float | None
    top_p: float
    seed: int | None


class EditRequest(_ImageBody):
    """``POST /v1/images/edits``: OpenAI's images/edits as JSON, with the image (and mask) as data: URLs."""

    image: str | None = None
    prompt: str | None = None
    mode: str = "inpaint"
    mask: str | None = None
    box: list[int] | None = None  # inpaint: [left, top, right, bottom] in pixels
    extend: list[int] | None = None  # outpaint: [left, top, right, bottom] margins in pixels
    strength: float | None = None  # variation: the fraction of tokens regenerated


EDIT_MODES = ("inpaint", "outpaint", "variation")


@dataclass
class EditParams:
    """A checked edit request: the region to complete (canvas and known tokens) and the sampling settings."""

    prompt: str
    mode: str
    region: Any  # harmon.pipelines.editing.KnownRegion
    details: dict[str, Any]  # the mode's own settings (box / mask, extend, strength), for the metadata
    seed: int
    guidance_scale: float
    num_iter: int
    num_steps: int | None
    temperature: float


def _four(name: str, value: list[int] | None, required: str) -> tuple[int, int, int, int]:
    if value is None:
        raise ApiError(400, required, param=name, code="invalid_value")
    if len(value) != 4:
        raise ApiError(400, f"{name} must be four integers [left, top, right, bottom], got {len(value)}",
                       param=name, code="invalid_value")
    return tuple(int(v) for v in value)  # type: ignore[return-value]


def _check_edit_size(s: ServerSettings, width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if value > s.max_size:
            raise ApiError(400, f"the edited image's {name} would be {value} pixels, at most {s.max_size} are "
                           "allowed", param="image", code="invalid_value")


def edit_params(req: EditRequest, s: ServerSettings, stride: int = 16) -> EditParams:
    """Check an edit request, decode its image(s) and build the region (call off the event loop)."""
    import secrets

    import torch

    from ..pipelines import inpaint_region, outpaint_region, variation_region

    if req.mode not in EDIT_MODES:
        raise ApiError(400, f"mode must be one of {', '.join(EDIT_MODES)}, got {req.mode!r}", param="mode",
                       code="invalid_value")
    if req.stream:
        raise ApiError(400, "stream is not supported for edits: leave it out", param="stream", code="invalid_value")
    if not req.image:
        raise ApiError(400, "image is required: the image to edit as a data: URL (data:image/png;base64,...)",
                       param="image", code="image_required")
    if req.prompt is None or not req.prompt.strip():
        raise ApiError(400, "prompt is empty", param="prompt", code="invalid_value")
    if len(req.prompt) > s.max_prompt_chars:
        raise ApiError(400, f"prompt is {len(req.prompt)} characters, at most {s.max_prompt_chars} are allowed",
                       param="prompt", code="prompt_too_long")
    if req.response_format not in (None, "b64_json"):
        raise ApiError(400, "response_format must be 'b64_json' (this server keeps no image URLs)",
                       param="response_format", code="invalid_value")
    if req.n != 1:
        raise ApiError(400, "n must be 1 for edits", param="n", code="invalid_value")
    guidance, num_iter, num_steps = _sampling_settings(req, s)
    seed = req.seed if req.seed is not None else secrets.randbits(31)
    details: dict[str, Any] = {}
    if req.mode == "inpaint":
        if req.mask is None and req.box is None:
            raise ApiError(400, "inpaint needs a mask (a data: URL, white = regenerate) or a box "
                           "[left, top, right, bottom]", param="box", code="invalid_value")
        if req.mask is not None and req.box is not None:
            raise ApiError(400, "give either mask or box, not both", param="mask", code="invalid_value")
    elif req.mode == "outpaint":
        extend = _four("extend", req.extend, "outpaint needs extend: the margins [left, top, right, bottom] "
                       f"in pixels, multiples of {stride}")
        details["extend"] = list(extend)
    else:
        if req.strength is None:
            raise ApiError(400, "variation needs strength: the fraction of the image to regenerate, in (0, 1]",
                           param="strength", code="invalid_value")
        if not 0 < req.strength <= 1:
            raise ApiError(400, f"strength must be in (0, 1], got {req.strength}", param="strength",
                           code="invalid_value")
        details["strength"] = float(req.strength)
    image = decode_image_url(req.image, s, param="image")
    param = {"inpaint": "mask" if req.mask is not None else "box", "outpaint": "extend",
             "variation": "strength"}[req.mode]
    try:
        if req.mode == "inpaint":
            if req.mask is not None:
                region = inpaint_region(image, decode_image_url(req.mask, s, param="mask"), stride=stride)
                details["mask"] = "image"
            else:
                box = _four("box", req.box, "")
                details["box"] = list(box)
                region = inpaint_region(image, box, stride=stride)
        elif req.mode == "outpaint":
            left, top, right, bottom = details["extend"]
            if min(left, top, right, bottom) >= 0:  # check the size before building the canvas
                _check_edit_size(s, max(stride, image.width // stride * stride) + left + right,
                                 max(stride, image.height // stride * stride) + top + bottom)
            region = outpaint_region(image, left=left, top=top, right=right, bottom=bottom,
                                     stride=stride)
        else:
            region = variation_region(image, req.strength, torch.Generator().manual_seed(seed), stride=stride)
    except ValueError as err:
        raise ApiError(400, str(err), param=param, code="invalid_value") from None
    _check_edit_size(s, *region.canvas.size)
    return EditParams(req.prompt.strip(), req.mode, region, details, seed, float(guidance), num_iter, num_steps,
                      float(req.temperature))


def _text_of(content: str | list[ContentPart] | None, where: str) -> tuple[str, list[str]]:
    """The text of a message and the image URLs in it."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts, urls = [], []
    for part in content:
        if part.type == "text":
            texts.append(part.text or "")
        elif part.type == "image_url":
            url = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
            if not url:
                raise ApiError(400, f"{where}: image_url part without a url", param="messages")
            urls.append(url)
        else:
            raise ApiError(400, f"{where}: unsupported content part type {part.type!r} (use text or image_url)",
                           param="messages", code="invalid_value")
    return "\n".join(t for t in texts if t), urls


def chat_messages(req: ChatRequest, s: ServerSettings) -> tuple[str, list[tuple[str, str]], str]:
    """The image URL, earlier turns and the new question of a conversation (system messages are ignored)."""
    if req.n != 1:
        raise ApiError(400, "n must be 1", param="n", code="invalid_value")
    turns = [m for m in req.messages if m.role in ("user", "assistant")]
    if not turns:
        raise ApiError(400, "messages must hold at least one user message", param="messages")
    if len(req.messages) > s.max_messages:
        raise ApiError(400, f"at most {s.max_messages} messages are allowed, got {len(req.messages)}",
                       param="messages")
    if turns[-1].role != "user":
        raise ApiError(400, "the last message must be the user's question", param="messages")
    image_url, texts = None, []
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            raise ApiError(400, "messages must alternate user and assistant, starting and ending with user",
                           param="messages")
        text, urls = _text_of(message.content, f"message {i}")
        if urls and (i != 0 or len(urls) > 1):
            raise ApiError(400, "exactly one image is allowed, in the first user message", param="messages")
        image_url = urls[0] if urls else image_url
        if len(text) > s.max_prompt_chars:
            raise ApiError(400, f"message {i} is {len(text)} characters, at most {s.max_prompt_chars} are allowed",
                           param="messages", code="prompt_too_long")
        if message.role == "user" and not text.strip():
            raise ApiError(400, f"message {i}: the question is empty", param="messages")
        texts.append(text)
    if image_url is None:
        raise ApiError(400, "the first user message must hold an image (an image_url content part with a "
                       "data: URL)", param="messages", code="image_required")
    history = [(texts[k], texts[k + 1]) for k in range(0, len(texts) - 1, 2)]
    return image_url, history, texts[-1]


def chat_params(req: ChatRequest, s: ServerSettings) -> ChatParams:
    """Check a chat request and decode its image (call off the event loop: decoding takes time)."""
    image_url, history, question = chat_messages(req, s)
    max_tokens = next((v for v in (req.max_completion_tokens, req.max_tokens) if v is not None), s.max_new_tokens)
    check_range("max_tokens", max_tokens, 1, s.max_new_tokens)
    if req.temperature is not None:
        check_range("temperature", req.temperature, 0.0, 10.0)
    top_p = 1.0 if req.top_p is None else req.top_p
    if not 0 < top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p}", param="top_p", code="invalid_value")
    if req.seed is not None:
        check_range("seed", req.seed, 0, 2**63 - 1)
    image = decode_image_url(image_url, s)
    return ChatParams(image, history, question, max_tokens, req.temperature, top_p, req.seed)


def decode_image_url(url: str, s: ServerSettings, param: str = "messages") -> Image.Image:
    """A ``data:image/...;base64,...`` URL -> RGB image, within the upload and pixel limits."""
    match = re.match(r"data:([\w/+.-]*)((?:;[\w=.-]+)*);base64,", url[:200])
    if not match:
        if url.startswith(("http://", "https://")):
            raise ApiError(400, "image URLs are not fetched: send the image inline as a data: URL "
                           "(data:image/png;base64,...)", param=param, code="unsupported_image_url")
        raise ApiError(400, "the image must be a base64 data: URL (data:image/png;base64,...)", param=param,
                       code="invalid_image")
    encoded = url[match.end():]
    if len(encoded) * 3 // 4 > s.max_upload_bytes:
        raise ApiError(413, f"the image is larger than the {s.max_upload_bytes} bytes allowed", param=param,
                       code="image_too_large")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the image's base64 data is malformed", param=param, code="invalid_image") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as opened:
                pixels = opened.width * opened.height
                if pixels > s.max_image_pixels:
                    raise ApiError(400, f"the image is {opened.width}x{opened.height} pixels, more than the "
                                   f"{s.max_image_pixels} allowed", param=param, code="image_too_large")
                opened.load()
                image = opened.copy()
        return load_image(image)
    except ApiError:
        raise
    except UnidentifiedImageError:
        raise ApiError(400, "the data is not an image in a known format (PNG, JPEG, WebP, ...)", param=param,
                       code="invalid_image") from None
    except Exception as err:  # PIL raises many kinds of errors for bad files
        raise ApiError(400, f"cannot read the image: {err}", param=param, code="invalid_image") from None
