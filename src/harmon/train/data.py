"""Training data: the formats users already have, image preparation, tokenisation and batching.

Readers (each returns a list of examples, paths resolved and checked lazily):

* :func:`read_finetune` – the original FINETUNE layout: ``data_info.json`` listing
  ``{"image": ..., "annotation": ...}`` with images and caption JSONs (``{"caption": ...}``)
  under two folders;
* :func:`read_jsonl` – one ``{"image": ..., "caption": ...}`` per line;
* :func:`read_llava` – LLaVA-style conversation JSON for understanding data.

Images are centre-cropped to a square for generation and padded to a square
(grey 127) for understanding, as the original does. An image that cannot be
read makes its example come back as ``None``; the batcher drops it and counts it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from ..errors import InputError
from ..processing import (GENERATION_PREFIX, IMAGE_TOKEN, UNCONDITIONAL_PROMPT, chat_prompt, image_to_tensor,
                          load_image, pad_right, understanding_input)
from ..rng import derive_seed
from .losses import IGNORE_INDEX, IMAGE_TOKEN_INDEX


@dataclass(frozen=True)
class CaptionExample:
    """An image and its caption (text-to-image)."""

    image: Path
    caption: str


@dataclass(frozen=True)
class ConversationExample:
    """An image and (question, answer) turns about it (image-to-text)."""

    image: Path
    turns: tuple[tuple[str, str], ...]


def _load_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read {path}: {err}") from err


def read_finetune(root: str | Path, data_info: str = "data_info.json", images: str = "images",
                  annotations: str = "annotations") -> list[CaptionExample]:
    """The FINETUNE layout: ``root/data_info.json`` with images under ``root/images``, captions under ``root/annotations``."""
    root = Path(root)
    entries = _load_json(root / data_info)
    if not isinstance(entries, list):
        raise InputError(f"{root / data_info} must hold a list of {{'image', 'annotation'}} entries")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry or "annotation" not in entry:
            raise InputError(f"{root / data_info} entry {i} lacks 'image' or 'annotation'")
        annotation = _load_json(root / annotations / entry["annotation"])
        caption = annotation.get("caption") if isinstance(annotation, dict) else None
        if not isinstance(caption, str) or not caption.strip():
            raise InputError(f"{root / annotations / entry['annotation']} has no caption")
        out.append(CaptionExample(root / images / entry["image"], caption.strip()))
    return out


def read_jsonl(path: str | Path) -> list[CaptionExample]:
    """``{"image": path, "caption": text}`` per line; relative image paths are taken from the file's folder."""
    path = Path(path)
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise InputError(f"cannot read {path}: {err}") from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path} line {number}: not JSON ({err.msg})") from err
        if not isinstance(item, dict) or not isinstance(item.get("image"), str) or \
                not isinstance(item.get("caption"), str) or not item["caption"].strip():
            raise InputError(f"{path} line {number}: needs 'image' and a non-empty 'caption'")
        out.append(CaptionExample(path.parent / item["image"], item["caption"].strip()))
    return out


def read_llava(path: str | Path, image_root: str | Path | None = None) -> list[ConversationExample]:
    """LLaVA conversations: ``[{"image", "conversations": [{"from": "human"|"gpt", "value"}, ...]}]``.

    The ``<image>`` marker is removed from the questions (the image always comes
    first, as in the original); image paths are relative to ``image_root``
    (default: the JSON file's folder).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    items = _load_json(path)
    if not isinstance(items, list):
        raise InputError(f"{path} must hold a list of conversations")
    out = []
    for i, item in enumerate(items):
        conv = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(conv, list) or not isinstance(item.get("image"), str) or len(conv) < 2 or len(conv) % 2:
            raise InputError(f"{path} item {i}: needs 'image' and an even list of 'conversations'")
        turns = []
        for q, a in zip(conv[0::2], conv[1::2]):
            if q.get("from") != "human" or a.get("from") != "gpt":
                raise InputError(f"{path} item {i}: turns must alternate human / gpt")
            question = q["value"].replace(IMAGE_TOKEN, "").strip()
            turns.append((question, a["value"].strip()))
        out.append(ConversationExample(root / item["image"], tuple(turns)))
    return out


def center_crop_square(image: Image.Image) -> Image.Image:
    """The largest centred square of the image."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


class Batcher:
    """Turns examples into model-ready batches (tokenised, padded, images prepared).

    ``uncond_prob`` of the captions are replaced by the unconditional prompt; the
    choice is drawn per example from ``(seed, step, sample index)``, so it does not
    depend on how a global batch is split over processes.
    """

    def __init__(self, tokenizer, image_size: int, num_image_tokens: int, uncond_prob: float = 0.1,
                 seed: int = 0, max_length: int = 2048):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens
        self.uncond_prob = uncond_prob
        self.seed = seed
        self.max_length = max_length
        self.pad_id = tokenizer.eos_token_id
        self.skipped: list[str] = []

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _image(self, path: Path, crop: bool) -> torch.Tensor | None:
        try:
            image = load_image(path)
        except ValueError as err:
            self.skipped.append(str(err))
            return None
        if crop:
            return image_to_tensor(center_crop_square(image), self.image_size)[0]
        return understanding_input(image, self.image_size)[0]

    def text_to_image(self, examples: Sequence[CaptionExample], sample_ids: Sequence[int], step: int) -> dict | None:
        """pixel_values (B, 3, S, S), input_ids / attention_mask (B, T) right-padded, sample_ids (B,)."""
        pixels, rows, kept = [], [], []
        for example, sid in zip(examples, sample_ids):
            image = self._image(example.image, crop=True)
            if image is None:
                continue
            drop = torch.rand((), generator=torch.Generator().manual_seed(derive_seed(self.seed, step, sid, 7)))
            text = UNCONDITIONAL_PROMPT if float(drop) < self.uncond_prob else GENERATION_PREFIX + example.caption
            pixels.append(image)
            rows.append(self._encode(chat_prompt(text))[: self.max_length])
            kept.append(sid)
        if not rows:
            return None
        ids, mask = pad_right(rows, self.pad_id)
        return {"pixel_values": torch.stack(pixels), "input_ids": ids, "attention_mask": mask,
                "sample_ids": kept}

    def image_to_text(self, examples: Sequence[ConversationExample], sample_ids: Sequence[int]) -> dict | None:
        """pixel_values, input_ids with IMAGE_TOKEN_INDEX slots, attention_mask, labels (answers + <|im_end|>)."""
        pixels, rows, label_rows, kept = [], [], [], []
        for example, sid in zip(examples, sample_ids):
            image = self._image(example.image, crop=False)
            if image is None:
                continue
            ids, labels = self._conversation(example.turns)
            pixels.append(image)
            rows.append(ids[: self.max_length])
            label_rows.append(labels[: self.max_length])
            kept.append(sid)
        if not rows:
            return None
        ids, mask = pad_right(rows, self.pad_id)
        labels, _ = pad_right(label_rows, IGNORE_INDEX)
        return {"pixel_values": torch.stack(pixels), "input_ids": ids, "attention_mask": mask, "labels": labels,
                "sample_ids": kept}

    def _conversation(self, turns: Sequence[tuple[str, str]]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        for i, (question, answer) in enumerate(turns):
            if i == 0:
                before, after = chat_prompt(f"{IMAGE_TOKEN}\n{question}").split(IMAGE_TOKEN)
                prompt = self._encode(before) + [IMAGE_TOKEN_INDEX] * self.num_image_tokens + self._encode(after)
            else:
                prompt = self._encode("\n" + chat_prompt(question))
            reply = self._encode(answer + "<|im_end|>")
            ids += prompt + reply
            labels += [IGNORE_INDEX] * len(prompt) + reply
        return ids, labels

