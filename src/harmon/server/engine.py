"""The model's side of the server: jobs that run on the worker thread (text to image, image edits, chat)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from ..config import HarmonConfig
from ..outputs import edit_details, image_metadata, png_bytes
from ..pipelines import ChatSession, EditPipeline, ImageToTextPipeline, TextToImagePipeline
from ..sampling import StepInfo
from .chat_requests import ChatParams
from .image_requests import EditParams, GenerationParams
from .worker import Batchable, Job, JobCancelled


class Engine:
    """The loaded model with its pipelines; every method here runs on the worker thread only."""

    def __init__(self, model, tokenizer, model_path: str | Path, image_size: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.model_path = str(model_path)
        self.name = str(model.config.name)
        self.text_to_image = TextToImagePipeline(model, tokenizer)
        self.image_to_text = ImageToTextPipeline(model, tokenizer, image_size=image_size)
        self.editor = EditPipeline(model, tokenizer)

    @property
    def config(self) -> HarmonConfig:
        """The model's configuration, against which requests' settings are resolved."""
        return self.model.config

    @property
    def stride(self) -> int:
        """Pixels per latent token (the VAE's stride): image sides are multiples of it."""
        return int(self.model.config.mar.vae_stride)

    def _png(self, image, prompt: str, seed: int, settings, extra=None) -> dict[str, Any]:
        """One image as PNG bytes with its metadata (the schema of :mod:`harmon.outputs`) and its seed."""
        meta = image_metadata(prompt, seed, settings, self.model, self.model_path, extra)
        return {"png": png_bytes(image, meta), "seed": seed, "metadata": meta}

    # -- text to image ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, p: GenerationParams, job: Job) -> list[dict[str, Any]]:
        """Images for one prompt, with a ``progress`` event after every MAR iteration.

        :class:`TextToImagePipeline` with its per-iteration callback reporting progress (and
        stopping a cancelled job); a seed gives the same image as ``harmon generate --seed``.
        """
        def on_step(info: StepInfo) -> None:
            job.emit("progress", {"step": info.step + 1, "total": info.num_iter})

        result = self.text_to_image(p.prompt, p.settings, num_images_per_prompt=p.n, seeds=p.seeds, progress=False,
                                    callback=on_step)
        return [self._png(image, p.prompt, seed, result.settings, result.details(i))
                for i, (image, seed) in enumerate(zip(result.images, p.seeds))]

    def batchable(self, p: GenerationParams) -> Batchable | None:
        """How a text-to-image request may be drawn with others: with those whose resolved settings are equal
        (every field, whatever fields the settings have), in :meth:`generate_batch`. Self-check requests
        (``self_check`` > 1, candidates judged together) are drawn alone."""
        if p.settings.self_check != 1:
            return None
        return Batchable(("generate", p.settings), p.n, p, self.generate_batch)

    @torch.no_grad()
    def generate_batch(self, params: list[GenerationParams], jobs: list[Job]) -> list[list[dict[str, Any]]]:
        """The images of several requests with equal settings in one sampling loop: what :meth:`generate`
        answers each of them alone, bit for bit (an image depends only on its prompt, seed and settings:
        :mod:`harmon.batch_invariance`). Every MAR iteration sends ``progress`` to each job; a cancelled job
        stops getting events (its images are still drawn), and the loop stops when every job is cancelled."""
        def on_step(info: StepInfo) -> None:
            for job in jobs:
                try:
                    job.emit("progress", {"step": info.step + 1, "total": info.num_iter})
                except JobCancelled:
                    pass
            if all(job.cancelled.is_set() for job in jobs):
                raise JobCancelled()

        prompts = [p.prompt for p in params for _ in range(p.n)]
        seeds = [seed for p in params for seed in p.seeds]
        result = self.text_to_image(prompts, params[0].settings, seeds=seeds, progress=False, callback=on_step)
        answers, start = [], 0
        for p in params:
            answers.append([self._png(result.images[start + k], p.prompt, seed, result.settings,
                                      result.details(start + k)) for k, seed in enumerate(p.seeds)])
            start += p.n
        return answers

    # -- image editing -------------------------------------------------------------------------
    @torch.no_grad()
    def edit(self, p: EditParams, job: Job) -> dict[str, Any]:
        """Inpaint, outpaint or vary an image: :class:`EditPipeline` on the request's region.

        The same seed gives the same PNG as ``EditPipeline(...)(region, prompt, settings, seed=seed)``
        (for variations the region's tokens are chosen by ``torch.Generator().manual_seed(seed)``).
        """
        out = self.editor(p.region, p.prompt, p.settings, seed=p.seed)
        return self._png(out.images[0], p.prompt, p.seed, out.settings, edit_details(p.mode, p.region))

    # -- image understanding ---------------------------------------------------------------------
    @torch.no_grad()
    def chat(self, p: ChatParams, job: Job) -> dict[str, Any]:
        """Answer the last question of a conversation about one image, with a ``text`` event per piece."""
        session = ChatSession(self.image_to_text, p.image)
        session.history = list(p.history)
        embeds = self.image_to_text.prompt_embeds(session.conversation(p.question), session.image_embeds)
        generator = None if p.seed is None else torch.Generator().manual_seed(p.seed)  # None: a fresh seed
        count = 0

        def counted(ids: Iterator[int]) -> Iterator[int]:
            nonlocal count
            for token in ids:
                count += 1
                yield token

        pieces = []
        for piece in self.image_to_text.decode_text(counted(self.image_to_text.generate_ids(embeds, p.settings,
                                                                                           generator))):
            pieces.append(piece)
            job.emit("text", piece)
        return {"text": "".join(pieces), "prompt_tokens": int(embeds.shape[1]), "completion_tokens": count,
                "finish_reason": "length" if count >= p.settings.max_new_tokens else "stop"}
