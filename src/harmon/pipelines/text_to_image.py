"""Text-to-image: prompts -> images, with per-image seeds, guidance, progress and the original's defaults."""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..config import HarmonConfig
from ..errors import InputError
from ..hub import load_pretrained
from ..models.harmon import Harmon
from ..processing import GENERATION_PREFIX, UNCONDITIONAL_PROMPT, chat_prompt, tensor_to_pil, tokenize_prompts
from ..rng import ReferenceRNG, SeededRNG
from ..sampling import StepInfo, TokenRNG, generate_latents
from ..settings import GenerationSettings
from ..validation import check_prompt
from .self_check import SelfCheckResult, candidate_seeds, judge_candidates


def check_positions(config: HarmonConfig, prompt_tokens: int, grid: tuple[int, int]) -> None:
    """The prompt and the image's tokens fit the LLM's positions (which also bounds the image's memory)."""
    limit, buffer = config.max_positions, config.mar.buffer_size
    needed = prompt_tokens + grid[0] * grid[1] + buffer
    if needed > limit:
        raise InputError(f"prompt of {prompt_tokens} tokens plus {needed - prompt_tokens} image tokens "
                         f"({grid[0]}x{grid[1]} latent cells and {buffer} buffer) exceeds the LLM's {limit} "
                         "positions: shorten the prompt or the image")


def generation_prompts(tokenizer, pad_id: int, prompts: Sequence[str], settings: GenerationSettings,
                       config: HarmonConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) (N or 2N, T) of the chat prompts for ``prompts``, the unconditional prompt
    N times after them when guided; checked against the LLM's positions for resolved ``settings``' image."""
    texts = [chat_prompt(GENERATION_PREFIX + p.strip()) for p in prompts]
    if settings.guidance_scale != 1.0:
        texts += [chat_prompt(UNCONDITIONAL_PROMPT)] * len(prompts)
    input_ids, attention_mask = tokenize_prompts(tokenizer, texts, pad_id)
    check_positions(config, input_ids.shape[1], settings.grid(config.mar.vae_stride))
    return input_ids, attention_mask


@dataclass
class TextToImageOutput:
    """Images (PIL, or a (N, 3, H, W) tensor in [-1, 1]), the seed of each, and the settings used (resolved:
    nothing left to the model's defaults); with ``settings.self_check`` > 1 also how each image was chosen."""

    images: list[Image.Image] | torch.Tensor
    seeds: list[int | None]
    prompts: list[str]
    settings: GenerationSettings
    self_check: list[SelfCheckResult] | None = None

    def details(self, i: int) -> dict[str, object]:
        """Image ``i``'s metadata beyond prompt, seed and settings: how self-check chose it (empty when off)."""
        return {} if self.self_check is None else self.self_check[i].metadata()


class TextToImagePipeline:
    """``pipe(prompt)`` generates images as the original ``text2image.py`` does, with explicit randomness.

    Default settings equal the original's: guidance 3.0 (constant schedule), temperature
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
                        dtype: str | torch.dtype = torch.float32, quantize: str | None = None) -> "TextToImagePipeline":
        """The pipeline of a model folder in any supported layout (ours, the official Hugging Face release, a
        reference fixture), a Hugging Face repo id, or None (the shipped shapes model); ``quantize="int8"``
        for int8 weights; see :func:`harmon.hub.load_pretrained`."""
        return cls(*load_pretrained(name_or_path, device=device, dtype=dtype, quantize=quantize))

    def _seeded_rng(self, count: int, generator, seeds: Sequence[int] | None, candidates: int = 1
                    ) -> tuple[TokenRNG, list[int | None]]:
        """The randomness of ``count`` images, ``candidates`` of each (image-major), and the images' seeds."""
        if isinstance(generator, ReferenceRNG):
            if candidates > 1:
                raise InputError("self_check draws its candidates from per-image seeds: it cannot replay the "
                                 "original's random stream (ReferenceRNG); pass seeds instead")
            return generator, [None] * count
        if seeds is not None:
            seeds = [int(s) for s in seeds]
            if len(seeds) != count:
                raise InputError(f"{len(seeds)} seeds for {count} images")
        elif isinstance(generator, (list, tuple)):
            if len(generator) != count:
                raise InputError(f"{len(generator)} generators for {count} images: pass one per image")
            if candidates == 1:
                return SeededRNG(list(generator)), [None] * count
            seeds = [int(torch.randint(0, 2**62, (1,), generator=g, device=g.device)) for g in generator]
        elif isinstance(generator, torch.Generator):
            seeds = torch.randint(0, 2**62, (count,), generator=generator, device=generator.device).tolist()
        else:
            seeds = [secrets.randbits(62) for _ in range(count)]
        return SeededRNG.from_seeds([c for s in seeds for c in candidate_seeds(s, candidates)]), list(seeds)

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], settings: GenerationSettings | None = None, *,
                 num_images_per_prompt: int = 1,
                 generator: torch.Generator | Sequence[torch.Generator] | ReferenceRNG | None = None,
                 seeds: Sequence[int] | None = None, progress: bool = True,
                 callback: Callable[[StepInfo], None] | None = None,
                 output_type: Literal["pil", "pt"] = "pil") -> TextToImageOutput:
        """Generate ``num_images_per_prompt`` images for each prompt with ``settings`` (default: the
        original's, see :class:`~harmon.settings.GenerationSettings`).

        Randomness, first match wins: ``generator`` a :class:`ReferenceRNG` (replays the original's
        stream), ``seeds`` (one int per image), ``generator`` (one per image, or one from which per-image
        seeds are drawn), else fresh random seeds. Either way each image depends only on its own seed, not
        on the batch. With ``settings.self_check`` = k > 1 each image is the best of k candidates by the model's
        own judgement (:mod:`~harmon.pipelines.self_check`); candidate 0 has the image's seed, so k = 1 draws
        the same image as candidate 0, and ``seeds`` stay the images' seeds. ``callback`` receives a
        :class:`~harmon.sampling.StepInfo` after every MAR iteration (progress, cancellation).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise InputError("no prompt given")
        for i, p in enumerate(prompts):
            check_prompt(p, f"prompt {i}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise InputError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        config = self.model.config
        settings = (settings or GenerationSettings()).resolve(config)
        per_image = [p for p in prompts for _ in range(num_images_per_prompt)]
        k = settings.self_check
        rng, used_seeds = self._seeded_rng(len(per_image), generator, seeds, k)
        candidates = [p for p in per_image for _ in range(k)]
        input_ids, attention_mask = generation_prompts(self.tokenizer, self.pad_id, candidates, settings, config)

        bar = tqdm(total=settings.num_iter, desc="MAR iterations", disable=not progress, leave=False)

        def on_step(info: StepInfo) -> None:
            bar.update(1)
            if callback is not None:
                callback(info)

        try:
            tokens = generate_latents(self.model, input_ids, attention_mask, rng, settings, callback=on_step)
        finally:
            bar.close()
        # (N * k, 3, H, W), image-major; one image at a time: a convolution rounds differently with the batch size
        images = torch.cat([self.model.decode(t.unsqueeze(0), tile=settings.vae_tile) for t in tokens])
        checks = None
        if k > 1:
            checks = judge_candidates(self.model, self.tokenizer, images, per_image, used_seeds)
            images = images[[i * k + c.chosen for i, c in enumerate(checks)]]
        return TextToImageOutput(tensor_to_pil(images) if output_type == "pil" else images, used_seeds, per_image,
                                 settings, checks)
