"""What a user chooses when drawing an image or decoding an answer: one frozen, self-checking type each.

Every door (the Python API, the command line, the HTTP server, batch runs, evaluation) builds a
:class:`GenerationSettings` or :class:`DecodingSettings` and passes it down; nothing below re-checks or
renames a setting. The field names are the names everywhere: the CLI's flags are the same words with
dashes (``--guidance-scale``, with ``--cfg`` kept as a short alias), the HTTP API's JSON keys and the PNG
metadata are the same words.

Generation settings left ``None`` mean "the model's own": :meth:`GenerationSettings.resolve` fills them
from a model's :class:`~harmon.config.HarmonConfig` and checks what depends on the model (image sides
that are multiples of its VAE stride, respacings its diffusion head can take).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from .config import HarmonConfig
from .diffusion import NUM_TRAIN_TIMESTEPS, respaced_timesteps, sampling_spec
from .errors import InputError
from .validation import check_field_types

# The fast mode: half the MAR iterations, and diffusion steps annealed from 50 (first iteration) to 5
# (last), as DiSA does for Harmon. Off by default.
FAST_STEPS = (50, 5)
MAX_STEPS = 1000  # the diffusion process's timesteps: no respacing takes more
MAX_SELF_CHECK = 32  # candidates per image: each is drawn and judged, so the cost grows with it


def annealed_steps(start: int, end: int, num_iter: int) -> list[int]:
    """Diffusion steps falling linearly from ``start`` (first iteration) to ``end`` (last), as in DiSA."""
    if num_iter == 1:
        return [end]
    return [round(start + (end - start) * k / (num_iter - 1)) for k in range(num_iter)]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InputError(message)


@dataclass(frozen=True)
class GenerationSettings:
    """How an image is drawn. Defaults are the original's; ``None`` means the model's own value.

    ``guidance_scale``: classifier-free guidance (1 disables it), ``cfg_schedule`` how it grows over the
    iterations; ``temperature`` of the diffusion head's noise; ``num_iter`` MAR iterations; ``num_steps``
    diffusion steps per token: a count, a respacing string of the original (``"10,5"``, ``"ddim25"``) or one
    of these per MAR iteration; ``fast``: half the model's iterations and steps annealed 50 -> 5, for
    whichever of ``num_iter`` / ``num_steps`` is not given; ``height`` / ``width`` in pixels (``width``
    defaults to ``height``); ``vae_tile``: decode in overlapping tiles of this many latent cells (bounded
    memory, slightly changed seams), None decodes whole; ``self_check``: draw this many candidates per image
    and keep the one the model itself judges closest to the prompt (1: off; see
    :mod:`harmon.pipelines.self_check`).
    """

    guidance_scale: float = 3.0
    cfg_schedule: Literal["constant", "linear"] = "constant"
    temperature: float = 1.0
    num_iter: int | None = None
    num_steps: int | str | tuple[int | str, ...] | None = None
    fast: bool = False
    height: int | None = None
    width: int | None = None
    vae_tile: int | None = None
    self_check: int = 1

    def __post_init__(self):
        if isinstance(self.num_steps, list):
            object.__setattr__(self, "num_steps", tuple(self.num_steps))
        try:
            check_field_types(self, "")
        except ValueError as err:
            raise InputError(str(err)) from None
        _check(self.guidance_scale >= 1.0,
               f"guidance_scale must be >= 1 (1 disables guidance), got {self.guidance_scale!r}")
        _check(self.temperature > 0, f"temperature must be > 0, got {self.temperature!r}")
        _check(self.num_iter is None or self.num_iter >= 1, f"num_iter must be >= 1, got {self.num_iter!r}")
        for value in self.step_values:
            _check(str(value).strip() != "", "num_steps must not be empty text")
            _check(not str(value).isdigit() or 2 <= int(value) <= MAX_STEPS,
                   f"num_steps must be counts in 2..{MAX_STEPS} or respacing strings, got {self.num_steps!r}")
        _check(not isinstance(self.num_steps, tuple) or len(self.num_steps) > 0, "num_steps is an empty list")
        if isinstance(self.num_steps, tuple) and self.num_iter is not None:
            _check(len(self.num_steps) == self.num_iter,
                   f"{len(self.num_steps)} diffusion step counts for {self.num_iter} MAR iterations")
        for name in ("height", "width"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"{name} must be a positive number of pixels, got {value!r}")
        _check(self.vae_tile is None or self.vae_tile >= 2,
               f"vae_tile must be None or at least 2 latent cells, got {self.vae_tile!r}")
        _check(1 <= self.self_check <= MAX_SELF_CHECK,
               f"self_check must be a number of candidates in 1..{MAX_SELF_CHECK} (1: off), got {self.self_check!r}")

    @property
    def step_values(self) -> tuple[int | str, ...]:
        """``num_steps`` as a tuple: empty when None, one value, or one per MAR iteration."""
        if self.num_steps is None:
            return ()
        return self.num_steps if isinstance(self.num_steps, tuple) else (self.num_steps,)

    def replace(self, **changes: Any) -> "GenerationSettings":
        """A copy with ``changes`` (checked like any new settings)."""
        return dataclasses.replace(self, **changes)

    def resolve(self, config: HarmonConfig) -> "GenerationSettings":
        """These settings for the model of ``config``, every ``None`` filled: its iterations and image side,
        the fast mode applied, and ``num_steps`` as the respacing string(s) its diffusion head samples with
        (one, or one per iteration). Raises :class:`~harmon.errors.InputError` for what the model cannot do."""
        num_iter = self.num_iter
        if num_iter is None:
            num_iter = max(1, config.num_iter // 2) if self.fast else config.num_iter
        steps: Any = self.num_steps
        if steps is None and self.fast:
            steps = tuple(annealed_steps(*FAST_STEPS, num_iter))
        configured = config.mar.num_sampling_steps
        if isinstance(steps, tuple):
            _check(len(steps) == num_iter, f"{len(steps)} diffusion step counts for {num_iter} MAR iterations")
            specs: Any = tuple(sampling_spec(configured, s) for s in steps)
        else:
            specs = sampling_spec(configured, steps)
        for spec in specs if isinstance(specs, tuple) else (specs,):
            try:
                respaced_timesteps(NUM_TRAIN_TIMESTEPS, spec)
            except ValueError as err:
                raise InputError(f"num_steps: {err} (got {self.num_steps!r})") from None
        height = config.image_size if self.height is None else self.height
        width = height if self.width is None else self.width
        stride = config.mar.vae_stride
        for name, value in (("height", height), ("width", width)):
            _check(value % stride == 0, f"image {name} must be a positive multiple of {stride} pixels, got {value}")
        return self.replace(num_iter=num_iter, num_steps=specs, height=height, width=width)

    def grid(self, stride: int) -> tuple[int, int]:
        """The latent grid (h, w) of resolved settings for a VAE of ``stride``."""
        return self.height // stride, self.width // stride

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values under their own names (per-iteration steps as a list)."""
        data = dataclasses.asdict(self)
        if isinstance(self.num_steps, tuple):
            data["num_steps"] = list(self.num_steps)
        return data


@dataclass(frozen=True)
class DecodingSettings:
    """How an answer is decoded: greedy (the default, as the original) or sampled with ``temperature`` and
    nucleus ``top_p``, for at most ``max_new_tokens`` tokens."""

    max_new_tokens: int = 1024
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self):
        try:
            check_field_types(self, "")
        except ValueError as err:
            raise InputError(str(err)) from None
        _check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        _check(self.temperature > 0, f"temperature must be > 0 (do_sample=False decodes greedily), "
                                     f"got {self.temperature!r}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")

    def replace(self, **changes: Any) -> "DecodingSettings":
        """A copy with ``changes`` (checked like any new settings)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
