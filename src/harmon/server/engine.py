"""The model's side of the server: jobs that run on the worker thread (text to image, image edits, chat)."""
from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, Iterator

import torch

from ..batch import image_metadata, png_bytes
from ..pipelines import ChatSession, EditPipeline, ImageToTextPipeline, TextToImagePipeline
from ..sampling import StepInfo
from .inputs import ChatParams, EditParams, GenerationParams
from .worker import Job


class Engine:
    """The loaded model with its pipelines; every method here runs on the worker thread only."""

    def __init__(self, model, tokenizer, model_path: str | Path, image_size: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.model_path = str(model_path)
        self.name = str(model.config.name)
        self.stride = int(model.config.mar.vae_stride)
        self.text_to_image = TextToImagePipeline(model, tokenizer)
        self.image_to_text = ImageToTextPipeline(model, tokenizer, image_size=image_size)
        self.editor = EditPipeline(model, tokenizer)

    # -- text to image ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, p: GenerationParams, job: Job) -> list[dict[str, Any]]:
        """Images for one prompt, with a ``progress`` event after every MAR iteration.

        :class:`TextToImagePipeline` with its per-iteration callback reporting progress (and
        stopping a cancelled job); a seed gives the same image as ``harmon generate --seed``.
        """
        start = p.seed if p.seed is not None else secrets.randbits(31)
        seeds = [start + k for k in range(p.n)]

        def on_step(info: StepInfo) -> None:
            job.emit("progress", {"step": info.step + 1, "total": info.num_iter})

        result = self.text_to_image(p.prompt, num_images_per_prompt=p.n, guidance_scale=p.guidance_scale,
                                    temperature=p.temperature, num_iter=p.num_iter, num_steps=p.num_steps,
                                    height=p.height, width=p.width, seeds=seeds, progress=False,
                                    callback=on_step)
        images, num_steps = result.images, result.settings["num_steps"]
        out = []
        for image, seed in zip(images, seeds):
            meta = image_metadata({"prompt": p.prompt, "seed": seed, "cfg": p.guidance_scale,
                                   "cfg_schedule": "constant", "temperature": p.temperature, "num_iter": p.num_iter,
                                   "num_steps": num_steps, "height": p.height, "width": p.width},
                                  self.model, self.model_path)
            out.append({"png": png_bytes(image, meta), "seed": seed, "metadata": meta})
        return out

    # -- image editing -------------------------------------------------------------------------
    @torch.no_grad()
    def edit(self, p: EditParams, job: Job) -> dict[str, Any]:
        """Inpaint, outpaint or vary an image: :class:`EditPipeline` on the request's region.

        The same seed gives the same PNG as ``EditPipeline(...)(region, prompt, seed=seed)``
        (for variations the region's tokens are chosen by ``torch.Generator().manual_seed(seed)``).
        """
        out = self.editor(p.region, p.prompt, seed=p.seed, guidance_scale=p.guidance_scale,
                          temperature=p.temperature, num_iter=p.num_iter, num_steps=p.num_steps)
        image, settings = out.images[0], out.settings
        meta = image_metadata({"prompt": p.prompt, "seed": p.seed, "edit_mode": p.mode, **p.details,
                               "cfg": p.guidance_scale, "cfg_schedule": settings["cfg_schedule"],
                               "temperature": p.temperature, "num_iter": p.num_iter,
                               "num_steps": settings["num_steps"], "height": image.height, "width": image.width,
                               "known_tokens": settings["known_tokens"],
                               "generated_tokens": settings["generated_tokens"]}, self.model, self.model_path)
        return {"png": png_bytes(image, meta), "seed": p.seed, "metadata": meta}

    # -- image understanding ---------------------------------------------------------------------
    @torch.no_grad()
    def chat(self, p: ChatParams, job: Job) -> dict[str, Any]:
        """Answer the last question of a conversation about one image, with a ``text`` event per piece."""
        session = ChatSession(self.image_to_text, p.image)
        session.history = list(p.history)
        embeds = self.image_to_text.prompt_embeds(session.conversation(p.question), session.image_embeds)
        decode: dict[str, Any] = {"max_new_tokens": p.max_new_tokens}
        if p.temperature:  # absent or 0: greedy, as OpenAI's temperature 0 and the original's default
            seed = p.seed if p.seed is not None else secrets.randbits(62)
            decode.update(do_sample=True, temperature=p.temperature, top_p=p.top_p,
                          generator=torch.Generator().manual_seed(seed))
        count = 0

        def counted(ids: Iterator[int]) -> Iterator[int]:
            nonlocal count
            for token in ids:
                count += 1
                yield token

        pieces = []
        for piece in self.image_to_text.decode_text(counted(self.image_to_text.generate_ids(embeds, **decode))):
            pieces.append(piece)
            job.emit("text", piece)
        return {"text": "".join(pieces), "prompt_tokens": int(embeds.shape[1]), "completion_tokens": count,
                "finish_reason": "length" if count >= p.max_new_tokens else "stop"}
