"""Harmon as a model of lmms-eval, the harness multimodal models are compared with.

Registered through lmms-eval's entry-point group ``lmms_eval.models`` (``pyproject.toml``), so that with
lmms-eval installed beside harmon (``scripts/setup_lmms_eval.sh``)::

    lmms-eval --model harmon --model_args pretrained=wusize/Harmon-1_5B --tasks pope,mme,mmbench_en_dev

runs as for any other model. ``model_args``: ``pretrained`` (any model :func:`harmon.hub.load_pretrained`
reads; default the shipped shapes model), ``device`` and ``dtype`` (names, ``auto`` by default),
``image_size`` (default the model's: 512 px for the released models, as the original's understanding path),
``quantize`` (``int8``: int8 weights, :mod:`harmon.quantize`; default none).
Each request is answered as the original ``image2text.py`` answers: the image padded to a square with grey
and resized, ``"<image>\\n" + question`` in Harmon's chat template, greedy decoding; lmms-eval's ``until``
strings cut the answer, its ``max_new_tokens`` bounds it. Harmon reads one image: a document with several
(a few of MMMU's) is answered about its first, and their number is logged. ``batch_size`` requests (of the
same ``max_new_tokens``) are answered together (:meth:`~harmon.pipelines.ImageToTextPipeline.answer_batch`):
each answer is the one it gets alone, up to float rounding (``max_batch_size`` is accepted and not used).

This module imports lmms-eval; nothing else in harmon does.
"""
from __future__ import annotations

import logging
from typing import Any

from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from tqdm import tqdm

from ..errors import InputError
from ..pipelines import ImageToTextPipeline
from ..settings import DecodingSettings

DEFAULT_MAX_NEW_TOKENS = 128  # lmms-eval's own default when a task names none
log = logging.getLogger(__name__)


def manifest() -> ModelManifest:
    """The entry point lmms-eval loads: ``--model harmon`` is :class:`HarmonLMM`."""
    return ModelManifest(model_id="harmon", simple_class_path=f"{__name__}.HarmonLMM")


class HarmonLMM(lmms):
    """lmms-eval's ``generate_until`` over :class:`~harmon.pipelines.ImageToTextPipeline`."""

    def __init__(self, pretrained: str | None = None, device: str | None = None, dtype: str = "auto",
                 image_size: int | str | None = None, batch_size: int | str = 1,
                 max_batch_size: int | None = None, quantize: str | None = None, **unused: Any) -> None:
        super().__init__()
        if unused:
            raise InputError(f"harmon: model_args not understood: {sorted(unused)}; known: pretrained, device, "
                             "dtype, image_size, quantize")
        size = None if image_size in (None, "") else int(image_size)
        self.pipe = ImageToTextPipeline.from_pretrained(pretrained or None, device=device or "auto", dtype=dtype,
                                                        image_size=size, quantize=quantize or None)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise InputError(f"harmon: batch_size must be >= 1, got {batch_size}")

    @property
    def device(self):
        return self.pipe.model.device

    def generate_until(self, requests) -> list[str]:
        answers, several_images = [], 0
        bar = tqdm(total=len(requests), desc="harmon answers", disable=self.rank != 0)
        for chunk in _chunks(requests, self.batch_size):
            images, contexts = [], []
            for request in chunk:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
                visuals = [v for v in doc_to_visual(self.task_dict[task][split][doc_id]) if v is not None]
                if not visuals:
                    raise InputError(f"{task} document {doc_id} has no image; Harmon answers about an image")
                several_images += len(visuals) > 1
                images.append(visuals[0].convert("RGB"))
                contexts.append(context)
            decoding = DecodingSettings(max_new_tokens=_max_new_tokens(chunk[0]))  # greedy, as the original
            drawn = self.pipe.answer_batch(images, contexts, decoding)
            for request, answer in zip(chunk, drawn):
                context, gen_kwargs = request.args[:2]
                answers.append(_cut(answer, gen_kwargs.get("until")))
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answers[-1])
            bar.update(len(chunk))
        bar.close()
        if several_images:
            log.warning("%d of %d documents had several images; Harmon answered about the first of each",
                        several_images, len(requests))
        return answers

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        raise NotImplementedError("harmon answers generate_until tasks (those of the paper's table); "
                                  "loglikelihood tasks are not supported")

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("harmon does not run multi-round lmms-eval tasks")


def _max_new_tokens(request) -> int:
    return int(request.args[1].get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))


def _chunks(requests, size: int):
    """Consecutive requests, at most ``size`` together, of one ``max_new_tokens`` each."""
    chunk: list = []
    for request in requests:
        if chunk and (len(chunk) == size or _max_new_tokens(request) != _max_new_tokens(chunk[0])):
            yield chunk
            chunk = []
        chunk.append(request)
    if chunk:
        yield chunk


def _cut(text: str, until: str | list[str] | None) -> str:
    """``text`` up to the first of the ``until`` strings (lmms-eval's stop sequences)."""
    for stop in [until] if isinstance(until, str) else until or []:
        if stop:
            text = text.split(stop)[0]
    return text
