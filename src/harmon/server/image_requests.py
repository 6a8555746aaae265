"""Image requests, generations and edits -> what the engine draws: a prompt, seeds and resolved
:class:`~harmon.settings.GenerationSettings`.

A request's settings keys are the settings' field names (``guidance_scale``, ``cfg_schedule``,
``temperature``, ``num_iter``, ``num_steps``, ``fast``, ``vae_tile``); what it leaves out comes from
:attr:`ServerSettings.generation`, and the settings type checks the result. The image's size is OpenAI's
``size`` (``"WIDTHxHEIGHT"``) for generations and the edited canvas's for edits.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

import torch
from PIL import Image

from ..config import HarmonConfig
from ..errors import InputError
from ..pipelines import KnownRegion, inpaint_region, outpaint_region, variation_region
from ..settings import GenerationSettings
from .errors import ApiError
from .inputs import Body, ServerSettings, check_b64_json, check_limit, check_seed, check_text, decode_image_url

REQUEST_SETTINGS = ("guidance_scale", "cfg_schedule", "temperature", "num_iter", "num_steps", "fast", "vae_tile",
                    "self_check")
EDIT_MODES = ("inpaint", "outpaint", "variation")


class ImageBody(Body):
    """OpenAI's image-request fields and the generation settings a request may set, under their own names."""

    n: int = 1
    response_format: str | None = "b64_json"
    model: str | None = None
    seed: int | None = None
    stream: bool = False
    guidance_scale: float | None = None
    cfg_schedule: str | None = None
    temperature: float | None = None
    num_iter: int | None = None
    num_steps: int | None = None  # diffusion steps per token (a count; the server's limit is max_num_steps)
    fast: bool | None = None
    vae_tile: int | None = None
    self_check: int | None = None  # candidates per image, judged by the model (the server's limit: max_self_check)

    def settings(self, s: ServerSettings) -> GenerationSettings:
        """The server's default settings with those this request gives in their place (checked by the type)."""
        check_limit("num_steps", self.num_steps, s.max_num_steps)
        given = {name: getattr(self, name) for name in REQUEST_SETTINGS if getattr(self, name) is not None}
        return s.generation.replace(**given)


class ImageRequest(ImageBody):
    """``POST /v1/images/generations``: OpenAI's fields plus the generation settings."""

    prompt: str
    size: str | None = None  # "WIDTHxHEIGHT"; left out (or "auto"): the server's default


class EditRequest(ImageBody):
    """``POST /v1/images/edits``: OpenAI's images/edits as JSON, with the image (and mask) as data: URLs."""

    image: str | None = None
    prompt: str | None = None
    mode: str = "inpaint"
    mask: str | None = None
    box: list[int] | None = None  # inpaint: [left, top, right, bottom] in pixels
    extend: list[int] | None = None  # outpaint: [left, top, right, bottom] margins in pixels
    strength: float | None = None  # variation: the fraction of tokens regenerated


@dataclass(frozen=True)
class GenerationParams:
    """A checked text-to-image request: image k of ``n`` is drawn with seed ``seed + k``."""

    prompt: str
    n: int
    seed: int
    settings: GenerationSettings

    @property
    def seeds(self) -> list[int]:
        return [self.seed + k for k in range(self.n)]


@dataclass(frozen=True)
class EditParams:
    """A checked edit request: the region to complete (canvas and known tokens), its seed and settings."""

    prompt: str
    mode: str
    region: KnownRegion
    seed: int
    settings: GenerationSettings


def check_settings(settings: GenerationSettings, s: ServerSettings) -> None:
    """Resolved settings within the server's limits (what a setting may be at all, the type has checked)."""
    check_limit("guidance_scale", settings.guidance_scale, s.max_guidance_scale)
    check_limit("temperature", settings.temperature, s.max_temperature)
    check_limit("num_iter", settings.num_iter, s.max_num_iter)
    check_limit("self_check", settings.self_check, s.max_self_check)


def parse_size(size: str | None) -> tuple[int, int] | None:
    """OpenAI's ``"WIDTHxHEIGHT"`` -> (width, height); None for the server's default (left out or ``"auto"``)."""
    if size in (None, "", "auto"):
        return None
    match = re.fullmatch(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*", size)
    if not match:
        raise ApiError.invalid(f"size must look like '512x512', got {size!r}", param="size")
    return int(match.group(1)), int(match.group(2))


def generation_params(req: ImageRequest, s: ServerSettings, config: HarmonConfig) -> GenerationParams:
    """Check a text-to-image request against the server's limits and the model of ``config``."""
    prompt = check_text(req.prompt, s, "prompt")
    check_b64_json(req.response_format)
    check_limit("n", req.n, s.max_images, low=1)
    check_seed(req.seed)
    settings = req.settings(s)
    size = parse_size(req.size)
    if size is not None:
        settings = settings.replace(width=size[0], height=size[1])
    settings = settings.resolve(config)
    for name, value in (("width", settings.width), ("height", settings.height)):
        if value > s.max_size:
            raise ApiError.invalid(f"image {name} must be at most {s.max_size} pixels, got {value}", param="size")
    check_settings(settings, s)
    seed = req.seed if req.seed is not None else secrets.randbits(31)
    return GenerationParams(prompt, req.n, seed, settings)


def _check_edit_request(req: EditRequest, s: ServerSettings) -> str:
    """What an edit request must give before its image is decoded; returns the prompt, stripped."""
    if req.mode not in EDIT_MODES:
        raise ApiError.invalid(f"mode must be one of {', '.join(EDIT_MODES)}, got {req.mode!r}", param="mode")
    if req.stream:
        raise ApiError.invalid("stream is not supported for edits: leave it out", param="stream")
    if not req.image:
        raise ApiError.invalid("image is required: the image to edit as a data: URL (data:image/png;base64,...)",
                               param="image", code="image_required")
    prompt = check_text(req.prompt or "", s, "prompt")
    check_b64_json(req.response_format)
    if req.n != 1:
        raise ApiError.invalid("n must be 1 for edits", param="n")
    check_seed(req.seed)
    if req.mode == "inpaint" and req.mask is None and req.box is None:
        raise ApiError.invalid("inpaint needs a mask (a data: URL, white = regenerate) or a box "
                               "[left, top, right, bottom]", param="box")
    if req.mode == "inpaint" and req.mask is not None and req.box is not None:
        raise ApiError.invalid("give either mask or box, not both", param="mask")
    if req.mode == "variation" and req.strength is None:
        raise ApiError.invalid("variation needs strength: the fraction of the image to regenerate, in (0, 1]",
                               param="strength")
    return prompt


def edit_params(req: EditRequest, s: ServerSettings, config: HarmonConfig) -> EditParams:
    """Check an edit request, decode its image(s) and build the region (call it off the event loop)."""
    prompt = _check_edit_request(req, s)
    base = req.settings(s).replace(height=None, width=None)  # an edit is drawn at its canvas's size
    seed = req.seed if req.seed is not None else secrets.randbits(31)
    stride = config.mar.vae_stride
    if req.mode == "outpaint":  # the margins are checked before the image is decoded
        extend = _four("extend", req.extend, "outpaint needs extend: the margins [left, top, right, bottom] in "
                       f"pixels, multiples of {stride}")
    image = decode_image_url(req.image, s, param="image")
    if req.mode == "inpaint":
        region = _inpaint(req, image, s, stride)
    elif req.mode == "outpaint":
        region = _outpaint(image, extend, s, stride)
    else:
        region = _built("strength", variation_region, image, req.strength, torch.Generator().manual_seed(seed),
                        stride=stride)
    _check_edit_size(s, *region.canvas.size)
    settings = base.replace(width=region.canvas.width, height=region.canvas.height).resolve(config)
    check_settings(settings, s)
    return EditParams(prompt, req.mode, region, seed, settings)


def _inpaint(req: EditRequest, image: Image.Image, s: ServerSettings, stride: int) -> KnownRegion:
    """The region of an inpaint: a mask image or a box."""
    if req.mask is not None:
        return _built("mask", inpaint_region, image, decode_image_url(req.mask, s, param="mask"), stride=stride)
    return _built("box", inpaint_region, image, _four("box", req.box, ""), stride=stride)


def _outpaint(image: Image.Image, extend: tuple[int, int, int, int], s: ServerSettings, stride: int) -> KnownRegion:
    """The region of an outpaint, its size checked before the canvas is built."""
    left, top, right, bottom = extend
    if min(extend) >= 0:  # negative margins are the region builder's to refuse
        _check_edit_size(s, max(stride, image.width // stride * stride) + left + right,
                         max(stride, image.height // stride * stride) + top + bottom)
    return _built("extend", outpaint_region, image, left=left, top=top, right=right, bottom=bottom, stride=stride)


def _built(param: str, build, *args, **kwargs) -> KnownRegion:
    """``build(*args, **kwargs)``, its refusal (the library's message) a 400 naming the request's ``param``."""
    try:
        return build(*args, **kwargs)
    except InputError as err:
        raise ApiError.invalid(str(err), param=param) from None


def _four(name: str, value: list[int] | None, required: str) -> tuple[int, int, int, int]:
    if value is None:
        raise ApiError.invalid(required, param=name)
    if len(value) != 4:
        raise ApiError.invalid(f"{name} must be four integers [left, top, right, bottom], got {len(value)}",
                               param=name)
    return tuple(int(v) for v in value)  # type: ignore[return-value]


def _check_edit_size(s: ServerSettings, width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if value > s.max_size:
            raise ApiError.invalid(f"the edited image's {name} would be {value} pixels, at most {s.max_size} are "
                                   "allowed", param="image")
