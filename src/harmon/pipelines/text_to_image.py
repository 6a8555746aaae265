"""Text-to-image: prompts -> images, with per-image seeds, guidance, progress and the original's defaults."""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..diffusion import NUM_TRAIN_TIMESTEPS, respaced_timesteps
from ..hub import load_pretrained
from ..config import HarmonConfig
from ..models.harmon import Harmon
from ..processing import (GENERATION_PREFIX, UNCONDITIONAL_PROMPT, chat_prompt, check_image_size, check_vae_tile,
                          tensor_to_pil, tokenize_prompts)
from ..rng import ReferenceRNG, SeededRNG
from ..sampling import StepInfo, annealed_steps, generate_latents
from ..validation import check_guidance, check_prompt

# The fast mode: half the MAR iterations, and diffusion steps annealed from 50 (first
# iteration) to 5 (last), as DiSA does for Harmon. Off by default.
FAST_STEPS = (50, 5)


def iteration_schedule(model_num_iter: int, num_iter: int | None, num_steps: int | str | Sequence[int] | None,
                       fast: bool) -> tuple[int, int | str | Sequence[int] | None]:
    """(MAR iterations, diffusion steps) to sample with: those given; for those not given (None), the fast
    mode's when ``fast`` (half the model's ``model_num_iter`` iterations, at least one, and steps annealed
    50 -> 5 over them), else the model's (``num_steps`` None: its configured respacing)."""
    if num_iter is None:
        num_iter = max(1, model_num_iter // 2) if fast else model_num_iter
    if num_steps is None and fast:
        num_steps = annealed_steps(*FAST_STEPS, num_iter)
    return num_iter, num_steps


def check_sampling(model: Harmon, guidance_scale: float, cfg_schedule: str, temperature: float, num_iter: int,
                   num_steps: int | str | Sequence[int] | None) -> None:
    """The sampling settings of text-to-image and editing, checked before any work (finite numbers in range)."""
    check_guidance(guidance_scale, cfg_schedule, temperature)
    if not isinstance(num_iter, int) or isinstance(num_iter, bool) or num_iter < 1:
        raise ValueError(f"num_iter must be a positive integer, got {num_iter!r}")
    values = [] if num_steps is None else [num_steps] if isinstance(num_steps, (int, str)) else list(num_steps)
    for value in values:
        if str(value).isdigit() and not 2 <= int(value) <= 1000:
            raise ValueError(f"num_steps must be integers in 2..1000, got {num_steps!r}")
        try:  # counts, or respacing strings of the original ("10,5", "ddim25")
            respaced_timesteps(NUM_TRAIN_TIMESTEPS, model.mar.diffloss.sampling_spec(value))
        except ValueError as err:
            raise ValueError(f"num_steps: {err} (got {num_steps!r})") from None
    if len(values) > 1 and len(values) != num_iter:
        raise ValueError(f"{len(values)} diffusion step counts for {num_iter} MAR iterations")


def check_positions(config: HarmonConfig, prompt_tokens: int, grid: tuple[int, int]) -> None:
    """The prompt and the image's tokens fit the LLM's positions (which also bounds the image's memory)."""
    limit, buffer = config.max_positions, config.mar.buffer_size
    needed = prompt_tokens + grid[0] * grid[1] + buffer
    if needed > limit:
        raise ValueError(f"prompt of {prompt_tokens} tokens plus {needed - prompt_tokens} image tokens "
                         f"({grid[0]}x{grid[1]} latent cells and {buffer} buffer) exceeds the LLM's {limit} "
                         "positions: shorten the prompt or the image")


def describe_steps(model: Harmon, num_steps) -> str:
    """The respacing actually used for ``num_steps`` (one value, or one per MAR iteration joined by commas)."""
    spec = model.mar.diffloss.sampling_spec
    if num_steps is None or isinstance(num_steps, (int, str)):
        return spec(num_steps)
    return ",".join(spec(s) for s in num_steps)


@dataclass
class TextToImageOutput:
    """Images (PIL, or a (N, 3, H, W) tensor in [-1, 1]), the seed of each, and the settings used."""

    images: list[Image.Image] | torch.Tensor
    seeds: list[int | None]
    prompts: list[str]
    settings: dict[str, Any] = field(default_factory=dict)


class TextToImagePipeline:
    """``pipe(prompt)`` generates images as the original ``text2image.py`` does, with explicit randomness.

    Defaults equal the original's: guidance 3.0 (constant schedule), temperature
    1.0, the model's MAR iterations, diffusion steps and image size (64, 100 and
    512 px for the released models), ``"Generate an image: "`` prefix and
    ``"Generate an image."`` as the unconditional prompt.
    """

    def __init__(self, model: Harmon, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id

    @classmethod
    def from_pretrained(cls, name_or_path=None, *, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype = torch.float32) -> "TextToImagePipeline":
        """The pipeline of a model folder in any supported layout (ours, the official Hugging Face release, a
        reference fixture), a Hugging Face repo id, or None (the shipped shapes model); see
        :func:`harmon.hub.load_pretrained`."""
        return cls(*load_pretrained(name_or_path, device=device, dtype=dtype))

    def _seeded_rng(self, count: int, generator, seeds: Sequence[int] | None) -> tuple[SeededRNG, list[int | None]]:
        if seeds is not None:
            seeds = [int(s) for s in seeds]
            if len(seeds) != count:
                raise ValueError(f"{len(seeds)} seeds for {count} images")
            return SeededRNG.from_seeds(seeds), list(seeds)
        if isinstance(generator, (list, tuple)):
            if len(generator) != count:
                raise ValueError(f"{len(generator)} generators for {count} images: pass one per image")
            return SeededRNG(list(generator)), [None] * count
        if isinstance(generator, torch.Generator):
            drawn = torch.randint(0, 2**62, (count,), generator=generator, device=generator.device).tolist()
        else:
            drawn = [secrets.randbits(62) for _ in range(count)]
        return SeededRNG.from_seeds(drawn), drawn

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], *, num_images_per_prompt: int = 1, guidance_scale: float = 3.0,
                 cfg_schedule: Literal["constant", "linear"] = "constant", temperature: float = 1.0,
                 num_iter: int | None = None, num_steps: int | str | Sequence[int] | None = None, fast: bool = False,
                 height: int | None = None, width: int | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 seeds: Sequence[int] | None = None, rng: ReferenceRNG | None = None, progress: bool = True,
                 callback: Callable[[StepInfo], None] | None = None, vae_tile: int | None = None,
                 output_type: Literal["pil", "pt"] = "pil") -> TextToImageOutput:
        """Generate ``num_images_per_prompt`` images for each prompt.

        Randomness, first match wins: ``rng`` (e.g. :class:`ReferenceRNG` to replay
        the original's stream), ``seeds`` (one int per image), ``generator`` (one per
        image, or one from which per-image seeds are drawn), else fresh random seeds.
        Either way each image depends only on its own seed, not on the batch.
        ``num_steps`` may list one diffusion step count per MAR iteration; ``fast``
        selects the fast mode (half the model's iterations, 32 for the released models,
        and steps annealed 50 -> 5) for whatever of ``num_iter`` / ``num_steps`` is not given. ``callback`` receives a
        :class:`~harmon.sampling.StepInfo` after every MAR iteration (progress, cancellation).
        ``vae_tile`` (latent cells) decodes large images in overlapping tiles within bounded
        memory (:meth:`~harmon.models.harmon.Harmon.decode`); None decodes whole.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        num_iter, num_steps = iteration_schedule(self.model.config.num_iter, num_iter, num_steps, fast)
        height = self.model.config.image_size if height is None else height
        width = height if width is None else width
        if not prompts:
            raise ValueError("no prompt given")
        for i, p in enumerate(prompts):
            check_prompt(p, f"prompt {i}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        check_sampling(self.model, guidance_scale, cfg_schedule, temperature, num_iter, num_steps)
        check_vae_tile(vae_tile)
        grid = check_image_size(height, width, self.model.config.mar.vae_stride)
        per_image = [p for p in prompts for _ in range(num_images_per_prompt)]
        if rng is None:
            rng, used_seeds = self._seeded_rng(len(per_image), generator, seeds)
        else:
            used_seeds = [None] * len(per_image)

        texts = [chat_prompt(GENERATION_PREFIX + p.strip()) for p in per_image]
        if guidance_scale != 1.0:
            texts += [chat_prompt(UNCONDITIONAL_PROMPT)] * len(per_image)
        input_ids, attention_mask = tokenize_prompts(self.tokenizer, texts, self.pad_id)
        check_positions(self.model.config, input_ids.shape[1], grid)

        bar = tqdm(total=num_iter, desc="MAR iterations", disable=not progress, leave=False)

        def on_step(info: StepInfo) -> None:
            bar.update(1)
            if callback is not None:
                callback(info)

        try:
            tokens = generate_latents(self.model, input_ids, attention_mask, rng, image_shape=grid,
                                      num_iter=num_iter, cfg=guidance_scale, cfg_schedule=cfg_schedule,
                                      temperature=temperature, num_steps=num_steps, callback=on_step)
        finally:
            bar.close()
        images = self.model.decode(tokens, tile=vae_tile)
        settings = {"guidance_scale": guidance_scale, "cfg_schedule": cfg_schedule, "temperature": temperature,
                    "num_iter": num_iter, "fast": fast,
                    "num_steps": describe_steps(self.model, num_steps),
                    "height": height, "width": width, "vae_tile": vae_tile, "model": self.model.config.name}
        return TextToImageOutput(tensor_to_pil(images) if output_type == "pil" else images, used_seeds, per_image,
                                 settings)
